"""Kernel sources (top-level `kernels/`, shipped inside the package as
`mlx_vlm_native/native/kernels/`) and the description of one kernel launch.

A `Launch` holds everything `mx.fast.metal_kernel` / `mx.fast.cuda_kernel` and
their call need, so the same object runs on a GPU and, in the tests, through the
CPU emulator."""

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx

KERNEL_DIR = Path(__file__).parent / "kernels"


@lru_cache(maxsize=None)
def read_source(filename: str) -> str:
    path = KERNEL_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {filename} not found in {KERNEL_DIR}")
    return path.read_text()


@dataclass(frozen=True)
class KernelSpec:
    name: str
    source_file: str  # body, e.g. varlen_attention_fwd.metal
    input_names: tuple
    output_names: tuple
    header_file: Optional[str] = None

    @property
    def source(self) -> str:
        return read_source(self.source_file)

    @property
    def header(self) -> str:
        return read_source(self.header_file) if self.header_file else ""

    @property
    def kernel_name(self) -> str:
        """The name MLX compiles and caches the kernel under. MLX's CUDA backend
        caches PTX on disk by name (/tmp/mlx/<version>/ptx), so the name carries a
        hash of the source: an edited kernel never runs stale code."""
        digest = hashlib.sha256((self.header + self.source).encode()).hexdigest()[:10]
        return f"{self.name}_{digest}"

    @property
    def language(self) -> str:
        return "metal" if self.source_file.endswith(".metal") else "cuda"


@dataclass
class Launch:
    spec: KernelSpec
    inputs: list  # mx.array, or python float/int scalars
    template: list
    grid: tuple
    threadgroup: tuple
    output_shapes: list
    output_dtypes: list
    init_value: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def call_kwargs(self) -> dict:
        kwargs = dict(
            inputs=self.inputs, template=self.template, grid=self.grid,
            threadgroup=self.threadgroup, output_shapes=self.output_shapes,
            output_dtypes=self.output_dtypes,
        )
        if self.init_value is not None:
            kwargs["init_value"] = self.init_value
        return kwargs


_kernels = {}


def build_kernel(spec: KernelSpec):
    """The mx.fast kernel object for `spec`, built once (each build is a JIT cache entry)."""
    if spec not in _kernels:
        make = mx.fast.metal_kernel if spec.language == "metal" else mx.fast.cuda_kernel
        _kernels[spec] = make(
            name=spec.kernel_name, input_names=list(spec.input_names),
            output_names=list(spec.output_names), source=spec.source, header=spec.header,
        )
    return _kernels[spec]


def run(launch: Launch) -> list:
    """Launch on the GPU. Errors name the kernel (the "auto" dispatch never gets
    here with a variant `validation` has not trusted)."""
    try:
        return build_kernel(launch.spec)(**launch.call_kwargs())
    except Exception as e:  # noqa: BLE001 - re-raised with the kernel's name
        raise RuntimeError(f"native kernel {launch.spec.name!r} failed: {e}") from e
