"""NaViT (Dehghani et al., 2023, "Patch n' Pack"): a ViT classifier over packed
sequences of images at their own resolution and aspect ratio, with masked
attention pooling and factorized fractional positional embeddings. Its training
features (continuous token dropping, resolution sampling) are in the task,
`mlx_vlm_native/training/navit.py`.

    tokens = image_tokens(image, patch=16, long_side=128)   # (patches, grid)
    logits = model(pack([tokens, ...], merge=1))             # (images, classes)

Training recipes: `train/navit/`.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..native.packed_attention import PackedAttention
from ..native.packing import Pack, patchify, segment_ids
from .base import BaseModelArgs


def scale_to_long_side(height: int, width: int, long_side: float, multiple: int) -> Tuple[int, int]:
    """(height, width) scaled so the long side is `long_side`, each side rounded
    to a multiple of `multiple` (at least one)."""
    scale = long_side / max(height, width)
    snap = lambda x: max(multiple, int(round(x * scale / multiple)) * multiple)  # noqa: E731
    return snap(height), snap(width)


class FactorizedPositionEmbedding(nn.Module):
    """Separate row and column tables indexed by fractional coordinates
    ((i + 0.5) / size, linearly interpolated), so any resolution maps onto the
    same [0, 1) range and unseen resolutions need no resizing."""

    def __init__(self, dim: int, table_size: int = 64):
        super().__init__()
        self.rows = mx.random.normal((table_size, dim)) * 0.02
        self.cols = mx.random.normal((table_size, dim)) * 0.02

    @staticmethod
    def _lookup(table: mx.array, frac: mx.array) -> mx.array:
        n = table.shape[0]
        x = mx.clip(frac * n - 0.5, 0, n - 1)
        lo = mx.floor(x).astype(mx.int32)
        hi = mx.minimum(lo + 1, n - 1)
        w = (x - lo)[:, None]
        return table[lo] * (1 - w) + table[hi] * w

    def __call__(self, positions: np.ndarray, grid_sizes: np.ndarray) -> mx.array:
        """positions (N, 2) (row, col); grid_sizes (N, 2) the (h, w) of each token's image."""
        frac = (mx.array(positions) + 0.5) / mx.array(grid_sizes)
        return self._lookup(self.rows, frac[:, 0]) + self._lookup(self.cols, frac[:, 1])


def token_grid_sizes(pack: Pack) -> np.ndarray:
    """(N, 2): the (h, w) grid of the image each packed token belongs to."""
    per_segment = [(h, w) for t, h, w in pack.grids for _ in range(t)]
    return np.asarray(per_segment, dtype=np.float32)[segment_ids(pack.cu_seqlens)]


class MaskedAttentionPool(nn.Module):
    """One vector per segment: a learned query attends to that segment's tokens only."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = mx.random.normal((dim,)) * 0.02
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, cu_seqlens: np.ndarray) -> mx.array:
        N, D = x.shape
        H = self.num_heads
        S = len(cu_seqlens) - 1
        seg = mx.array(segment_ids(np.asarray(cu_seqlens)))
        mask = mx.arange(S)[:, None] == seg[None, :]  # (S, N)
        q = mx.broadcast_to(self.query.reshape(1, H, 1, D // H), (1, H, S, D // H))
        k = self.k_proj(x).reshape(1, N, H, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(1, N, H, -1).transpose(0, 2, 1, 3)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // H) ** -0.5, mask=mask)
        return self.out_proj(o[0].transpose(1, 0, 2).reshape(S, D))


# ---------------------------------------------------------------- the classifier

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def image_tokens(image: Image.Image, patch: int, size: Optional[Tuple[int, int]] = None,
                 mean=IMAGE_MEAN, std=IMAGE_STD):
    """A PIL image at `size` (h, w) (default: its own), each side rounded to the
    patch -> (patches (h/p * w/p, 3*p*p), grid (1, h/p, w/p)), rows in raster order."""
    h, w = (max(patch, int(round(s / patch)) * patch) for s in (size or (image.height, image.width)))
    if (image.height, image.width) != (h, w):
        image = image.resize((w, h), Image.BICUBIC)
    x = (np.asarray(image.convert("RGB"), np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return patchify(x.transpose(2, 0, 1)[None], patch=patch, merge=1, temporal=1)


@dataclass
class ModelArgs(BaseModelArgs):
    num_classes: int
    patch_size: int = 16
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    position_table: int = 32  # rows of each fractional position table
    channels: int = 3
    model_type: str = "navit"
    classes: Optional[list] = None  # the label of each output, for the record

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes {self.num_classes}")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attend = PackedAttention()

    def __call__(self, x: mx.array, cu_seqlens: np.ndarray) -> mx.array:
        T, D = x.shape
        q, k, v = self.qkv(x).reshape(T, 3, self.num_heads, D // self.num_heads).transpose(1, 0, 2, 3)
        return self.proj(self.attend(q, k, v, cu_seqlens).reshape(T, D))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def __call__(self, x: mx.array, cu_seqlens: np.ndarray) -> mx.array:
        x = x + self.attn(self.norm1(x), cu_seqlens)
        return x + self.fc2(nn.gelu(self.fc1(self.norm2(x))))


class Model(nn.Module):
    """Packed patches -> one logit vector per segment (image) of the pack.

    Each image attends only to itself; its tokens carry factorized fractional
    positions, so any resolution and aspect ratio map onto the same tables."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        dim, patch_dim = args.hidden_size, args.channels * args.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.position = FactorizedPositionEmbedding(dim, args.position_table)
        self.blocks = [Block(dim, args.num_heads, args.mlp_ratio) for _ in range(args.num_layers)]
        self.norm = nn.LayerNorm(dim)
        self.pool = MaskedAttentionPool(dim, args.num_heads)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, args.num_classes)

    @property
    def layers(self):
        return self.blocks

    def pooled(self, p: Pack) -> mx.array:
        """(segments, hidden): one vector per segment."""
        x = self.embed_norm(self.patch_embed(mx.array(p.patches)))
        x = x + self.position(p.positions, token_grid_sizes(p)).astype(x.dtype)
        for block in self.blocks:
            x = block(x, p.cu_seqlens)
        return self.pool(self.norm(x), p.cu_seqlens)

    def __call__(self, p: Pack) -> mx.array:
        return self.head(self.head_norm(self.pooled(p)))
