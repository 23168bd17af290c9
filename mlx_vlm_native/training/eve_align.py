"""EVE training parts: the patch-aligning layer (PAL), the frozen teacher, the
alignment loss, the three stages and the training samples; the `eve` task
(`training/eve.py`) trains them on the shared loop.

The PAL reads the decoder's hidden states at the image positions, rebuilds
the 2-D patch grid (CLS and <SPL> dropped, pooled to the teacher's grid),
fuses every 4th layer with a cross-layer attention (CA3) and is pulled towards
the teacher's penultimate patch features by `1 - cosine`. Inference never
builds any of this.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from ..models import siglip
from ..models.base import ProcessedInputs, check_weights, masked_cross_entropy
from ..models.clip import CLIPVisionConfig, CLIPVisionModel
from ..models.eve import Model
from ..processors.eve import EVEProcessor, IMAGE_TOKEN, plain_prompt, vicuna_v1_prompt
from ..processors.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..utils import load_weights

IGNORE_INDEX = -100
# kept out of the folder's top level so that `load()` does not read it as model weights
ALIGNER_FILE = "aligner/aligner.safetensors"


# ---------------------------------------------------------------- teachers


@dataclass
class Teacher:
    """A frozen vision tower giving penultimate-layer patch features."""

    tower: nn.Module
    image_size: int
    patch_size: int
    image_mean: Tuple[float, ...]
    image_std: Tuple[float, ...]
    has_cls: bool

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def features(self, pixels: np.ndarray) -> mx.array:
        """(B, 4, S, S) teacher inputs (RGB + mask) -> (B, grid*grid, C)."""
        x = mx.array(pixels[:, :3].transpose(0, 2, 3, 1))
        feats = self.tower(x, output_layer=-2)
        return mx.stop_gradient(feats[:, 1:] if self.has_cls else feats)

    def valid_patches(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 4, S, S) -> (B, grid*grid) bool: patches fully inside the image."""
        p, g = self.patch_size, self.grid
        mask = pixels[:, 3, : g * p, : g * p].reshape(len(pixels), g, p, g, p).mean(axis=(2, 4))
        return mask.reshape(len(pixels), -1) > 0.5


TEACHER_TYPES = {"clip_vision_model": "clip", "clip": "clip",
                 "siglip_vision_model": "siglip", "siglip": "siglip"}


# where released EVE v1 checkpoints keep their CLIP teacher (it is stored twice)
EVE_TEACHER_PREFIX = "vision_clip.backbone.vision_model."


def load_teacher(path, vision_config: Optional[dict] = None) -> Teacher:
    """A CLIP or SigLIP vision tower (full model or vision-only, HF layout), or
    the CLIP teacher stored inside a reference EVE v1 checkpoint; the latter's
    geometry is not in its config: `vision_config`, CLIP-L/14-336 by default."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == "eve":
        weights = {k.split(EVE_TEACHER_PREFIX, 1)[1]: v for k, v in load_weights(path).items()
                   if EVE_TEACHER_PREFIX in k and "clip_layer." not in k}
        if not weights:
            raise ValueError(f"{path} holds no '{EVE_TEACHER_PREFIX}*' teacher weights (a converted folder?)")
        config = {"model_type": "clip_vision_model", **(vision_config or {})}
        return _build_teacher(path, config, weights)
    return _build_teacher(path, config, load_weights(path))


def _build_teacher(path: Path, config: dict, weights: dict) -> Teacher:
    kind = TEACHER_TYPES.get(config.get("model_type"))
    if kind is None:
        raise ValueError(
            f"teacher model_type {config.get('model_type')!r} is not supported; "
            f"supported: {', '.join(TEACHER_TYPES)}"
        )
    vision = config.get("vision_config", config)
    if any("vision_model." in k for k in weights):  # full models and older vision-only saves
        weights = {k.split("vision_model.", 1)[1]: v for k, v in weights.items() if "vision_model." in k}
    if kind == "clip":
        tower = CLIPVisionModel(CLIPVisionConfig.from_dict(vision))
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    else:
        tower = siglip.VisionModel(siglip.VisionConfig.from_dict({**vision, "vision_use_head": False}))
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
        mean = std = (0.5, 0.5, 0.5)
    weights = tower.sanitize(weights)
    check_weights(tower, weights)
    tower.load_weights(list(weights.items()))
    tower.freeze()
    tower.eval()
    pre = path / "preprocessor_config.json"
    if pre.exists():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return Teacher(tower, vision.get("image_size", tower.config.image_size),
                   vision.get("patch_size", tower.config.patch_size), mean, std, kind == "clip")


# ------------------------------------------------------ patch-aligning layer


def aligned_layer_indices(num_layers: int, layer_rate: int = 4) -> List[int]:
    """Hidden-state indices the PAL reads, last first: 32, 28, ..., 0 for 32 layers."""
    return [num_layers - i for i in range(0, num_layers + 1, layer_rate)]


class LayerProjection(nn.Module):
    def __init__(self, dims: int, out_dims: int):
        super().__init__()
        self.norm = nn.LayerNorm(dims)
        self.proj = nn.Linear(dims, out_dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(self.norm(x))


class PatchAligner(nn.Module):
    """CA3: the last hidden state queries the earlier selected ones, per patch."""

    def __init__(self, hidden_size: int, num_layers: int, out_dims: int, num_heads: int = 8):
        super().__init__()
        if out_dims % num_heads:
            raise ValueError(f"aligner width {out_dims} is not divisible by {num_heads} heads")
        self.layer_indices = aligned_layer_indices(num_layers)
        if len(self.layer_indices) < 2:
            raise ValueError(f"the aligner needs at least 4 decoder layers, got {num_layers}")
        self.num_heads = num_heads
        self.scale = out_dims**-0.5
        self.norm_layer = [LayerProjection(hidden_size, out_dims) for _ in self.layer_indices]
        self.input_layer = nn.Linear(hidden_size, out_dims)
        self.output_layer = nn.Linear(out_dims, out_dims)

    def __call__(self, x: mx.array) -> mx.array:
        """(N, J, D) patch features at `layer_indices` (last layer first) -> (N, C)."""
        v = mx.stack([f(x[:, j]) for j, f in enumerate(self.norm_layer)], axis=1)
        N, J, C = v.shape
        h = self.num_heads
        q = v[:, :1].reshape(N, 1, h, C // h)
        kv = v[:, 1:].reshape(N, J - 1, h, C // h)
        attn = mx.softmax((q * self.scale * kv).sum(-1), axis=1, precise=True)  # (N, J-1, h)
        fused = (attn[..., None] * kv).sum(axis=1).reshape(N, C)
        return self.input_layer(x[:, 0]) + self.output_layer(fused)

    def sanitize(self, weights: dict) -> dict:
        """Reference `vision_tower_compressor.*` keys (any prefix) -> this module's."""
        out = {}
        for k, v in weights.items():
            if "vision_tower_compressor." in k:
                k = k.split("vision_tower_compressor.", 1)[1]
                if k.startswith("clip_layer."):
                    continue
                k = re.sub(r"^norm_layer\.(\d+)\.0\.", r"norm_layer.\1.norm.", k)
                k = re.sub(r"^norm_layer\.(\d+)\.1\.", r"norm_layer.\1.proj.", k)
            out[k] = v
        return out


def image_grid_features(
    states: Sequence[mx.array], b: int, start: int, grid: Tuple[int, int], ratio: int, layer_indices: Sequence[int]
) -> mx.array:
    """Sample `b`'s image tokens starting at `start` ([CLS] + h rows of w + <SPL>)
    -> (h/ratio * w/ratio, J, D): grid order, pooled `ratio`x`ratio`."""
    h, w = grid
    if h % ratio or w % ratio:
        raise ValueError(f"the {h}x{w} token grid does not pool by {ratio}")
    out = []
    for i in layer_indices:
        x = states[i][b, start + 1 : start + 1 + h * (w + 1)]
        x = x.reshape(h, w + 1, -1)[:, :w]
        if ratio > 1:
            x = x.reshape(h // ratio, ratio, w // ratio, ratio, -1).mean(axis=(1, 3))
        out.append(x.reshape(-1, x.shape[-1]))
    return mx.stack(out, axis=1)


def alignment_loss(pred: mx.array, target: mx.array, eps: float = 1e-8) -> mx.array:
    """`1 - mean cosine similarity` over patches (the reference's `compute_mseloss`)."""
    dot = (pred * target).sum(-1)
    norms = mx.maximum(mx.linalg.norm(pred, axis=-1) * mx.linalg.norm(target, axis=-1), eps)
    return 1 - (dot / norms).mean()


# ---------------------------------------------------------------- training


class EVETrainingModel(nn.Module):
    """What training updates: the EVE model and the patch-aligning layer."""

    def __init__(self, eve: Model, aligner: PatchAligner):
        super().__init__()
        self.eve = eve
        self.aligner = aligner


def new_aligner(eve: Model, teacher_width: int) -> PatchAligner:
    t = eve.args.text_config
    return PatchAligner(t.hidden_size, t.num_hidden_layers, teacher_width)


def trainable_modules(stage: int) -> Tuple[str, ...]:
    """Stage 1 trains the patch embedding, projector and aligner (LLM frozen);
    stages 2 and 3 train everything. The teacher never trains."""
    if stage == 1:
        return ("eve.vision_tower", "eve.multi_modal_projector", "aligner")
    if stage in (2, 3):
        return ("eve", "aligner")
    raise ValueError(f"EVE has stages 1, 2 and 3, not {stage!r}")


def apply_stage(model: EVETrainingModel, stage: int) -> None:
    model.freeze()
    for path in trainable_modules(stage):
        module = model
        for name in path.split("."):
            module = getattr(module, name)
        module.unfreeze()


@dataclass
class Sample:
    input_ids: np.ndarray  # (L,) with -200 at the image positions
    labels: np.ndarray  # (L,) IGNORE_INDEX where no loss is taken
    pixel_values: Optional[np.ndarray] = None  # (4, S, S)
    teacher_pixels: Optional[np.ndarray] = None  # (4, Sc, Sc)
    grid: Optional[Tuple[int, int]] = None

    def inputs(self) -> ProcessedInputs:
        """The sample as the model reads a prompt."""
        return ProcessedInputs(self.input_ids, pixel_values=[] if self.pixel_values is None else [self.pixel_values])


def _image_sample(processor: EVEProcessor, image, teacher: Optional[Teacher]):
    ip = processor.image_processor
    pixels = ip(image)
    teacher_pixels = ip.teacher_pixels(image, teacher.image_mean, teacher.image_std) if teacher else None
    return pixels, teacher_pixels, ip.grid(image.size)


def plain_sample(processor: EVEProcessor, image, caption: str, teacher: Optional[Teacher] = None) -> Sample:
    """Stages 1-2 (`plain`): "<image>caption\\n", loss on the caption only."""
    ids = processor.tokenize(plain_prompt(caption))
    start = ids.index(processor.image_token_id) + 1
    labels = [IGNORE_INDEX] * start + ids[start:]
    return build_sample(processor, ids, labels, image, teacher)


def conversation_sample(
    processor: EVEProcessor, image, turns: Sequence[Tuple[str, str]], teacher: Optional[Teacher] = None
) -> Sample:
    """Stage 3 (`vicuna_v1`): loss on the assistant answers (and their </s>) only.
    The first question should hold "<image>" when an image is given."""
    ids = processor.tokenize(vicuna_v1_prompt(turns))
    labels = [IGNORE_INDEX] * len(ids)
    for r in range(len(turns)):
        before = vicuna_v1_prompt(list(turns[:r]) + [(turns[r][0], None)])
        through = vicuna_v1_prompt(list(turns[: r + 1]))
        a, b = len(processor.tokenize(before)), len(processor.tokenize(through))
        if processor.tokenize(through) != ids[:b]:
            raise ValueError(f"turn {r} does not tokenize as a prefix of the conversation")
        labels[a:b] = ids[a:b]
    return build_sample(processor, ids, labels, image, teacher)


def build_sample(processor, ids: List[int], labels: List[int], image, teacher) -> Sample:
    """Expand the -200 placeholder to the image's token count (labels ignored there)."""
    n_images = ids.count(processor.image_token_id)
    if image is None:
        if n_images:
            raise ValueError("the text has an <image> placeholder but no image was given")
        return Sample(np.array(ids, np.int32), np.array(labels, np.int32))
    if n_images != 1:
        raise ValueError(f"an EVE training sample holds exactly one {IMAGE_TOKEN}, found {n_images}")
    pixels, teacher_pixels, grid = _image_sample(processor, image, teacher)
    n = 1 + grid[0] * (grid[1] + 1)
    i = ids.index(processor.image_token_id)
    ids = ids[:i] + [ids[i]] * n + ids[i + 1 :]
    labels = labels[:i] + [IGNORE_INDEX] * n + labels[i + 1 :]
    return Sample(np.array(ids, np.int32), np.array(labels, np.int32), pixels, teacher_pixels, grid)


def grid_ratio(eve: Model, processor: EVEProcessor, teacher: Teacher) -> int:
    """How many EVE tokens per teacher patch along each side (1, or 2 for HD)."""
    ip = processor.image_processor
    if (teacher.image_size, teacher.patch_size) != (ip.image_size_clip, ip.patch_stride_clip):
        raise ValueError(
            f"the teacher sees {teacher.image_size}px / {teacher.patch_size}px patches but the "
            f"processor lays images out for {ip.image_size_clip}px / {ip.patch_stride_clip}px"
        )
    eve_grid = ip.image_size // (ip.patch_stride * ip.conv_stride)
    if eve_grid % teacher.grid:
        raise ValueError(f"EVE's {eve_grid}-token grid is not a multiple of the teacher's {teacher.grid}")
    return eve_grid // teacher.grid


def teacher_targets(teacher: Teacher, batch: Sequence[Sample]) -> List[Optional[mx.array]]:
    """Per sample: the teacher's features at its valid patches, or None."""
    out = []
    for s in batch:
        if s.teacher_pixels is None:
            out.append(None)
            continue
        px = s.teacher_pixels[None]
        feats = teacher.features(px)[0]
        out.append(feats[mx.array(np.nonzero(teacher.valid_patches(px)[0])[0])])
    return out


def pad_batch(embeds: List[mx.array], labels: List[np.ndarray]) -> Tuple[mx.array, mx.array]:
    T = max(e.shape[0] for e in embeds)
    x = mx.stack([mx.pad(e, [(0, T - e.shape[0]), (0, 0)]) for e in embeds])
    y = np.full((len(labels), T), IGNORE_INDEX, np.int32)
    for i, lab in enumerate(labels):
        y[i, : len(lab)] = lab
    return x, mx.array(y)


def next_token_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Mean cross-entropy over the non-ignored next tokens of the whole batch."""
    targets = labels[:, 1:]
    return masked_cross_entropy(logits[:, :-1], targets, targets != IGNORE_INDEX)[0]


def eve_loss(
    model: EVETrainingModel, batch: Sequence[Sample], targets: Sequence[Optional[mx.array]],
    ratio: int, align_weight: float = 1.0,
):
    """CE + align_weight * alignment loss (mean over the batch's images).
    Returns (total, (ce, alignment))."""
    eve = model.eve
    embeds = [eve.get_input_embeddings(s.inputs())[0][0] for s in batch]
    x, labels = pad_batch(embeds, [s.labels for s in batch])
    logits, states = eve.logits_and_hidden_states(x)
    ce = next_token_loss(logits, labels)
    align, n_images = mx.array(0.0), 0
    for b, (s, target) in enumerate(zip(batch, targets)):
        if target is None:
            continue
        start = int(np.argmax(s.input_ids == eve.args.image_token_index))
        feats = image_grid_features(states, b, start, s.grid, ratio, model.aligner.layer_indices)
        pred = model.aligner(feats)
        if pred.shape != target.shape:
            raise ValueError(
                f"sample {b}: {pred.shape[0]} aligned patches of width {pred.shape[1]} but the teacher "
                f"gives {target.shape[0]} valid patches of width {target.shape[1]}"
            )
        align = align + alignment_loss(pred, target)
        n_images += 1
    align = align / max(n_images, 1)
    return ce + align_weight * align, (ce, align)


def broadcast_parameters(model: nn.Module) -> None:
    """Give every `mx.distributed` rank rank 0's weights (e.g. a freshly
    initialised aligner); a no-op on one process."""
    group = mx.distributed.init()
    if group.size() == 1:
        return
    keep = group.rank() == 0
    model.update(tree_map(lambda v: mx.distributed.all_sum(v if keep else mx.zeros_like(v)), model.parameters()))
    mx.eval(model.parameters())


def load_aligner_weights(aligner: PatchAligner, path) -> bool:
    """Load the PAL from a reference checkpoint folder (its
    `vision_tower_compressor.*` keys) or the file saved by
    training (`ALIGNER_FILE`); False when the folder has neither (the PAL
    keeps its init)."""
    path = Path(path)
    saved = path / ALIGNER_FILE
    if saved.exists():
        weights = dict(mx.load(str(saved)))
    else:
        weights = {k: v for k, v in load_weights(path).items()
                   if "vision_tower_compressor." in k and ".clip_layer." not in k}
        if not weights:
            return False
    weights = aligner.sanitize(weights)
    check_weights(aligner, weights)
    aligner.load_weights(list(weights.items()))
    return True
