"""EVE v1 (`model_type` "eve"): an encoder-free VLM. A patch-embedding layer
(conv stem, 2x2 local cross-attention, a global CLS cross-attention, a split
token after every row) and a 2-layer GELU projector feed a LLaMA/Vicuna decoder
(mlx-lm). There is no vision encoder at inference; the patch-aligning layer and
the frozen teacher used in training live in `training/eve_align.py` (the CLIP
tower in `clip.py`). EVEv2 is `eve_v2.py`.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask

from .base import (
    BaseModelArgs, MLPProjector, ProcessedInputs, VisionLanguageModel, scatter_features, text_config_for_mlx_lm,
)

LAYOUTS = (
    "Hub release (model.*, model.vision_tower.*, model.mm_projector.*; .bin shards or safetensors)",
    "this project's converted folders",
)
IMAGE_TOKEN_INDEX = -200  # what the reference's `tokenizer_image_token` puts for <image>

# Keys of released checkpoints that only training uses (the frozen CLIP teacher,
# registered twice, and the patch-aligning layer).
TRAINING_ONLY_PREFIXES = ("vision_clip.", "vision_tower_compressor.")


def with_text_config(params: dict) -> dict:
    """EVE's config.json keeps the decoder's fields at its top level."""
    return {**params, "text_config": params.get("text_config", params)}


def decoder_args(text_config: dict, lm):
    """mlx-lm `ModelArgs` of the decoder module `lm` (llama, qwen2)."""
    cfg = text_config_for_mlx_lm(text_config, text_config.get("tie_word_embeddings", False))
    return lm.ModelArgs.from_dict({**cfg, "model_type": lm.__name__.rsplit(".", 1)[-1]})


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict
    model_type: str = "eve"
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_tower: str = "openai/eve-patch14-anypixel-672"
    mm_vision_tower_clip: Optional[str] = None
    mm_use_im_start_end: bool = False
    patch_stride: int = 14
    conv_stride: int = 2
    vision_num_heads: int = 8
    image_token_index: int = IMAGE_TOKEN_INDEX

    @classmethod
    def from_dict(cls, params: dict):
        return super().from_dict(with_text_config(params))

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = decoder_args(self.text_config, llama)
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
    layouts = LAYOUTS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.build(args)

    def build(self, args: ModelArgs) -> None:
        self.vision_tower = VisionTokenizer(args)
        # named as in the other families so that `convert -q` leaves it unquantized
        self.multi_modal_projector = MLPProjector(args.mm_hidden_size, args.text_config.hidden_size)
        self.language_model = llama.Model(args.text_config)

    @property
    def layers(self):
        return self.language_model.layers

    def image_tokens(self, pixels: np.ndarray) -> mx.array:
        """(4, S, S) RGB + mask -> (1 + h*(w+1), text hidden) embeddings of one image."""
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
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def logits_and_hidden_states(self, embeddings: mx.array):
        """Causal forward of (B, T, D) embeddings -> logits and the num_layers + 1
        hidden states as transformers lists them (embeddings, the input of each
        later layer, then the final *normed* output), for training's aligner."""
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
            if k.startswith("vision_tower."):
                k, v = self.sanitize_vision_key(k, v)
            elif k.startswith("mm_projector."):
                k = k.replace("mm_projector.0.", "multi_modal_projector.linear_1.")
                k = k.replace("mm_projector.2.", "multi_modal_projector.linear_2.")
            out[k] = v
        if self.args.text_config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out

    def sanitize_vision_key(self, k: str, v: mx.array):
        k = OLD_EMBEDDING_NAMES.get(k, k)
        for old, new in ATTENTION_KEY_NAMES.items():
            k = k.replace(old, new)
        if k == "vision_tower.patch_embedding.weight" and v.ndim == 4 and v.shape[1] == 3:
            v = v.transpose(0, 2, 3, 1)  # (O, C, kh, kw) -> (O, kh, kw, C)
        return k, v


# The reference's nn.Sequential indices inside LocalAttention/GlobalAttention
ATTENTION_KEY_NAMES = {".q.0.": ".q_norm.", ".q.1.": ".q_proj.", ".kv.0.": ".kv_norm.", ".kv.1.": ".kv_proj."}
# Older EVE dumps (EVEv2 before 2025-03) name the CLS/split embeddings this way
OLD_EMBEDDING_NAMES = {"vision_tower.start_embedding": "vision_tower.class_embedding",
                       "vision_tower.end_embedding": "vision_tower.split_embedding"}
