"""Packed varlen attention: q, k, v (T, H, D) attend within the segments given by
`cu_seqlens`. Forward returns O and the logsumexp; the backward is
FlashAttention-2's (Delta = rowsum(dO * O), a dK/dV kernel and a separate dQ
kernel, no atomics), wired through `mx.custom_function`, so `mx.grad` of any
encoder that packs uses the kernels."""

from typing import Optional

import mlx.core as mx
import numpy as np

from .backend import BACKENDS, gpu_backend
from .kernels_source import KernelSpec, Launch, run

SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

_HEADER = {"metal": "attention_common.metal", "cuda": "attention_common.cu"}
_EXT = {"metal": ".metal", "cuda": ".cu"}
FORWARD_INPUTS = ("q", "k", "v", "cu_seqlens", "items", "scale")
BACKWARD_INPUTS = ("q", "k", "v", "d_out", "lse", "delta", "cu_seqlens", "items", "scale")
# rows per threadgroup: Metal 4 simdgroups x 8 rows; CUDA one thread per row
ROWS_PER_GROUP = {"metal": 32, "cuda": 64}
THREADS = {"metal": 128, "cuda": 64}


def spec(backend: str, kernel: str) -> KernelSpec:
    inputs, outputs = {
        "fwd": (FORWARD_INPUTS, ("out", "lse")),
        "fwd_wmma": (FORWARD_INPUTS, ("out", "lse")),
        "bwd_dkdv": (BACKWARD_INPUTS, ("dk", "dv")),
        "bwd_dq": (BACKWARD_INPUTS, ("dq",)),
    }[kernel]
    return KernelSpec(
        name=f"varlen_attention_{kernel}", source_file=f"varlen_attention_{kernel}{_EXT[backend]}",
        input_names=inputs, output_names=outputs, header_file=_HEADER[backend],
    )


def check_inputs(q, k, v, cu_seqlens) -> np.ndarray:
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (T, H, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    cu = np.asarray(cu_seqlens).astype(np.int64)
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != q.shape[0] or np.any(np.diff(cu) <= 0):
        raise ValueError(f"cu_seqlens must rise from 0 to {q.shape[0]} in positive steps, got {cu.tolist()}")
    return cu


def check_kernel_support(q) -> None:
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"varlen attention kernels support head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"varlen attention kernels support float32/float16/bfloat16, got {q.dtype}")


def work_items(cu: np.ndarray, rows: int) -> mx.array:
    """(segment, first row) for every block of `rows` rows inside each segment, so
    no threadgroup works outside a segment and the cost follows sum(L_i^2)."""
    items = [(s, r) for s in range(len(cu) - 1) for r in range(int(cu[s]), int(cu[s + 1]), rows)]
    return mx.array(np.asarray(items, dtype=np.int32).reshape(-1))


def tile_rows(backend: str, head_dim: int) -> int:
    """K/V (or Q) rows per tile staged in threadgroup/shared memory (fp32)."""
    if backend == "metal":
        return 32 if head_dim <= 96 else 16  # 2 fp32 tiles within Metal's 32 KB
    return 32


def uses_tensor_cores(backend: str, q) -> bool:
    """CUDA fp16/bf16 forward with a head dim WMMA tiles (16) divide: tensor cores."""
    return backend == "cuda" and q.dtype in (mx.float16, mx.bfloat16) and q.shape[-1] % 16 == 0


def forward_launch(backend: str, q, k, v, cu: np.ndarray, scale: float) -> Launch:
    T, H, D = q.shape
    items = work_items(cu, ROWS_PER_GROUP[backend])
    n_items = items.size // 2
    wmma = uses_tensor_cores(backend, q)
    threads = 128 if wmma else THREADS[backend]  # WMMA: 4 warps x 16 rows
    return Launch(
        spec=spec(backend, "fwd_wmma" if wmma else "fwd"),
        inputs=[q, k, v, mx.array(cu, mx.int32), items, float(scale)],
        template=[("T", q.dtype), ("H", H), ("D", D), ("BK", tile_rows(backend, D))],
        grid=(threads, n_items, H), threadgroup=(threads, 1, 1),
        output_shapes=[(T, H, D), (T, H)], output_dtypes=[q.dtype, mx.float32],
    )


def backward_launch(backend: str, kernel: str, q, k, v, d_out, lse, delta, cu, scale) -> Launch:
    T, H, D = q.shape
    items = work_items(cu, ROWS_PER_GROUP[backend])
    n_items = items.size // 2
    tile = "QB" if kernel == "bwd_dkdv" else "KB"
    outputs = 2 if kernel == "bwd_dkdv" else 1
    return Launch(
        spec=spec(backend, kernel),
        inputs=[q, k, v, d_out.astype(q.dtype), lse, delta, mx.array(cu, mx.int32), items, float(scale)],
        template=[("T", q.dtype), ("H", H), ("D", D), (tile, 16 if backend == "metal" else 32)],
        grid=(THREADS[backend], n_items, H), threadgroup=(THREADS[backend], 1, 1),
        output_shapes=[(T, H, D)] * outputs, output_dtypes=[q.dtype] * outputs,
    )


# ---- references (pure MLX, fp32): what the kernels are tested against --------


def _by_length(cu: np.ndarray):
    """Segments grouped by length: [(length, token indices (n_seg * length,))]."""
    starts, lengths = cu[:-1], np.diff(cu)
    groups = []
    for n in np.unique(lengths):
        segs = np.nonzero(lengths == n)[0]
        groups.append((int(n), np.concatenate([np.arange(starts[s], starts[s] + n) for s in segs])))
    return groups


def _grouped(x, take, n):  # (T, H, D) -> (segments, H, n, D) fp32
    return x[mx.array(take)].astype(mx.float32).reshape(-1, n, *x.shape[1:]).transpose(0, 2, 1, 3)


def _ungroup(parts, order, dtype):  # [(segments, H, n, D)] -> (T, H, D) in token order
    flat = mx.concatenate([p.transpose(0, 2, 1, 3).reshape(-1, *p.shape[1:2], p.shape[-1]) for p in parts])
    return flat[mx.array(np.argsort(order))].astype(dtype)


def reference_forward(q, k, v, cu: np.ndarray, scale: float):
    groups = _by_length(cu)
    outs, lses = [], []
    for n, take in groups:
        qg, kg, vg = (_grouped(x, take, n) for x in (q, k, v))
        s = (qg @ kg.transpose(0, 1, 3, 2)) * scale
        lse = mx.logsumexp(s, axis=-1, keepdims=True)
        outs.append(mx.exp(s - lse) @ vg)
        lses.append(lse)
    order = np.concatenate([take for _, take in groups])
    o = _ungroup(outs, order, q.dtype)
    lse = _ungroup(lses, order, mx.float32)[..., 0]
    return o, lse


def reference_backward(q, k, v, d_out, lse, delta, cu: np.ndarray, scale: float):
    groups = _by_length(cu)
    dqs, dks, dvs = [], [], []
    for n, take in groups:
        qg, kg, vg, dog = (_grouped(x, take, n) for x in (q, k, v, d_out))
        lse_g = _grouped(lse[..., None], take, n)
        delta_g = _grouped(delta[..., None], take, n)
        p = mx.exp((qg @ kg.transpose(0, 1, 3, 2)) * scale - lse_g)
        dp = dog @ vg.transpose(0, 1, 3, 2)
        ds = p * (dp - delta_g)
        dqs.append((ds @ kg) * scale)
        dks.append((ds.transpose(0, 1, 3, 2) @ qg) * scale)
        dvs.append(p.transpose(0, 1, 3, 2) @ dog)
    order = np.concatenate([take for _, take in groups])
    return tuple(_ungroup(parts, order, q.dtype) for parts in (dqs, dks, dvs))


def attention_forward(backend: str, q, k, v, cu, scale):
    if backend == "reference":
        return reference_forward(q, k, v, cu, scale)
    out, lse = run(forward_launch(backend, q, k, v, cu, scale))
    return out, lse


def attention_backward(backend: str, q, k, v, d_out, lse, delta, cu, scale):
    if backend == "reference":
        return reference_backward(q, k, v, d_out, lse, delta, cu, scale)
    args = (q, k, v, d_out, lse, delta, cu, scale)
    dk, dv = run(backward_launch(backend, "bwd_dkdv", *args))
    (dq,) = run(backward_launch(backend, "bwd_dq", *args))
    return dq, dk, dv


def varlen_attention(
    q: mx.array, k: mx.array, v: mx.array, cu_seqlens, scale: Optional[float] = None,
    backend: Optional[str] = None, return_lse: bool = False,
):
    """Attention within each segment of a packed (T, H, D) sequence, differentiable.

    `backend`: "metal", "cuda" or "reference"; default: this machine's GPU kernels,
    or the reference when there are none."""
    cu = check_inputs(q, k, v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backend or gpu_backend() or "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend != "reference":
        check_kernel_support(q)

    @mx.custom_function
    def attend(q, k, v):
        return attention_forward(backend, q, k, v, cu, scale)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        d_out, d_lse = cotangents
        out, lse = outputs
        # d lse / d scores = P, which folds into Delta
        delta = (d_out.astype(mx.float32) * out.astype(mx.float32)).sum(-1) - d_lse
        return attention_backward(backend, *primals, d_out, lse, delta, cu, scale)

    out, lse = attend(q, k, v)
    return (out, lse) if return_lse else out
