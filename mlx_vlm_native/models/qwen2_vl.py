"""Qwen2-VL and Qwen2.5-VL: the packed NaViT tower (`qwen2_vision.py`) feeding
a Qwen2 decoder (mlx-lm) whose rotary embedding is multimodal (M-RoPE).

M-RoPE splits the rotary frequencies into (temporal, height, width) sections:
text tokens advance all three positions together, while the merged vision
tokens of an image share one temporal position and take their row and column
as the other two. The positions of a prompt are computed once, from its token
types and grids; generated tokens continue at `offset + rope_delta`.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.models.base import create_attention_mask

from ..engine import BatchPromptKVCache, Prompt, PromptKVCache, prompts_of

from ..native.packing import pack_of_packs, split_by_prompt
from .base import (
    IMAGE, TEXT, VIDEO, BaseModelArgs, ProcessedInputs, VisionLanguageModel, apply_rotary, scatter_features,
    text_config_for_mlx_lm,
)
from .qwen2_vision import VisionConfig, VisionModel, patch_embed_mlx_conv

LAYOUTS = (
    "Hub release (model.*, visual.*, torch Conv3d)",
    "transformers 5 (model.language_model.*, model.visual.*)",
    "mlx-vlm (language_model.*, vision_tower.*, MLX Conv3d)",
    "this project's converted folders",
)
HUB_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "hidden_act", "tie_word_embeddings",
)


def mrope_section(text_config: dict) -> List[int]:
    """The sections live in `rope_parameters` (transformers 5) or `rope_scaling` (hub)."""
    for key in ("rope_parameters", "rope_scaling"):
        section = (text_config.get(key) or {}).get("mrope_section")
        if section is not None:
            return list(section)
    raise ValueError("the text config has no mrope_section (rope_parameters or rope_scaling)")


@dataclass
class ModelArgs(BaseModelArgs):
    vision_config: dict
    text_config: Optional[dict] = None
    model_type: str = "qwen2_vl"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    tie_word_embeddings: Optional[bool] = None
    mrope_section: List[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, params: dict):
        args = super().from_dict(params)
        if args.text_config is None:
            args.text_config = {k: params[k] for k in HUB_TEXT_KEYS if k in params}
            args.__post_init__()
        return args

    def __post_init__(self):
        if self.text_config is None:
            return  # from_dict fills it in from the top level
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            self.mrope_section = mrope_section(self.text_config)
            text = {"model_type": "qwen2", **self.text_config}
            for key in ("rope_parameters", "rope_scaling"):  # M-RoPE is applied here, not by mlx-lm
                rope = text.pop(key, None) or {}
                if "rope_theta" in rope:
                    text.setdefault("rope_theta", rope["rope_theta"])
            tie = text.get("tie_word_embeddings", self.tie_word_embeddings)
            self.text_config = qwen2.ModelArgs.from_dict(text_config_for_mlx_lm(text, tie))
        head_dim = self.text_config.hidden_size // self.text_config.num_attention_heads
        if sum(self.mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2}"
            )

    def video_time_intervals(self, seconds_per_grid: Sequence[float]) -> Optional[List[float]]:
        """Qwen2.5-VL spaces video frames by real time; Qwen2-VL by one."""
        tps = self.vision_config.tokens_per_second
        return None if tps is None else [tps * s for s in seconds_per_grid]


def vision_positions(start: int, grid, merge: int, time_interval: float = 1.0) -> np.ndarray:
    """(3, t*h*w/merge^2) (temporal, row, col) positions of one image or video."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = np.meshgrid((np.arange(t) * time_interval).astype(np.int64), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start


def rope_index(token_types: np.ndarray, image_grids, video_grids, merge: int,
               video_time_intervals: Optional[Sequence[float]] = None):
    """M-RoPE positions (3, L) of one prompt and the delta that continues them.

    Runs of text advance one position per token; each run of vision tokens
    takes its grid's positions from the current offset, which then advances by
    the larger merged side (transformers' `get_rope_index`)."""
    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    intervals = iter(video_time_intervals or [1.0] * len(video_grids))
    change = np.flatnonzero(np.diff(token_types)) + 1
    starts, ends = np.r_[0, change], np.r_[change, len(token_types)]
    parts, pos = [], 0
    for a, b in zip(starts, ends):
        kind = int(token_types[a])
        if kind == TEXT:
            parts.append(np.broadcast_to(np.arange(pos, pos + b - a), (3, b - a)))
            pos += b - a
            continue
        grid = next(grids[kind])
        interval = next(intervals) if kind == VIDEO else 1.0
        block = vision_positions(pos, grid, merge, interval)
        if block.shape[1] != b - a:
            raise ValueError(f"a run of {b - a} vision tokens does not match grid {tuple(grid)}")
        parts.append(block)
        pos += max(grid[1], grid[2]) // merge
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    return positions.astype(np.int32), prompt_delta(positions)


def prompt_delta(positions: np.ndarray) -> int:
    """Where the text positions after a (3, L) prompt continue, minus L; 0 for
    a (B, 3, L) batch of whole sequences, which nothing continues."""
    if positions.ndim != 2 or not positions.size:
        return 0
    return int(positions.max()) + 1 - positions.shape[-1]


class MRoPE(nn.Module):
    """Rotary embedding with per-section positions. It holds no positions:
    each forward builds `RopeTables` for its own tokens and hands them to every
    layer as the `offset` mlx-lm's attention passes (`PositionedCache`)."""

    def __init__(self, head_dim: int, base: float, sections: Sequence[int]):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
        self._inv_freq = mx.array(inv_freq)
        self._section = mx.array(np.repeat(np.arange(3), sections))

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, RopeTables):  # plain 1-D positions from `offset`
            return mx.fast.rope(x, self.head_dim, traditional=False, base=self.base, scale=1.0, offset=offset)
        return apply_rotary(x, offset.cos.astype(x.dtype), offset.sin.astype(x.dtype))

    def tables(self, positions) -> "RopeTables":
        """cos and sin of (3, L) or (B, 3, L) positions: each frequency takes the
        position of its section (t, h or w)."""
        pos = mx.array(positions)
        angles = mx.take(pos, self._section, axis=-2).swapaxes(-1, -2).astype(mx.float32) * self._inv_freq
        angles = mx.concatenate([angles, angles], axis=-1)
        if angles.ndim == 3:  # (B, L, D) -> (B, 1, L, D) over the heads
            angles = angles[:, None]
        return RopeTables(mx.cos(angles), mx.sin(angles))


@dataclass
class RopeTables:
    """The rotary tables of one forward's tokens."""

    cos: mx.array
    sin: mx.array


class PositionedCache:
    """One layer's cache (or None) for one forward, with that forward's
    `RopeTables` as the `offset` mlx-lm's attention hands to its rope; the rest
    is the cache's own. This is how positions reach mlx-lm's Qwen2 layers with
    each call, not as state on a shared module."""

    def __init__(self, cache, tables):
        self.cache, self.offset = cache, tables  # RopeTables, or 1-D offsets

    def update_and_fetch(self, keys, values):
        return (keys, values) if self.cache is None else self.cache.update_and_fetch(keys, values)

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if self.cache is not None:
            return self.cache.make_mask(N, return_array=return_array, window_size=window_size)
        return create_attention_mask(mx.zeros((1, N, 1)), None, window_size, return_array)

    def __getattr__(self, name):  # e.g. a quantized cache's `bits`
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def continued_offset(cache):
    """Where tokens with no prompt positions given sit: past the prompt all three
    positions are equal, `offset + delta` of each sequence (an int, or (B,))."""
    first = cache[0] if cache else None
    if first is None:
        return 0
    prompts = prompts_of(cache)
    if isinstance(first.offset, mx.array):
        return first.offset + mx.array([0 if p is None else p.delta for p in prompts])
    return first.offset + (0 if prompts[0] is None else prompts[0].delta)


class MRoPECache(PromptKVCache):
    """A sequence's KV cache; generated tokens sit at `offset + rope_delta`,
    the delta its `Prompt` carries. Merges into a `BatchMRoPECache`."""

    @property
    def rope_delta(self) -> int:
        return 0 if self.prompt is None else self.prompt.delta

    @rope_delta.setter
    def rope_delta(self, delta: int) -> None:
        self.prompt = Prompt(delta=delta, consumed=self.offset)

    @classmethod
    def merge(cls, caches):
        return BatchMRoPECache.merge(caches)


class BatchMRoPECache(BatchPromptKVCache):
    """mlx-lm's BatchKVCache with each sequence's `Prompt`, so its M-RoPE delta."""

    single = MRoPECache

    @property
    def rope_deltas(self) -> mx.array:
        return mx.array([0 if p is None else p.delta for p in self.prompts])


class Model(VisionLanguageModel):
    layouts = LAYOUTS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.visual = VisionModel(args.vision_config)
        self.language_model = qwen2.Model(args.text_config)
        t = args.text_config
        rope = MRoPE(t.hidden_size // t.num_attention_heads, t.rope_theta, args.mrope_section)
        for layer in self.language_model.layers:
            layer.self_attn.rope = rope

    @property
    def layers(self):
        return self.language_model.layers

    def encode_vision(self, batch: Sequence[ProcessedInputs]) -> List[Optional[mx.array]]:
        """Merged vision tokens of every processed prompt in `batch`, from ONE
        packed tower call; returns one (tokens, D) array per prompt."""
        packs = [inputs.pack for inputs in batch if inputs.pack is not None]
        if not packs:
            return [None] * len(batch)
        return split_by_prompt(self.visual(pack_of_packs(packs)), batch)

    def encode_vision_steps(self, batch: Sequence[ProcessedInputs]):
        """`encode_vision` a tower block at a time (see the base class)."""
        packs = [inputs.pack for inputs in batch if inputs.pack is not None]
        if not packs:
            yield [None] * len(batch)
            return
        for out in self.visual.steps(pack_of_packs(packs)):
            if out is None:
                yield None
        yield split_by_prompt(out, batch)

    def get_input_embeddings(self, inputs: ProcessedInputs, vision_features: Optional[mx.array] = None):
        """Token embeddings with the vision features in place, (1, L, D), and
        the prompt's (3, L) M-RoPE positions."""
        ids = inputs.input_ids
        embeds = self.language_model.model.embed_tokens(mx.array(ids))
        if inputs.pack is not None:
            if vision_features is None:
                vision_features = self.encode_vision([inputs])[0]
            n_image = int(np.count_nonzero(inputs.token_types == IMAGE))
            for kind, features in ((IMAGE, vision_features[:n_image]), (VIDEO, vision_features[n_image:])):
                mask = inputs.token_types == kind
                if mask.any() or features.shape[0]:
                    embeds = scatter_features(embeds, mask, features)
        positions, _ = rope_index(
            inputs.token_types, inputs.image_grids, inputs.video_grids,
            self.args.vision_config.spatial_merge_size,
            self.args.video_time_intervals(inputs.video_seconds_per_grid),
        )
        return embeds[None], positions

    def make_cache(self) -> List[MRoPECache]:
        return [MRoPECache() for _ in self.layers]

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, positions=None) -> mx.array:
        """`positions`: the (3, n) or (B, 3, n) M-RoPE positions of this call's
        n tokens, or a whole prompt's (3, L) for a chunk of it at the cache's
        offset. Without them the tokens continue what the cache holds."""
        n = inputs.shape[1] if input_embeddings is None else input_embeddings.shape[1]
        if positions is None:  # mlx-lm's fast 1-D rope at each sequence's offset
            rope = continued_offset(cache)
            caches = [PositionedCache(c, rope) for c in (cache or [None] * len(self.layers))]
            return self.language_model(inputs, cache=caches, input_embeddings=input_embeddings)
        if positions.ndim == 2 and cache:  # a chunk of one prompt's (3, L) positions, at the cache's offset
            if getattr(cache[0], "prompt", None) is None:  # generation continues at its delta
                cache[0].prompt = Prompt(delta=prompt_delta(positions))
            positions = positions[:, cache[0].offset : cache[0].offset + n]
        tables = self.layers[0].self_attn.rope.tables(positions)
        caches = [PositionedCache(c, tables) for c in (cache or [None] * len(self.layers))]
        return self.language_model(inputs, cache=caches, input_embeddings=input_embeddings)

    def sanitize(self, weights: dict) -> dict:
        """Hub (`model.layers`, `visual.`, `lm_head`), transformers-5 in-memory
        (`model.language_model.`, `model.visual.`) and mlx-vlm
        (`language_model.`, `vision_tower.`) layouts."""
        out, vision = {}, {}
        for k, v in weights.items():
            if "rotary_emb.inv_freq" in k:
                continue
            if k.startswith("model.visual."):
                k = k[len("model.") :]
            if k.startswith(("visual.", "vision_tower.")):
                vision[k.split(".", 1)[1]] = v
                continue
            if k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model.") :]
            elif k.startswith("model."):
                k = "language_model." + k
            elif k.startswith("lm_head."):
                k = "language_model." + k
            out[k] = v
        if self.args.text_config.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("language_model.lm_head.")}
        out.update({"visual." + k: v for k, v in self.visual.sanitize(vision).items()})
        return out

    def saved_layout(self, weights: dict, config: dict):
        return mlx_vlm_layout(weights, config, self.args)


def flat_config(config: dict) -> dict:
    """The Hub's classic config (text keys at the top, `rope_scaling` of type
    mrope, vision `model_type` qwen2_vl / qwen2_5_vl): what mlx-vlm parses,
    from it or from a transformers-5 nested one."""
    config = dict(config)
    text = dict(config.pop("text_config", None) or {})
    rope = dict(text.pop("rope_parameters", None) or config.pop("rope_parameters", None) or {})
    for k, v in text.items():
        if k not in ("model_type", "dtype"):
            config.setdefault(k, v)
    if rope:
        config.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
    section = mrope_section({"rope_parameters": rope, "rope_scaling": config.get("rope_scaling")})
    config["rope_scaling"] = {**(config.get("rope_scaling") or {}), "type": "mrope", "mrope_section": section}
    vision = dict(config["vision_config"])
    vision["model_type"] = config["model_type"]
    vision.setdefault("in_chans", vision.get("in_channels", 3))
    vision.setdefault("spatial_patch_size", vision.get("patch_size", 14))
    config["vision_config"] = vision
    return config


def mlx_vlm_layout(weights: dict, config: dict, args: ModelArgs):
    """Our parameters and config in mlx-vlm's qwen2_vl layout (`vision_tower.*`,
    the patch embedding as an MLX Conv3d weight, the flat config), which this
    loader reads back as well."""
    out = {}
    for k, v in weights.items():
        if k.startswith("visual."):
            k = "vision_tower." + k[len("visual.") :]
            if k == "vision_tower.patch_embed.proj.weight":
                v = patch_embed_mlx_conv(v, args.vision_config)
        out[k] = v
    config = flat_config(config)
    if "quantization" in config:  # per-module entries follow the renamed paths
        config["quantization"] = {"vision_tower." + k[len("visual.") :] if k.startswith("visual.") else k: v
                                  for k, v in config["quantization"].items()}
        config["quantization_config"] = config["quantization"]
    return out, config
