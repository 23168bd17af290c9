"""Native GPU kernels: packed varlen attention (forward + backward) and the fused
2-D rotary embedding, for Metal and CUDA, with pure-MLX references.

`gpu_backend()` says which kernels this machine runs: "metal" when
`mx.metal.is_available()`, "cuda" when MLX's CUDA backend is present, else None
(then callers use the references). MLX_VLM_NATIVE_KERNELS=0 forces the references
for debugging. A kernel that fails on a GPU raises with its name; it never falls
back silently."""

import mlx.core as mx

from .attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, varlen_attention
from .backend import BACKENDS, gpu_backend
from .rope import rope_2d


def kernels_apply(q: mx.array) -> bool:
    """Whether "auto" dispatch sends this (T, H, D) attention to the GPU kernels."""
    return gpu_backend() is not None and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES


__all__ = [
    "BACKENDS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "gpu_backend", "kernels_apply",
    "rope_2d", "varlen_attention",
]
