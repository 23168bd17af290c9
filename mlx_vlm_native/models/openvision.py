"""OpenVision / OpenVision 2: the ViT encoder, the caption decoder and the
random visual-token masking between them.

ViT: bias-free patch-embedding conv (after an optional 3x3 stride-2 conv stem,
our addition for small models), CLS token, fixed MoCo-v3 2-D sin-cos positions,
no pre-LayerNorm, pre-LN blocks (exact GELU). `tokens` are the last block's
patch outputs (no norm, CLS dropped); `pooled` is LayerNorm(mean of tokens).

Caption decoder: [projected image tokens; text embeddings] through pre-LN
blocks (tanh GELU), no positional embeddings, final LayerNorm and an untied
head. The image/text attention is prefix-LM (image tokens bidirectional) by
default, or fully causal as in the JAX training code.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .base import BaseModelArgs, masked_cross_entropy

# width, depth, mlp, heads (OpenVision src/models/vit.py and text_decoder_v2.py)
VIT_VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}
DECODER_VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (512, 12, 2048, 8),
    "L": (768, 12, 3072, 12),
    "H": (1024, 24, 4096, 16),
    "G": (1664, 48, 8192, 16),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ATTENTION_MASKS = ("prefix", "causal")


@dataclass
class VisionConfig(BaseModelArgs):
    """open_clip's `vision_cfg` keys."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    head_width: int = 64
    mlp_ratio: float = 4.0
    norm_kwargs: dict = field(default_factory=lambda: {"eps": 1e-6})
    # Not in OpenVision: 3x3 stride-2 convolutions (+ReLU) before the patch
    # embedding, which then covers patch_size / 2**len(stem_channels) of their
    # output: a hybrid ViT (as in the ViT paper), which the default model uses.
    stem_channels: Optional[List[int]] = None

    @classmethod
    def from_variant(cls, name: str, image_size: int, patch_size: int) -> "VisionConfig":
        if name not in VIT_VARIANTS:
            raise ValueError(f"unknown ViT variant {name!r}; known: {', '.join(VIT_VARIANTS)}")
        width, depth, mlp, heads = VIT_VARIANTS[name]
        return cls(image_size, patch_size, width, depth, width // heads, mlp / width)

    def __post_init__(self):
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = self.image_size[0]
        if self.width % self.head_width:
            raise ValueError(f"width {self.width} is not a multiple of head_width {self.head_width}")
        if self.stem_channels and self.patch_size % self.stem_stride:
            raise ValueError(
                f"patch_size {self.patch_size} is not a multiple of the conv stem's stride {self.stem_stride}"
            )

    @property
    def stem_stride(self) -> int:
        return 2 ** len(self.stem_channels or [])

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio + 1e-6)

    @property
    def eps(self) -> float:
        return (self.norm_kwargs or {}).get("eps", 1e-6)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class DecoderConfig(BaseModelArgs):
    """`text_decoder_config.json` keys."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = 32000
    vision_width: int = 1024
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    layer_norm_eps: float = 1e-6
    attention_mask: str = "prefix"

    @classmethod
    def from_dict(cls, params: dict) -> "DecoderConfig":
        params = dict(params)
        for short in ("pad", "bos", "eos"):  # the released file spells them both ways
            for alias in (short, f"{short}_id"):
                if alias in params:
                    params.setdefault(f"{short}_token_id", params[alias])
        return super().from_dict(params)

    @classmethod
    def from_variant(cls, name: str, vision_width: int, vocab_size: int, **kw) -> "DecoderConfig":
        if name not in DECODER_VARIANTS:
            raise ValueError(f"unknown decoder variant {name!r}; known: {', '.join(DECODER_VARIANTS)}")
        width, depth, mlp, heads = DECODER_VARIANTS[name]
        return cls(width, depth, heads, mlp, vocab_size, vision_width, **kw)

    def __post_init__(self):
        if self.attention_mask not in ATTENTION_MASKS:
            raise ValueError(
                f"attention_mask must be one of {ATTENTION_MASKS}, got {self.attention_mask!r}"
            )


@dataclass
class ModelArgs(BaseModelArgs):
    vision_config: dict
    decoder_config: Optional[dict] = None
    model_type: str = "openvision2"
    keep_ratio: float = 0.35

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.decoder_config, dict):
            self.decoder_config = DecoderConfig.from_dict(self.decoder_config)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")


def posemb_sincos_2d(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """MoCo-v3 2-D sin-cos table (rows*cols, dim), row-major:
    [sin(x w), cos(x w), sin(y w), cos(y w)], x = column, y = row,
    w_k = temperature^(-k / (dim/4 - 1))."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding width must be a multiple of 4, got {dim}")
    y, x = np.mgrid[:rows, :cols]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def positional_table(grid: int, width: int) -> mx.array:
    """The sin-cos table with the zero row for CLS first, (grid*grid + 1, width)."""
    table = posemb_sincos_2d(grid, grid, width)
    return mx.array(np.concatenate([np.zeros((1, width), np.float32), table]))


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.in_proj = nn.Linear(dims, 3 * dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, D = x.shape
        qkv = self.in_proj(x).reshape(B, L, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, approx_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(dims, hidden)
        self.c_proj = nn.Linear(hidden, dims)
        self.act = nn.gelu_approx if approx_gelu else nn.gelu

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dims: int, heads: int, mlp_dim: int, eps: float, approx_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dims, eps=eps)
        self.attn = Attention(dims, heads)
        self.ln_2 = nn.LayerNorm(dims, eps=eps)
        self.mlp = MLP(dims, mlp_dim, approx_gelu)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class StemConv(nn.Module):
    """3x3 stride-2 convolution (padding 1) with nn.Conv2d's (O, 3, 3, I) weight,
    computed as gathered 3x3 neighbourhoods times the weight: one matmul, several
    times faster than nn.Conv2d forward+backward on MLX's CPU backend."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # He init: the ReLU stack keeps the pixels' scale, so the patch embedding
        # starts as strong as it is without a stem (nn.Conv2d's init shrinks it ~8x)
        self.weight = mx.random.normal((out_channels, 3, 3, in_channels)) * (2 / (9 * in_channels)) ** 0.5
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        _, H, W, _ = x.shape
        x = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        patches = [x[:, dy:dy + H:2, dx:dx + W:2, :] for dy in range(3) for dx in range(3)]
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return mx.concatenate(patches, axis=-1) @ weight.T.astype(x.dtype) + self.bias.astype(x.dtype)


def fused_qkv_key(key: str) -> str:
    """torch MultiheadAttention's `in_proj_weight/bias` -> our `in_proj` Linear."""
    return key.replace("attn.in_proj_weight", "attn.in_proj.weight").replace(
        "attn.in_proj_bias", "attn.in_proj.bias"
    )


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        c = config
        channels = [3] + list(c.stem_channels or [])
        self.stem = [StemConv(i, o) for i, o in zip(channels, channels[1:])]
        patch = c.patch_size // c.stem_stride
        self.conv1 = nn.Conv2d(channels[-1], c.width, patch, stride=patch, bias=False)
        self.class_embedding = mx.zeros((c.width,))
        # Fixed (not trained) but stored: released checkpoints keep the JAX table.
        self.positional_embedding = positional_table(c.grid, c.width)
        self.blocks = [Block(c.width, c.heads, c.mlp_dim, c.eps, False) for _ in range(c.layers)]
        self.ln_post = nn.LayerNorm(c.width, eps=c.eps)
        self.freeze(keys=["positional_embedding"], recurse=False)

    def __call__(self, pixels: mx.array, layer: int = -1):
        """(B, H, W, 3) normalised pixels -> dict(tokens (B, N, W), pooled (B, W)),
        from the output of block `layer` (default: the last)."""
        x = pixels
        for conv in self.stem:
            x = nn.relu(conv(x))
        x = self.conv1(x)
        B, gh, gw, W = x.shape
        x = x.reshape(B, gh * gw, W)
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (B, 1, W))
        x = mx.concatenate([cls, x], axis=1)
        table = self.positional_embedding
        if table.shape[0] != gh * gw + 1:
            table = mx.array(np.concatenate([np.zeros((1, W), np.float32), posemb_sincos_2d(gh, gw, W)]))
        x = x + table.astype(x.dtype)
        for block in self.blocks[: layer % len(self.blocks) + 1]:
            x = block(x)
        tokens = x[:, 1:]
        return {"tokens": tokens, "pooled": self.ln_post(tokens.mean(axis=1))}

    def set_image_size(self, image_size: int) -> None:
        """Regenerate the positional table for a new resolution (stage 2)."""
        self.config.image_size = image_size
        self.positional_embedding = positional_table(self.config.grid, self.config.width)
        self.freeze(keys=["positional_embedding"], recurse=False)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """open_clip's `VisionTransformer` state dict (optionally `visual.`-prefixed)."""
        out = {}
        for k, v in weights.items():
            if k.startswith("visual."):
                k = k[len("visual.") :]
            if k in ("proj", "ln_pre.weight", "ln_pre.bias") or k.startswith("attn_pool"):
                continue  # OV2 has no trained head; tokens never see ln_pre/proj
            k = fused_qkv_key(k.replace("transformer.resblocks.", "blocks."))
            if k == "conv1.weight" and v.ndim == 4 and v.shape[1] == 3:
                v = v.transpose(0, 2, 3, 1)  # OIHW -> OHWI
            out[k] = v
        return out


def caption_attention_mask(num_image: int, num_text: int, kind: str) -> mx.array:
    """Boolean (L, L) mask over [image; text]: True where attention is allowed.

    prefix: image<->image, text->image and causal text->text; image never sees text.
    causal: one causal mask over the whole sequence."""
    L = num_image + num_text
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    causal = j <= i
    if kind == "causal":
        return mx.array(causal)
    if kind != "prefix":
        raise ValueError(f"attention mask must be one of {ATTENTION_MASKS}, got {kind!r}")
    return mx.array(causal | (j < num_image))


class CaptionDecoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.image_projection = nn.Linear(c.vision_width, c.width, bias=False)
        self.blocks = [
            Block(c.width, c.num_heads, c.mlp_dim, c.layer_norm_eps, True) for _ in range(c.depth)
        ]
        self.ln_final = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)

    def __call__(self, image_tokens: mx.array, text: mx.array, cache=None) -> mx.array:
        """(B, M, vision_width) tokens and (B, T) ids -> (B, T, vocab) logits.

        With a cache, the first call must carry the image tokens (prefill) and
        later calls only new text (image_tokens=None)."""
        txt = self.token_embedding(text)
        if image_tokens is None:
            x, M, mask = txt, 0, None
        else:
            img = self.image_projection(image_tokens.astype(txt.dtype))
            M = img.shape[1]
            x = mx.concatenate([img, txt], axis=1)
            mask = caption_attention_mask(M, text.shape[1], self.config.attention_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if cache is None else cache[i])
        return self.lm_head(self.ln_final(x[:, M:]))


def mask_image_tokens(tokens: mx.array, keep_ratio: float, key: Optional[mx.array] = None) -> mx.array:
    """Keep int(N * keep_ratio) distinct tokens per sample, chosen uniformly
    without replacement and returned in random order, with one gather."""
    B, N, D = tokens.shape
    keep = int(N * keep_ratio)
    if keep >= N:
        return tokens
    if keep < 1:
        raise ValueError(f"keep_ratio {keep_ratio} keeps no token out of {N}")
    order = mx.argsort(mx.random.uniform(shape=(B, N), key=key), axis=1)[:, :keep]
    return mx.take_along_axis(tokens, order[..., None], axis=1)


def caption_loss(logits: mx.array, targets: mx.array, pad_token_id: int):
    """(token-mean cross-entropy over non-pad targets, number of such targets)."""
    return masked_cross_entropy(logits, targets, targets != pad_token_id)


class Model(nn.Module):
    """OpenVision 2: encoder (`vision`) + optional caption decoder (`decoder`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.vision = VisionTransformer(args.vision_config)
        if args.decoder_config is not None:
            if args.decoder_config.vision_width != args.vision_config.width:
                raise ValueError(
                    f"decoder vision_width {args.decoder_config.vision_width} != "
                    f"encoder width {args.vision_config.width}"
                )
            self.decoder = CaptionDecoder(args.decoder_config)

    @property
    def layers(self):
        blocks = list(self.vision.blocks)
        if "decoder" in self:
            blocks += list(self.decoder.blocks)
        return blocks

    def __call__(self, pixels: mx.array, text: mx.array, key=None, keep_ratio=None) -> mx.array:
        """Caption logits for decoder inputs `text` (B, T) given images."""
        if "decoder" not in self:
            raise ValueError("this OpenVision checkpoint has no caption decoder")
        tokens = self.vision(pixels)["tokens"]
        ratio = self.args.keep_ratio if keep_ratio is None else keep_ratio
        return self.decoder(mask_image_tokens(tokens, ratio, key), text)

    def loss(self, pixels: mx.array, captions: mx.array, key=None, keep_ratio=None):
        """captions (B, T) = [bos] text [eos] pad...; next-token CE over non-pad."""
        logits = self(pixels, captions[:, :-1], key=key, keep_ratio=keep_ratio)
        return caption_loss(logits, captions[:, 1:], self.args.decoder_config.pad_token_id)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """MLX layout (`vision.*`, `decoder.*`) passes through; open_clip visual
        keys go to `vision.`, caption-decoder keys (`token_embedding`, ...) to `decoder.`."""
        if any(k.startswith(("vision.", "decoder.")) for k in weights):
            return dict(weights)
        return {"vision." + k: v for k, v in VisionTransformer.sanitize(weights).items()}
