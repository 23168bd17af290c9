"""Native GPU kernels: packed varlen attention (forward + backward) and the fused
2-D rotary embedding, for Metal and CUDA, with pure-MLX references.

`gpu_backend()` says which kernels work on the default device would run:
"metal" or "cuda" when MLX's default device is a GPU of that backend, else None
(then callers use the pure-MLX paths). A kernel variant (backend, dtype, head
dim) is used by the "auto" dispatch (`kernels_apply`, `rope_applies`) only once
`validation` has checked it against the reference on this device; a variant that
fails to compile or disagrees is not used (one warning, the MLX path answers).
MLX_VLM_NATIVE_KERNELS=0 / 1 / check: never the kernels / the kernels unchecked /
check again. Called with an explicit `backend`, a kernel that fails raises with
its name."""

import mlx.core as mx

from .attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, varlen_attention
from .backend import BACKENDS, available_backend, gpu_backend
from .rope import rope_2d
from .validation import trusted


def kernels_apply(q: mx.array) -> bool:
    """Whether "auto" dispatch sends this (T, H, D) attention to the GPU kernels:
    a GPU backend, a supported head dim and dtype, and a trusted variant."""
    backend = gpu_backend()
    return (backend is not None and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
            and trusted("varlen_attention", backend, q.dtype, q.shape[-1]))


def rope_applies(q: mx.array) -> bool:
    """Whether the fused RoPE kernel rotates this (N, H, D) q (and its k)."""
    backend = gpu_backend()
    return backend is not None and trusted("rope_2d", backend, q.dtype, q.shape[-1])


__all__ = [
    "BACKENDS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "available_backend", "gpu_backend", "kernels_apply",
    "rope_2d", "rope_applies", "varlen_attention",
]
