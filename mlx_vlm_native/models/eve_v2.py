"""EVEv2 (`model_type` "eve-qwen2"): an encoder-free VLM. A two-conv stem (16 px,
GELU, 2x2) with EVE's CLS and split tokens feeds a Qwen2.5 decoder whose norms,
attention projections and MLPs have a second, vision copy: each token uses the
copy of its modality ("modality-decoupled"); attention itself is shared.
Prompts, placeholders and the checkpoint's key prefixes are EVE v1's (`eve.py`).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from . import eve
from .base import BaseModelArgs

LAYOUTS = (
    "Hub release (model.*, model.vision_tower.*; safetensors)",
    "EVEv2 before 2025-03 (start_embedding/end_embedding)",
    "this project's converted folders",
)


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict
    model_type: str = "eve-qwen2"
    mm_hidden_size: int = 1024
    mm_vision_tower: str = "openai/eve-patch14-anypixel-672"
    patch_stride: int = 16
    conv_stride: int = 2
    image_token_index: int = eve.IMAGE_TOKEN_INDEX
    vision_tower_hidden_size: Optional[int] = None  # else mm_hidden_size, which EVEv2's trainer writes
    add_moe: bool = True
    moe_part: str = "layernorm-self_attn-mlp"

    @classmethod
    def from_dict(cls, params: dict):
        return super().from_dict(eve.with_text_config(params))

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = eve.decoder_args(self.text_config, qwen2)
        if self.vision_tower_hidden_size is None:
            self.vision_tower_hidden_size = self.mm_hidden_size
        if not self.add_moe or self.moe_part != "layernorm-self_attn-mlp":
            raise ValueError(
                f"EVEv2 with add_moe={self.add_moe}, moe_part={self.moe_part!r} is not supported: "
                "the releases use add_moe=True, moe_part='layernorm-self_attn-mlp'"
            )


class Model(eve.Model):
    """EVE v1's embedding and loading around the decoupled decoder."""
    layouts = LAYOUTS

    def build(self, args: ModelArgs) -> None:
        self.vision_tower = VisionTokenizer(args)
        self.language_model = DecoupledLanguageModel(args.text_config)

    def image_tokens(self, pixels: np.ndarray) -> mx.array:
        """(3, H, W) -> (1 + h*(w+1), text hidden) embeddings of one image."""
        return self.vision_tower(pixels)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, positions=None) -> mx.array:
        # the image placeholders in `inputs` tell which positions use the vision weights
        vision = None
        if input_embeddings is not None and inputs.shape[-1] == input_embeddings.shape[1]:
            is_image = inputs == self.args.image_token_index
            vision = is_image[..., None] if is_image.any().item() else None
        return self.language_model(inputs, cache, input_embeddings, vision)

    def logits_and_hidden_states(self, embeddings: mx.array):
        raise NotImplementedError("EVEv2 training (no aligning layer) is not implemented")

    def sanitize_vision_key(self, k: str, v: mx.array):
        k = eve.OLD_EMBEDDING_NAMES.get(k, k)
        for old, new in STEM_NAMES.items():
            k = k.replace(old, new)
        if k.endswith("_conv.weight"):
            v = to_channels_last(v, getattr(self.vision_tower, k.split(".")[1]).weight.shape)
        return k, v


class VisionTokenizer(nn.Module):
    """16-px conv, GELU, 2x2 conv to the decoder width; then [CLS] + rows with <SPL>."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        C, D = args.vision_tower_hidden_size, args.text_config.hidden_size
        self.patch_conv = nn.Conv2d(3, C, args.patch_stride, args.patch_stride)
        self.merge_conv = nn.Conv2d(C, D, args.conv_stride, args.conv_stride)
        self.class_embedding = mx.zeros((D,))
        self.split_embedding = mx.zeros((D,))

    def __call__(self, pixels: np.ndarray) -> mx.array:
        """(3, H, W) -> (1 + h*(w+1), D)."""
        x = mx.array(pixels.transpose(1, 2, 0)[None]).astype(self.class_embedding.dtype)
        grid = self.merge_conv(nn.gelu(self.patch_conv(x)))[0]
        h, w, D = grid.shape
        split = mx.broadcast_to(self.split_embedding, (h, 1, D))
        rows = mx.concatenate([grid, split], axis=1).reshape(h * (w + 1), D)
        return mx.concatenate([self.class_embedding[None], rows])


def by_modality(text_fn, vision_fn, x: mx.array, vision: Optional[mx.array]) -> mx.array:
    """The reference's `moe_function`: the text copy for text tokens, the vision
    copy for vision tokens (CLS and <SPL> included). Both are computed."""
    if vision is None:
        return text_fn(x)
    return mx.where(vision, vision_fn(x), text_fn(x))


class DecoupledAttention(nn.Module):
    def __init__(self, args: qwen2.ModelArgs):
        super().__init__()
        D, H, KV = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        hd = D // H
        self.n_heads, self.n_kv_heads, self.scale = H, KV, hd**-0.5
        for prefix in ("", "moe_"):
            setattr(self, prefix + "q_proj", nn.Linear(D, H * hd, bias=True))
            setattr(self, prefix + "k_proj", nn.Linear(D, KV * hd, bias=True))
            setattr(self, prefix + "v_proj", nn.Linear(D, KV * hd, bias=True))
            setattr(self, prefix + "o_proj", nn.Linear(H * hd, D, bias=False))
        self.rope = qwen2.initialize_rope(
            hd, base=args.rope_theta, traditional=args.rope_traditional,
            scaling_config=args.rope_scaling, max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x, vision=None, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = by_modality(self.q_proj, self.moe_q_proj, x, vision)
        k = by_modality(self.k_proj, self.moe_k_proj, x, vision)
        v = by_modality(self.v_proj, self.moe_v_proj, x, vision)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return by_modality(self.o_proj, self.moe_o_proj, out, vision)


class SwiGLU(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoupledBlock(nn.Module):
    def __init__(self, args: qwen2.ModelArgs):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = DecoupledAttention(args)
        self.mlp = SwiGLU(D, args.intermediate_size)
        self.moe_mlp = SwiGLU(D, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(D, eps=eps)
        self.moe_input_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=eps)
        self.moe_post_attention_layernorm = nn.RMSNorm(D, eps=eps)

    def __call__(self, x, vision=None, mask=None, cache=None) -> mx.array:
        if x.shape[1] == 1:
            vision = None  # one-token decoding steps use the text weights, as the reference
        h = by_modality(self.input_layernorm, self.moe_input_layernorm, x, vision)
        x = x + self.self_attn(h, vision, mask, cache)
        h = by_modality(self.post_attention_layernorm, self.moe_post_attention_layernorm, x, vision)
        return x + by_modality(self.mlp, self.moe_mlp, h, vision)


class DecoupledQwen2(nn.Module):
    def __init__(self, args: qwen2.ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoupledBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class DecoupledLanguageModel(nn.Module):
    """Qwen2 with per-modality weights; `vision` (B, L, 1) bool marks vision tokens."""

    def __init__(self, args: qwen2.ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoupledQwen2(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, inputs, cache=None, input_embeddings=None, vision=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.model.embed_tokens(inputs)
        cache = cache or [None] * len(self.model.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.model.layers, cache):
            h = layer(h, vision, mask, c)
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)


# EVEv2 nn.Sequential indices of the conv stem
STEM_NAMES = {"vision_tower.patch_embedding.0.": "vision_tower.patch_conv.",
                 "vision_tower.patch_embedding.2.": "vision_tower.merge_conv."}


def to_channels_last(v: mx.array, expected: tuple) -> mx.array:
    """A torch (O, I, kh, kw) conv weight -> MLX's (O, kh, kw, I); MLX ones pass."""
    O, kh, kw, I = expected
    if tuple(v.shape) == (O, I, kh, kw) and tuple(v.shape) != tuple(expected):
        return v.transpose(0, 2, 3, 1)
    return v
