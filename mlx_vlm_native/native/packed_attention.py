"""Attention restricted to segments of a packed sequence (block-diagonal).

q, k, v are (T, H, D) with `cu_seqlens` (S+1,) segment boundaries. Paths:
- "dense": one `scaled_dot_product_attention` with a (T, T) block-diagonal mask;
  simple, but its cost and memory follow T^2;
- "segmented": one batched attention per run of consecutive equal-length
  segments (no gather, no T x T mask; cost follows the sum of L_i^2);
- "kernel": the native varlen kernels (`mlx_vlm_native.native`, Metal or CUDA),
  differentiable through their own backward; "auto" picks them on a GPU once
  they are validated there, else "segmented".

Models hold a `PackedAttention` layer rather than calling the function, so the
CPU backend (`native/cpu_backend.py`) can give it a NumPy softmax when the model
is loaded; the model code does not know which one it has.
"""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import native
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


def equal_length_runs(cu_seqlens):
    """(start, segment length, count) of each run of consecutive segments of
    one length: such a run is a contiguous (count * length) block of tokens."""
    cu = np.asarray(cu_seqlens).tolist()
    runs = []
    for a, b in zip(cu[:-1], cu[1:]):
        if runs and runs[-1][1] == b - a:
            runs[-1][2] += 1
        else:
            runs.append([a, b - a, 1])
    return [tuple(r) for r in runs]


def softmax_rows(*scores) -> list:
    """The softmax over the last axis of each array."""
    return [mx.softmax(s, axis=-1, precise=True) for s in scores]


def segmented_attention(q, k, v, cu_seqlens, scale: float, softmax=softmax_rows) -> mx.array:
    """Each run of consecutive equal-length segments (frames of a video,
    same-size images, Qwen2.5-VL windows) is one batch, reshaped in place (no
    gather); the softmax of all of them in one `softmax(*scores)` call."""
    T, H, D = q.shape
    runs = equal_length_runs(cu_seqlens)

    def batch(x, a, n, m):  # tokens a .. a + n*m -> (m, H, n, D)
        return x[a : a + n * m].reshape(m, n, H, -1).transpose(0, 2, 1, 3)

    scores = [(batch(q, a, n, m) * scale) @ batch(k, a, n, m).swapaxes(-1, -2) for a, n, m in runs]
    probs = softmax(*scores)
    outputs = [(p @ batch(v, a, n, m)).transpose(0, 2, 1, 3).reshape(n * m, H, -1)
               for p, (a, n, m) in zip(probs, runs)]
    return mx.concatenate(outputs) if len(outputs) > 1 else outputs[0]


def packed_attention(
    q: mx.array, k: mx.array, v: mx.array, cu_seqlens, scale: Optional[float] = None,
    path: Optional[str] = None, softmax=softmax_rows,
) -> mx.array:
    """Softmax attention within each segment of a packed (T, H, D) sequence.

    `path` forces "dense", "segmented" or "kernel"; the environment variable
    MLX_VLM_NATIVE_ATTENTION does the same for debugging. "auto" uses the GPU
    kernels when work runs on a GPU whose kernels passed validation for this
    head dim and dtype, else "segmented" (its softmax: `softmax`). A forced
    "kernel" runs the validated GPU kernels, else their pure-MLX reference.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    path = path or os.environ.get("MLX_VLM_NATIVE_ATTENTION") or "auto"
    cu = np.asarray(cu_seqlens)
    if cu[0] != 0 or cu[-1] != q.shape[0] or np.any(np.diff(cu) <= 0):
        raise ValueError(f"cu_seqlens must rise from 0 to {q.shape[0]} in positive steps, got {cu.tolist()}")
    kernels = native.kernels_apply(q) if path in ("auto", "kernel") else False
    if path == "auto":
        path = "kernel" if kernels else "segmented"
    if path == "kernel":
        return native.varlen_attention(q, k, v, cu, scale, backend=native.gpu_backend() if kernels else "reference")
    if path == "dense":
        return dense_attention(q, k, v, cu, scale)
    if path == "segmented":
        return segmented_attention(q, k, v, cu, scale, softmax)
    raise ValueError(f"unknown attention path {path!r}; choose one of {PATHS}")


class PackedAttention(nn.Module):
    """`packed_attention` as a layer (no parameters) of the models that pack."""

    softmax = staticmethod(softmax_rows)

    def __call__(self, q, k, v, cu_seqlens, scale: Optional[float] = None) -> mx.array:
        return packed_attention(q, k, v, cu_seqlens, scale, softmax=self.softmax)
