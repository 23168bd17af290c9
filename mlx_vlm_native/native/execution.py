"""The execution path of a model, chosen once when it is loaded, from the
device it will run on, and recorded on it as `model.execution_path`.

- On a GPU the model is plain MLX: MLX's own layers, no `mx.eval` inside the
  forward, so its forward can be wrapped in `mx.compile`; packed attention and
  the 2-D RoPE take the native kernels where they passed validation on that
  device (`validation`), else MLX's ops.
- On the CPU, `cpu_backend.install` gives the layers that MLX's CPU backend runs
  slowly a NumPy body (1.5-2x faster here; see that module). MLX_VLM_NATIVE_HOST_OPS=0
  keeps the plain-MLX path on the CPU too: the path a GPU takes without kernels,
  which the parity tests check against transformers in that mode.

`apply(model)` is the one call, made after the weights are loaded.
"""

import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import cpu_backend
from .backend import ENV as KERNELS_ENV
from .backend import available_backend, mode

HOST_OPS_ENV = "MLX_VLM_NATIVE_HOST_OPS"


@dataclass(frozen=True)
class ExecutionPath:
    device: str  # "cpu" or "gpu"
    host_ops: bool  # the CPU backend's NumPy layers are installed
    kernels: Optional[str]  # "metal" / "cuda" when the validated native kernels may run, else None

    def __str__(self) -> str:
        if self.host_ops:
            return f"{self.device}: MLX with NumPy host ops (mlx_vlm_native.native.cpu_backend)"
        if self.kernels:
            kernels = f"{self.kernels} kernels where validated ({KERNELS_ENV}={mode()})"
        elif self.device == "gpu":
            kernels = f"no native kernels ({KERNELS_ENV}={mode()})"
        else:
            kernels = f"host ops off ({HOST_OPS_ENV}=0)"
        return f"{self.device}: plain MLX, {kernels}"


def host_ops_enabled() -> bool:
    value = os.environ.get(HOST_OPS_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{HOST_OPS_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def choose(device: Optional[mx.Device] = None) -> ExecutionPath:
    """The path for a model that runs on `device` (default: MLX's default device)."""
    device = device or mx.default_device()
    if device.type == mx.DeviceType.gpu:
        return ExecutionPath("gpu", False, None if mode() == "0" else available_backend())
    return ExecutionPath("cpu", host_ops_enabled(), None)


def apply(model: nn.Module, device: Optional[mx.Device] = None) -> ExecutionPath:
    """Choose the path for `model` on `device`, put it in place, record it as
    `model.execution_path` and return it."""
    path = choose(device)
    if path.host_ops:
        cpu_backend.install(model)
    model.execution_path = path
    return path
