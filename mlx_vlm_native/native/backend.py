"""Which kernels this machine runs, and the MLX_VLM_NATIVE_KERNELS setting
(see the package docstring)."""

import os
from typing import Optional

import mlx.core as mx

BACKENDS = ("metal", "cuda", "reference")
ENV = "MLX_VLM_NATIVE_KERNELS"
MODES = ("auto", "0", "1", "check")  # auto: validated kernels; 0: none; 1: unchecked; check: validate again


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)} (unset: auto), got {value!r}")
    return value


def available_backend() -> Optional[str]:
    """The GPU backend MLX has here: "metal", "cuda" or None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def runs_on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def gpu_backend() -> Optional[str]:
    """The kernels' backend when work runs on a GPU (MLX's default device) and
    MLX_VLM_NATIVE_KERNELS is not 0; else None (the pure-MLX paths)."""
    if mode() == "0" or not runs_on_gpu():
        return None
    return available_backend()
