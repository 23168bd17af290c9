"""Shared inputs for the kernel tests: small packs (with length-1 and odd
segments) and the references the kernels are compared with."""

import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from mlx_vlm_native.native import attention
from mlx_vlm_native.native.kernels_source import KernelSpec

from msl.check import find_clang

SEGMENT_MIXES = ([1, 5, 17, 33], [40, 1, 3], [70])
ATOL = {mx.float32: 1e-5, mx.float16: 3e-3, mx.bfloat16: 3e-2}

# The emulator compiles each kernel with clang for this CPU; tests that only read
# the sources (or trace them through MLX) run without it.
needs_emulator = pytest.mark.skipif(
    find_clang() is None or not sys.platform.startswith("linux"),
    reason="the CPU kernel emulator needs clang++ on Linux (apt-get install clang-19); "
    "on a Mac, test_kernels.py runs the kernels on the GPU",
)


def fast_first(values, fast=1):
    """Parametrize values with all but the first `fast` in the slow tier: the
    default tier keeps one case per kernel, `-m slow` runs the rest."""
    return [v if i < fast else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for i, v in enumerate(values)]


def pack(lengths, heads, head_dim, dtype=mx.float32, seed=0, n=4):
    mx.random.seed(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    arrays = [mx.random.normal((int(cu[-1]), heads, head_dim)).astype(dtype) for _ in range(n)]
    return cu, arrays


def attention_case(lengths, heads, head_dim, dtype=mx.float32, seed=0):
    """Inputs and reference outputs for the forward and both backward kernels."""
    cu, (q, k, v, d_out) = pack(lengths, heads, head_dim, dtype, seed)
    scale = head_dim**-0.5
    out, lse = attention.reference_forward(q, k, v, cu, scale)
    delta = (d_out.astype(mx.float32) * out.astype(mx.float32)).sum(-1)
    dq, dk, dv = attention.reference_backward(q, k, v, d_out, lse, delta, cu, scale)
    return dict(q=q, k=k, v=v, d_out=d_out, cu=cu, scale=scale, out=out, lse=lse, delta=delta,
                dq=dq, dk=dk, dv=dv)


def launches(backend, case):
    c = case
    bwd = (c["q"], c["k"], c["v"], c["d_out"], c["lse"], c["delta"], c["cu"], c["scale"])
    return {
        "fwd": (attention.forward_launch(backend, c["q"], c["k"], c["v"], c["cu"], c["scale"]), ("out", "lse")),
        "bwd_dkdv": (attention.backward_launch(backend, "bwd_dkdv", *bwd), ("dk", "dv")),
        "bwd_dq": (attention.backward_launch(backend, "bwd_dq", *bwd), ("dq",)),
    }


def max_diff(got, want) -> float:
    want = np.array(want.astype(mx.float32)) if isinstance(want, mx.array) else want
    return float(np.max(np.abs(np.asarray(got, np.float32) - want)))


@dataclass(frozen=True)
class SeededBug(KernelSpec):
    """A kernel with one deliberate bug: `replace` = (old, new) in its body, or in
    its shared header when `in_header`."""

    replace: tuple = ("", "")
    in_header: bool = False

    def _mutate(self, text: str) -> str:
        old, new = self.replace
        assert old in text, f"seeded bug: {old!r} not found"
        return text.replace(old, new, 1)

    @property
    def source(self) -> str:
        return super().source if self.in_header else self._mutate(super().source)

    @property
    def header(self) -> str:
        return self._mutate(super().header) if self.in_header else super().header


def with_bug(launch, old, new, in_header=False):
    s = launch.spec
    launch.spec = SeededBug(s.name, s.source_file, s.input_names, s.output_names, s.header_file, (old, new), in_header)
    return launch
