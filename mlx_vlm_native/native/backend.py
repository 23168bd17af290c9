"""Which kernels this machine runs (see the package docstring)."""

import os
from typing import Optional

import mlx.core as mx

BACKENDS = ("metal", "cuda", "reference")


def gpu_backend() -> Optional[str]:
    if os.environ.get("MLX_VLM_NATIVE_KERNELS", "1") == "0":
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None
