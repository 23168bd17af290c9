"""NaViT training features over packed sequences (Dehghani et al., 2023):
continuous token dropping, resolution sampling, masked attention pooling and
factorized fractional positional embeddings."""

from typing import Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .packing import Pack, segment_ids


def sample_drop_rates(n: int, rng: np.random.Generator, max_rate: float = 0.5, beta=(2.0, 2.0)) -> np.ndarray:
    """Per-image drop rates from a scaled Beta distribution."""
    return max_rate * rng.beta(*beta, size=n)


def drop_tokens(pack: Pack, drop_rates: Sequence[float], rng: np.random.Generator) -> Pack:
    """Keep `max(1, round(L * (1 - r)))` random tokens of each segment, in order.

    Positions travel with the kept tokens, so positional encodings stay right;
    the grids are kept as they were, for the record.
    """
    lengths = np.diff(pack.cu_seqlens)
    if len(drop_rates) != len(lengths):
        raise ValueError(f"{len(drop_rates)} drop rates for {len(lengths)} segments")
    keep_idx, new_lengths = [], []
    for start, n, r in zip(pack.cu_seqlens[:-1], lengths, drop_rates):
        if not 0 <= r < 1:
            raise ValueError(f"drop rate {r} outside [0, 1)")
        k = max(1, int(round(n * (1 - r))))
        keep_idx.append(start + np.sort(rng.choice(n, size=k, replace=False)))
        new_lengths.append(k)
    idx = np.concatenate(keep_idx)
    cu = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int32)
    return Pack(pack.patches[idx], pack.grids, cu, pack.positions[idx])


def sample_resolution(
    height: int, width: int, rng: np.random.Generator,
    min_side: int = 64, max_side: int = 512, multiple: int = 28,
) -> Tuple[int, int]:
    """A new (height, width) with the same aspect ratio whose long side is drawn
    uniformly from [min_side, max_side], rounded to `multiple`."""
    long_side = rng.uniform(min_side, max_side)
    scale = long_side / max(height, width)
    snap = lambda x: max(multiple, int(round(x * scale / multiple)) * multiple)
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
