import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..engine import PromptKVCache
from ..native.packing import Pack
from ..native.rope import rotate_half

TEXT, IMAGE, VIDEO = 0, 1, 2  # the values of `ProcessedInputs.token_types`


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict):
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in fields})


@dataclass
class ProcessedInputs:
    """One prompt and its media as every family's processor hands them to the
    model; each family fills the fields its vision path reads."""

    input_ids: np.ndarray  # (L,) int32, each image/video placeholder expanded to its tokens
    pixel_values: List[np.ndarray] = field(default_factory=list)  # per image, in the family's layout
    image_sizes: List[Tuple[int, int]] = field(default_factory=list)  # per image: (height, width)
    multi_image: bool = False  # several images, one square view each (LLaVA-OneVision)
    video_frames: List[np.ndarray] = field(default_factory=list)  # per video: (frames, 3, S, S)
    image_grids: List[tuple] = field(default_factory=list)  # per image: patch grid, EVE (h, w), Qwen2-VL (t, h, w)
    video_grids: List[tuple] = field(default_factory=list)  # per video: (t, h, w)
    video_seconds_per_grid: List[float] = field(default_factory=list)
    token_types: Optional[np.ndarray] = None  # (L,) TEXT, IMAGE or VIDEO (packed families)
    pack: Optional[Pack] = None  # the patches of all images, then all videos (packed families)

    @property
    def vision_tokens(self) -> int:
        """Image and video placeholder tokens of a packed family's prompt."""
        return 0 if self.token_types is None else int(np.count_nonzero(self.token_types))


class VisionLanguageModel(nn.Module):
    """What every VLM family's `Model` implements, and the one way generate,
    chat, serve, batch_generate and finetuning use a model:

        features = model.encode_vision(batch)  # every prompt of a batch, one vision pass
        embeddings, positions = model.get_input_embeddings(inputs, features[i])
        logits = model(input_ids[None], cache=cache, input_embeddings=embeddings, positions=positions)

    `positions` are a prompt's rotary positions where they are not plain 1-D
    ones (Qwen2-VL's (3, L) M-RoPE positions), else None. Generation does not
    call the model itself: mlx-lm's machinery does, through
    `engine.PromptReader`, with each sequence's prompt in its cache
    (`make_cache`)."""

    # the checkpoint layouts `sanitize` maps, named in a missing-key error
    layouts: Tuple[str, ...] = ()

    @property
    def layers(self) -> list:
        """The decoder layers, one KV cache each."""
        raise NotImplementedError

    def make_cache(self) -> list:
        """One KV cache per layer; the first carries the sequence's `engine.Prompt`."""
        return [PromptKVCache() for _ in self.layers]

    def encode_vision(self, batch: Sequence[ProcessedInputs]) -> List[Optional[mx.array]]:
        """The vision features of each prompt of `batch`, (tokens, D) in placeholder
        order (images, then videos), or None for a prompt without media."""
        raise NotImplementedError

    def encode_vision_steps(self, batch: Sequence[ProcessedInputs]) -> Iterator[Optional[list]]:
        """`encode_vision` in bounded steps, for a server to interleave with
        decoding: yields None between steps, and last the features. This default
        is one step; a family with a deep tower yields after each block."""
        yield self.encode_vision(batch)

    def get_input_embeddings(
        self, inputs: ProcessedInputs, vision_features: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[np.ndarray]]:
        """(1, L, D) token embeddings with the vision features (encoded here when
        not given) at the placeholders, and the prompt's positions (or None)."""
        raise NotImplementedError

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None,
                 positions: Optional[np.ndarray] = None) -> mx.array:
        """Logits of (B, L) token ids, or of their `input_embeddings` (B, L, D)."""
        raise NotImplementedError

    def saved_layout(self, weights: dict, config: dict) -> Tuple[dict, dict]:
        """The parameters and config as `convert` writes them: ours, unless the
        peer (mlx-vlm) has the architecture, whose layout loads in both."""
        return weights, config


def _first(keys, n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_weights(model, weights: dict, layouts=()) -> None:
    """Raise naming the missing and unexpected keys (and the layouts the
    family's sanitize knows), or the first mis-shaped key."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"checkpoint is missing {len(missing)} weight(s), first: {_first(missing)}")
        if extra:
            parts.append(f"checkpoint has {len(extra)} unexpected weight(s), first: {_first(extra)}")
        tried = f"; layouts tried: {', '.join(layouts)}" if layouts else ""
        raise ValueError("; ".join(parts) + tried)
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"weight '{k}' has shape {tuple(v.shape)}, the model expects "
                f"{tuple(expected[k].shape)}"
            )


def text_config_for_mlx_lm(cfg: dict, tie_word_embeddings=None) -> dict:
    """A HF text config in the form mlx-lm's ModelArgs expect.

    transformers 5 writes `rope_parameters` where older configs had
    `rope_theta`/`rope_scaling`; both are accepted.
    """
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if tie_word_embeddings is not None:
        cfg["tie_word_embeddings"] = tie_word_embeddings
    return cfg


def resize_bilinear(x, rows: int, cols: int):
    """(H, W, D) -> (rows, cols, D) bilinear, matching torch's
    `interpolate(mode="bilinear", align_corners=False)` without antialiasing."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        lo = np.floor(src).astype(np.int64)
        lo = np.minimum(lo, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w = np.zeros((n_out, n_in), np.float32)
        np.add.at(w, (np.arange(n_out), lo), 1 - frac)
        np.add.at(w, (np.arange(n_out), hi), frac)
        return w

    H, W, D = x.shape
    wr = mx.array(weights(H, rows)).astype(x.dtype)
    wc = mx.array(weights(W, cols)).astype(x.dtype)
    x = (wr @ x.reshape(H, W * D)).reshape(rows, W, D)
    return mx.einsum("cw,rwd->rcd", wc, x)


@partial(mx.compile, shapeless=True)
def _rotary_sum(x: mx.array, rotated: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    # elementwise only, so one shapeless trace serves every shape (one fused kernel on a GPU)
    return x * cos + rotated * sin


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x rotated by angles whose cos and sin broadcast against it (rotate-half convention)."""
    return _rotary_sum(x, rotate_half(x), cos, sin)


def scatter_features(embeds: mx.array, mask: np.ndarray, features: mx.array) -> mx.array:
    """Put `features` rows, in order, at the True positions of `mask` (L,)."""
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(
            f"{int(mask.sum())} placeholder tokens but {features.shape[0]} feature vectors"
        )
    index = np.maximum(np.cumsum(mask) - 1, 0)
    gathered = features[mx.array(index)]
    return mx.where(mx.array(mask)[:, None], gathered.astype(embeds.dtype), embeds)


class MLPProjector(nn.Module):
    """The LLaVA-style projector: Linear, GELU, Linear into the LM width."""

    def __init__(self, in_dims: int, out_dims: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dims, out_dims, bias=bias)
        self.linear_2 = nn.Linear(out_dims, out_dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


def masked_cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array):
    """(mean cross-entropy over the positions where `mask` is true, their count), in fp32.
    Targets at masked-out positions may hold anything (padding, ignore ids)."""
    mask = mask.astype(mx.float32)
    safe = mx.where(mask > 0, targets, 0)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), safe) * mask
    count = mask.sum()
    return ce.sum() / mx.maximum(count, 1.0), count
