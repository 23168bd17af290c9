"""host_ops (NumPy softmax / quick_gelu / silu on the CPU backend) against
MLX's own ops: values to 1e-6 and gradients to 1e-5, in float32 and bfloat16."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_vlm_native import host_ops
from mlx_vlm_native.packed_attention import equal_length_runs


def test_runs_on_the_cpu_backend_here():
    assert host_ops.on_cpu()


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.bfloat16, 1e-2)])
def test_softmax_rows_match_mlx(dtype, tol):
    rng = np.random.default_rng(0)
    xs = [mx.array(rng.standard_normal(shape) * 4).astype(dtype) for shape in [(2, 3, 7, 7), (1, 5, 11)]]
    for ours, x in zip(host_ops.softmax_rows(*xs), xs):
        assert ours.dtype == dtype and ours.shape == x.shape
        ref = mx.softmax(x.astype(mx.float32), axis=-1)
        assert float(mx.abs(ours.astype(mx.float32) - ref).max()) <= tol


@pytest.mark.parametrize("ours,ref", [
    (host_ops.quick_gelu, nn.gelu_fast_approx), (host_ops.silu, nn.silu),
])
def test_activations_match_mlx(ours, ref):
    x = mx.array(np.random.default_rng(1).standard_normal((9, 33)).astype(np.float32) * 6)
    assert float(mx.abs(ours(x) - ref(x)).max()) <= 1e-5
    w = mx.array(np.random.default_rng(2).standard_normal((9, 33)).astype(np.float32))
    g_ours = mx.grad(lambda x: (ours(x) * w).sum())(x)
    g_ref = mx.grad(lambda x: (ref(x) * w).sum())(x)
    assert float(mx.abs(g_ours - g_ref).max()) <= 1e-5


def test_softmax_gradient_matches_mlx():
    rng = np.random.default_rng(3)
    a, b = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in [(3, 6), (2, 4, 4)])
    wa, wb = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in [(3, 6), (2, 4, 4)])

    def loss(softmax):
        def f(a, b):
            pa, pb = softmax(a, b)
            return (pa * wa).sum() + (pb * wb).sum()
        return f

    ours = mx.grad(loss(host_ops.softmax_rows), argnums=(0, 1))(a, b)
    ref = mx.grad(loss(lambda *xs: [mx.softmax(x, axis=-1) for x in xs]), argnums=(0, 1))(a, b)
    for g, r in zip(ours, ref):
        assert float(mx.abs(g - r).max()) <= 1e-5


def test_equal_length_runs():
    assert equal_length_runs([0, 4, 8, 12, 15, 18, 20]) == [(0, 4, 3), (12, 3, 2), (18, 2, 1)]
    assert equal_length_runs([0, 5]) == [(0, 5, 1)]
