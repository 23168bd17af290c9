"""Qwen2-VL / Qwen2.5-VL vision tower: a NaViT-style ViT over packed
native-resolution patches with 2-D rotary embeddings, attention inside each
image only, and a 2x2 patch merger into the language model's width.

Qwen2.5-VL adds RMSNorm, a SwiGLU MLP and windowed attention (windows of
`window_size` pixels) in all blocks but `fullatt_block_indexes`."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import native
from ..native.packed_attention import PackedAttention
from ..native.packing import Pack
from .base import BaseModelArgs, apply_rotary

ACTIVATIONS = {  # as layers: the CPU backend gives quick_gelu and silu a NumPy body at load time
    "quick_gelu": lambda: nn.GELU(approx="fast"), "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approx="precise"), "silu": nn.SiLU,
}


@dataclass
class VisionConfig(BaseModelArgs):
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # the merger's output: the language model width
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_parameters: Optional[dict] = None
    in_chans: Optional[int] = None  # older configs
    # Qwen2.5-VL: hidden_size is the tower width and out_hidden_size the merger's output
    out_hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    window_size: int = 0
    fullatt_block_indexes: tuple = ()
    tokens_per_second: Optional[float] = None  # Qwen2.5-VL video time positions

    def __post_init__(self):
        if self.out_hidden_size is not None:
            self.embed_dim, self.hidden_size = self.hidden_size, self.out_hidden_size
        if self.in_chans is not None:
            self.in_channels = self.in_chans
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError("embed_dim / num_heads must be a multiple of 4 for 2-D RoPE")

    @property
    def windowed(self) -> bool:
        return self.out_hidden_size is not None

    @property
    def rope_theta(self) -> float:
        return (self.rope_parameters or {}).get("rope_theta", 10000.0)


def rope_2d_angles(positions: np.ndarray, head_dim: int, theta: float) -> mx.array:
    """(N, 2) (row, col) -> (N, head_dim) angles: [row freqs, col freqs] twice."""
    quarter = np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2)
    inv_freq = mx.array(1.0 / theta**quarter)
    pos = mx.array(positions).astype(mx.float32)
    hw = mx.concatenate([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], axis=-1)
    return mx.concatenate([hw, hw], axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (N, H, D) rotated in fp32 by per-token angles (rotate-half convention)."""
    return apply_rotary(x.astype(mx.float32), cos[:, None], sin[:, None]).astype(x.dtype)


def rotate_qk(q: mx.array, k: mx.array, cos: mx.array, sin: mx.array):
    """`apply_rope` on q and k; on a GPU whose fused kernel passed validation,
    both in one launch of it (`native.rope_2d`)."""
    if native.rope_applies(q):
        return native.rope_2d(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def window_index(grids, merge: int, window_size: int, patch_size: int):
    """Qwen2.5-VL windows: the order of merged (2x2) units that groups them into
    windows of `window_size` pixels, row-major within each frame, and the
    windows' cu_seqlens in patch tokens."""
    side = window_size // merge // patch_size
    order, cu, offset = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        for f in range(t):
            units = offset + f * gh * gw + np.arange(gh * gw).reshape(gh, gw)
            for r in range(0, gh, side):
                for q in range(0, gw, side):
                    window = units[r : r + side, q : q + side].reshape(-1)
                    order.append(window)
                    cu.append(cu[-1] + window.size * merge * merge)
        offset += t * gh * gw
    return np.concatenate(order), np.asarray(cu, dtype=np.int32)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attend = PackedAttention()

    def __call__(self, x, cu_seqlens, cos, sin):
        N, D = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.num_heads, -1).transpose(1, 0, 2, 3)
        q, k = rotate_qk(q, k, cos, sin)
        return self.proj(self.attend(q, k, v, cu_seqlens).reshape(N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]()

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def make_norm(c: VisionConfig, dim: int):
    return nn.RMSNorm(dim, eps=1e-6) if c.windowed else nn.LayerNorm(dim, eps=1e-6)


class Block(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(c, c.embed_dim)
        self.norm2 = make_norm(c, c.embed_dim)
        self.attn = Attention(c.embed_dim, c.num_heads)
        if c.windowed:
            self.mlp = GatedMLP(c.embed_dim, c.intermediate_size, c.hidden_act)
        else:
            self.mlp = MLP(c.embed_dim, int(c.embed_dim * c.mlp_ratio), c.hidden_act)

    def __call__(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The Conv3d with stride = kernel is a matmul over (C, T, P, P) rows."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(c.in_channels * c.temporal_patch_size * c.patch_size**2, c.embed_dim, bias=False)

    def __call__(self, patches):
        return self.proj(patches.astype(self.proj.weight.dtype))


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig, out_dim: Optional[int] = None):
        super().__init__()
        width = c.embed_dim * c.spatial_merge_size**2
        self.ln_q = make_norm(c, c.embed_dim)
        self.mlp = [nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim or c.hidden_size)]

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.mlp[0].weight.shape[1])  # 2x2 blocks are consecutive
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig, merger: bool = True):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = [Block(config) for _ in range(config.depth)]
        if merger:
            self.merger = PatchMerger(config)

    def __call__(self, pack: Pack, merge: bool = True) -> mx.array:
        """One call for the whole pack: (N, patch dim) -> (N / 4, out) merged tokens."""
        for out in self.steps(pack, merge, evaluate=False):
            pass
        return out

    def steps(self, pack: Pack, merge: bool = True, evaluate: bool = True):
        """The call block by block: yields None after the patch embedding and
        after each block (evaluated, with `evaluate`, so that each step is
        bounded work), then the output."""
        c = self.config
        x = self.patch_embed(mx.array(pack.patches))
        angles = rope_2d_angles(pack.positions, c.embed_dim // c.num_heads, c.rope_theta)
        order = None
        cu_windows = pack.cu_seqlens
        if c.windowed:  # run in window order (whole 2x2 units moved), undo after merging
            unit = c.spatial_merge_size**2
            order, cu_windows = window_index(pack.grids, c.spatial_merge_size, c.window_size, c.patch_size)
            token_order = mx.array((order[:, None] * unit + np.arange(unit)).reshape(-1))
            x, angles = x[token_order], angles[token_order]
        cos, sin = mx.cos(angles), mx.sin(angles)
        if evaluate:  # the patch embedding is a step of its own
            mx.eval(x, cos, sin)
            yield None
        for i, block in enumerate(self.blocks):
            full = not c.windowed or i in c.fullatt_block_indexes
            x = block(x, pack.cu_seqlens if full else cu_windows, cos, sin)
            if evaluate:
                mx.eval(x)
                yield None
        if order is None:
            yield self.merger(x) if merge else x
        elif not merge:
            yield x[mx.array(np.argsort(token_order))]
        else:
            yield self.merger(x)[mx.array(np.argsort(order))]

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            if k.startswith("visual."):
                k = k[len("visual.") :]
            if k == "patch_embed.proj.weight" and v.ndim == 5:
                v = patch_embed_rows(v, self.config)
            out[k] = v
        return out


def patch_embed_rows(w: mx.array, c: VisionConfig) -> mx.array:
    """A Conv3d patch weight as (D, C*T*P*P) rows in the (C, T, P, P) order of
    the patches: torch's (D, C, T, P, P) reshapes; MLX's (D, T, P, P, C) (mlx-vlm
    folders) is transposed first."""
    torch_shape = (c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    mlx_shape = (c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels)
    if tuple(w.shape[1:]) == mlx_shape and mlx_shape != torch_shape:
        w = w.transpose(0, 4, 1, 2, 3)
    elif tuple(w.shape[1:]) != torch_shape:
        raise ValueError(
            f"patch_embed.proj.weight has shape {tuple(w.shape)}: neither torch's "
            f"(D, {', '.join(map(str, torch_shape))}) nor MLX's (D, {', '.join(map(str, mlx_shape))})"
        )
    return w.reshape(w.shape[0], -1)


def patch_embed_mlx_conv(w: mx.array, c: VisionConfig) -> mx.array:
    """(D, C*T*P*P) rows -> the MLX Conv3d weight (D, T, P, P, C) mlx-vlm stores."""
    w = w.reshape(w.shape[0], c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    return w.transpose(0, 2, 3, 4, 1)
