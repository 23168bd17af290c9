"""EVE: encoder-free VLMs.

EVE v1 (`model_type` "eve"): a patch-embedding layer (conv stem, 2x2 local
cross-attention, a global CLS cross-attention, a split token after every row)
and a 2-layer GELU projector feed a LLaMA/Vicuna decoder (mlx-lm). There is no
vision encoder at inference; the patch-aligning layer and the frozen teacher
used in training live in `training/eve_align.py` (the CLIP tower in `clip.py`).

EVEv2 ("eve-qwen2"): a two-conv stem (16 px, GELU, 2x2) with the same CLS and
split tokens feeds a Qwen2.5 decoder whose norms, attention projections and
MLPs have a second, vision copy: each token uses the copy of its modality
("modality-decoupled"); attention itself is shared.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, qwen2
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.base import create_attention_mask

from .base import (
    BaseModelArgs, MLPProjector, ProcessedInputs, VisionLanguageModel, scatter_features, text_config_for_mlx_lm,
)

LAYOUTS = (
    "Hub release (model.*, model.vision_tower.*, model.mm_projector.*; .bin shards or safetensors)",
    "EVEv2 before 2025-03 (start_embedding/end_embedding)",
    "this project's converted folders",
)
IMAGE_TOKEN_INDEX = -200  # what the reference's `tokenizer_image_token` puts for <image>

# Keys of released checkpoints that only training uses (the frozen CLIP teacher,
# registered twice, and the patch-aligning layer).
TRAINING_ONLY_PREFIXES = ("vision_clip.", "vision_tower_compressor.")


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict
    model_type: str = "eve"
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_tower: str = "openai/eve-patch14-anypixel-672"
    mm_vision_tower_clip: Optional[str] = None
    mm_use_im_start_end: bool = False
    patch_stride: Optional[int] = None  # 14 for v1, 16 for v2
    conv_stride: int = 2
    vision_num_heads: int = 8
    image_token_index: int = IMAGE_TOKEN_INDEX
    # EVEv2
    vision_tower_hidden_size: Optional[int] = None  # else mm_hidden_size, which EVEv2's trainer writes
    add_moe: bool = True
    moe_part: str = "layernorm-self_attn-mlp"

    @property
    def is_v2(self) -> bool:
        return self.model_type == "eve-qwen2"

    @classmethod
    def from_dict(cls, params: dict):
        # the LLaMA fields sit at the top level of EVE's config.json
        return super().from_dict({**params, "text_config": params.get("text_config", params)})

    def __post_init__(self):
        if self.patch_stride is None:
            self.patch_stride = 16 if self.is_v2 else 14
        if isinstance(self.text_config, dict):
            cfg = text_config_for_mlx_lm(
                self.text_config, self.text_config.get("tie_word_embeddings", False)
            )
            lm = qwen2 if self.is_v2 else llama
            self.text_config = lm.ModelArgs.from_dict({**cfg, "model_type": "qwen2" if self.is_v2 else "llama"})
        if self.is_v2:
            if self.vision_tower_hidden_size is None:
                self.vision_tower_hidden_size = self.mm_hidden_size
            if not self.add_moe or self.moe_part != "layernorm-self_attn-mlp":
                raise ValueError(
                    f"EVEv2 with add_moe={self.add_moe}, moe_part={self.moe_part!r} is not supported: "
                    "the releases use add_moe=True, moe_part='layernorm-self_attn-mlp'"
                )
            return
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(
                f"unsupported mm_projector_type {self.mm_projector_type!r}: EVE v1 uses 'mlp2x_gelu'"
            )
        if self.mm_use_im_start_end:
            raise ValueError("mm_use_im_start_end=True is not supported (EVE v1 releases use False)")
        if self.mm_hidden_size % self.vision_num_heads:
            raise ValueError(
                f"mm_hidden_size {self.mm_hidden_size} is not divisible by "
                f"{self.vision_num_heads} heads"
            )


class CrossAttention(nn.Module):
    """Each query attends to its own set of keys (CA1: a 2x2 window; CA2: all
    tokens). Both use the full width for the scale, as the reference does."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dims**-0.5
        self.q_norm = nn.LayerNorm(dims)
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.kv_norm = nn.LayerNorm(dims)
        self.kv_proj = nn.Linear(dims, 2 * dims, bias=False)
        self.proj = nn.Linear(dims, dims)

    def __call__(self, queries: mx.array, keys: mx.array) -> mx.array:
        """queries (N, C), keys (N, M, C) -> queries + attention output, (N, C)."""
        N, M, C = keys.shape
        h = self.num_heads
        q = self.q_proj(self.q_norm(queries)).reshape(N, h, 1, C // h)
        kv = self.kv_proj(self.kv_norm(keys)).reshape(N, M, 2, h, C // h)
        k = kv[:, :, 0].transpose(0, 2, 1, 3)  # (N, h, M, C/h)
        v = kv[:, :, 1].transpose(0, 2, 1, 3)
        attn = mx.softmax((q * self.scale * k).sum(-1), axis=-1, precise=True)  # (N, h, M)
        out = (attn[..., None] * v).sum(axis=2).reshape(N, C)
        return queries + self.proj(out)


class VisionTokenizer(nn.Module):
    """The patch-embedding layer: pixels of one image -> [CLS] + rows with <SPL>."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        C = args.mm_hidden_size
        self.patch_stride = args.patch_stride
        self.conv_stride = args.conv_stride
        self.patch_embedding = nn.Conv2d(3, C, args.patch_stride, args.patch_stride, bias=False)
        self.class_embedding = mx.zeros((C,))
        self.split_embedding = mx.zeros((C,))
        self.local_attention = CrossAttention(C, args.vision_num_heads)
        self.global_attention = CrossAttention(C, args.vision_num_heads)

    def valid_region(self, mask: np.ndarray) -> Tuple[slice, slice]:
        """Rows/cols of the patch grid covered by the 0/1 validity mask (S, S)."""
        p = self.patch_stride
        S = mask.shape[0] - mask.shape[0] % p
        patch_mask = mask[:S, :S].reshape(S // p, p, S // p, p).mean(axis=(1, 3))
        if not np.all((patch_mask == 0) | (patch_mask == 1)):
            raise ValueError(
                f"the image mask does not align with the {p}-px patch grid: "
                "pad with the EVE processor"
            )
        rows, cols = np.nonzero(patch_mask)
        if len(rows) == 0:
            raise ValueError("the image mask is empty: no valid pixels")
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def grid(self, pixels: np.ndarray) -> mx.array:
        """(4, S, S) RGB + mask -> CA1 tokens as a (h, w, C) grid."""
        rows, cols = self.valid_region(pixels[3])
        rgb = mx.array(pixels[:3].transpose(1, 2, 0)[None]).astype(self.class_embedding.dtype)
        feats = self.patch_embedding(rgb)[0, rows, cols]  # (H, W, C)
        s = self.conv_stride
        h, w = feats.shape[0] // s, feats.shape[1] // s
        if h == 0 or w == 0:
            raise ValueError(f"the image's valid region is smaller than {s}x{s} patches")
        C = feats.shape[-1]
        windows = feats[: h * s, : w * s].reshape(h, s, w, s, C).transpose(0, 2, 1, 3, 4)
        windows = windows.reshape(h * w, s * s, C)
        pooled = windows.mean(axis=1)
        return self.local_attention(pooled, windows).reshape(h, w, C)

    def __call__(self, pixels: np.ndarray) -> mx.array:
        """(4, S, S) -> (1 + h*(w+1), C) tokens: CLS first, <SPL> ending each row."""
        grid = self.grid(pixels)
        h, w, C = grid.shape
        cls = self.global_attention(self.class_embedding[None], grid.reshape(1, h * w, C))
        split = mx.broadcast_to(self.split_embedding, (h, 1, C))
        rows = mx.concatenate([grid, split], axis=1).reshape(h * (w + 1), C)
        return mx.concatenate([cls, rows])


class Model(VisionLanguageModel):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        if args.is_v2:
            self.vision_tower = VisionTokenizerV2(args)
            self.language_model = DecoupledLanguageModel(args.text_config)
        else:
            self.vision_tower = VisionTokenizer(args)
            # named as in the other families so that `convert -q` leaves it unquantized
            self.multi_modal_projector = MLPProjector(args.mm_hidden_size, args.text_config.hidden_size)
            self.language_model = llama.Model(args.text_config)

    @property
    def layers(self):
        return self.language_model.layers

    def image_tokens(self, pixels: np.ndarray) -> mx.array:
        """(4, S, S) (v1) or (3, H, W) (v2) -> (1 + h*(w+1), text hidden)
        embeddings of one image."""
        if self.args.is_v2:
            return self.vision_tower(pixels)
        return self.multi_modal_projector(self.vision_tower(pixels))

    def encode_vision(self, batch: Sequence[ProcessedInputs]) -> List[Optional[mx.array]]:
        """The tokens of each prompt's images, image by image."""
        return [mx.concatenate([self.image_tokens(p) for p in inputs.pixel_values]) if inputs.pixel_values else None
                for inputs in batch]

    def get_input_embeddings(self, inputs: ProcessedInputs, vision_features: Optional[mx.array] = None):
        """(1, L, D) embeddings, each image's tokens at its placeholders; 1-D positions (None)."""
        if inputs.video_frames:
            raise ValueError("EVE does not take videos")
        ids = np.asarray(inputs.input_ids)
        is_image = ids == self.args.image_token_index
        embeds = self.language_model.model.embed_tokens(mx.array(np.where(is_image, 0, ids)))
        if vision_features is None:
            vision_features = self.encode_vision([inputs])[0]
        if vision_features is not None:
            embeds = scatter_features(embeds, is_image, vision_features)
        elif is_image.any():
            raise ValueError("the prompt has image placeholders but no image was given")
        return embeds[None], None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, positions=None) -> mx.array:
        if self.args.is_v2:
            # the image placeholders in `inputs` tell which positions use the vision weights
            vision = None
            if input_embeddings is not None and inputs.shape[-1] == input_embeddings.shape[1]:
                is_image = inputs == self.args.image_token_index
                vision = is_image[..., None] if is_image.any().item() else None
            return self.language_model(inputs, cache, input_embeddings, vision)
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def logits_and_hidden_states(self, embeddings: mx.array):
        """Causal forward of (B, T, D) embeddings -> logits and the num_layers + 1
        hidden states as transformers lists them (embeddings, the input of each
        later layer, then the final *normed* output). EVE v1 only (training)."""
        if self.args.is_v2:
            raise NotImplementedError("EVEv2 training (no aligning layer) is not implemented")
        lm = self.language_model
        h, states = embeddings, [embeddings]
        mask = create_attention_mask(h, None)
        for layer in lm.model.layers:
            h = layer(h, mask)
            states.append(h)
        h = lm.model.norm(h)
        states[-1] = h
        if lm.args.tie_word_embeddings:
            return lm.model.embed_tokens.as_linear(h), states
        return lm.lm_head(h), states

    def sanitize(self, weights: dict) -> dict:
        """Reference (`EVELlamaForCausalLM`, `EVEQwen2ForCausalLM`) keys -> this
        module's; MLX keys pass unchanged."""
        out = {}
        for k, v in weights.items():
            if "rotary_emb.inv_freq" in k:
                continue
            if k.startswith("model."):
                k = k[len("model.") :]
                if k.startswith(TRAINING_ONLY_PREFIXES):
                    continue
                if not k.startswith(("vision_tower.", "mm_projector.")):  # the decoder
                    k = "language_model.model." + k
            elif k == "lm_head.weight":
                k = "language_model.lm_head.weight"
            if k.startswith("vision_tower.") and self.args.is_v2:
                k = OLD_EMBEDDING_NAMES.get(k, k)
                for old, new in V2_STEM_NAMES.items():
                    k = k.replace(old, new)
                if k.endswith("_conv.weight"):
                    v = to_channels_last(v, getattr(self.vision_tower, k.split(".")[1]).weight.shape)
            elif k.startswith("vision_tower."):
                k, v = sanitize_vision_key(k, v)
            elif k.startswith("mm_projector."):
                k = k.replace("mm_projector.0.", "multi_modal_projector.linear_1.")
                k = k.replace("mm_projector.2.", "multi_modal_projector.linear_2.")
            out[k] = v
        if self.args.text_config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out


# The reference's nn.Sequential indices inside LocalAttention/GlobalAttention
ATTENTION_KEY_NAMES = {".q.0.": ".q_norm.", ".q.1.": ".q_proj.", ".kv.0.": ".kv_norm.", ".kv.1.": ".kv_proj."}
# Older EVE dumps (EVEv2 before 2025-03) name the CLS/split embeddings this way
OLD_EMBEDDING_NAMES = {"vision_tower.start_embedding": "vision_tower.class_embedding",
                       "vision_tower.end_embedding": "vision_tower.split_embedding"}


def to_channels_last(v: mx.array, expected: tuple) -> mx.array:
    """A torch (O, I, kh, kw) conv weight -> MLX's (O, kh, kw, I); MLX ones pass."""
    O, kh, kw, I = expected
    if tuple(v.shape) == (O, I, kh, kw) and tuple(v.shape) != tuple(expected):
        return v.transpose(0, 2, 3, 1)
    return v


def sanitize_vision_key(k: str, v: mx.array):
    k = OLD_EMBEDDING_NAMES.get(k, k)
    for old, new in ATTENTION_KEY_NAMES.items():
        k = k.replace(old, new)
    if k == "vision_tower.patch_embedding.weight" and v.ndim == 4 and v.shape[1] == 3:
        v = v.transpose(0, 2, 3, 1)  # (O, C, kh, kw) -> (O, kh, kw, C)
    return k, v


# ------------------------------------------------------------------- EVEv2


class VisionTokenizerV2(nn.Module):
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
V2_STEM_NAMES = {"vision_tower.patch_embedding.0.": "vision_tower.patch_conv.",
                 "vision_tower.patch_embedding.2.": "vision_tower.merge_conv."}

