"""Attention restricted to segments of a packed sequence (block-diagonal).

q, k, v are (T, H, D) with `cu_seqlens` (S+1,) segment boundaries. Paths:
- "dense": one `scaled_dot_product_attention` with a (T, T) block-diagonal mask;
  simple, but its cost and memory follow T^2;
- "segmented": segments grouped by length, one batched SDPA per distinct length;
  no T x T mask, cost follows the sum of L_i^2;
- "kernel": the native varlen kernels (`mlx_vlm_native.native`, Metal or CUDA),
  differentiable through their own backward; "auto" picks them on a GPU.
"""

import os
from typing import Optional

import mlx.core as mx
import numpy as np

from . import native
from .packing import segment_ids

PATHS = ("dense", "segmented", "kernel")


def _heads_first(x: mx.array) -> mx.array:
    return x.transpose(1, 0, 2)[None]  # (T, H, D) -> (1, H, T, D)


def dense_attention(q, k, v, cu_seqlens, scale: float) -> mx.array:
    seg = mx.array(segment_ids(cu_seqlens))
    mask = seg[:, None] == seg[None, :]
    o = mx.fast.scaled_dot_product_attention(
        _heads_first(q), _heads_first(k), _heads_first(v), scale=scale, mask=mask
    )
    return o[0].transpose(1, 0, 2)


def segmented_attention(q, k, v, cu_seqlens, scale: float) -> mx.array:
    cu = np.asarray(cu_seqlens).tolist()
    starts, lengths = cu[:-1], np.diff(cu).tolist()
    by_length = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    outputs = [None] * len(lengths)
    for n, idx in by_length.items():
        take = mx.array(np.concatenate([np.arange(starts[i], starts[i] + n) for i in idx]))

        def batch(x):  # (len(idx), H, n, D)
            return x[take].reshape(len(idx), n, *x.shape[1:]).transpose(0, 2, 1, 3)

        o = mx.fast.scaled_dot_product_attention(batch(q), batch(k), batch(v), scale=scale)
        o = o.transpose(0, 2, 1, 3)
        for j, i in enumerate(idx):
            outputs[i] = o[j]
    return mx.concatenate(outputs) if len(outputs) > 1 else outputs[0]


def packed_attention(
    q: mx.array, k: mx.array, v: mx.array, cu_seqlens, scale: Optional[float] = None,
    path: Optional[str] = None,
) -> mx.array:
    """Softmax attention within each segment of a packed (T, H, D) sequence.

    `path` forces "dense", "segmented" or "kernel"; the environment variable
    MLX_VLM_NATIVE_ATTENTION does the same for debugging. "auto" uses the GPU
    kernels when this machine has them (and they support the head dim and dtype),
    else "segmented".
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    path = path or os.environ.get("MLX_VLM_NATIVE_ATTENTION") or "auto"
    cu = np.asarray(cu_seqlens)
    if cu[0] != 0 or cu[-1] != q.shape[0] or np.any(np.diff(cu) <= 0):
        raise ValueError(f"cu_seqlens must rise from 0 to {q.shape[0]} in positive steps, got {cu.tolist()}")
    if path == "auto":
        path = "kernel" if native.kernels_apply(q) else "segmented"
    if path == "kernel":
        return native.varlen_attention(q, k, v, cu, scale, backend=native.gpu_backend() or "reference")
    if path == "dense":
        return dense_attention(q, k, v, cu, scale)
    if path == "segmented":
        return segmented_attention(q, k, v, cu, scale)
    raise ValueError(f"unknown attention path {path!r}; choose one of {PATHS}")
