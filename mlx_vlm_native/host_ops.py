"""Elementwise work that MLX's CPU backend does slowly, done by NumPy.

On the CPU, MLX evaluates `exp` and row reductions element by element, several
times slower than NumPy's vectorised loops (on a 2-core x86 box: `mx.exp`
~40 ns per float32, `np.exp` ~3 ns). In a vision tower that makes the softmax
of the attention scores and the MLP's sigmoid-based activation most of the
time. These functions compute them in NumPy on the CPU backend, and in MLX on
a GPU. Each is an `mx.custom_function` with its usual vjp in MLX, so training
still differentiates through them; they evaluate their inputs, so they are
not for use inside `mx.compile`.
"""

import mlx.core as mx
import numpy as np


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _host(fn, xs):
    """fn over each array, in float32 NumPy, back in the arrays' dtypes."""
    f32 = [x.astype(mx.float32) for x in xs]
    mx.eval(f32)
    return tuple(mx.array(fn(np.asarray(f))).astype(x.dtype) for f, x in zip(f32, xs))


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    out = np.subtract(x, x.max(axis=-1, keepdims=True))
    np.exp(out, out=out)
    out *= np.reciprocal(out.sum(axis=-1, keepdims=True))
    return out


def _x_sigmoid(x: np.ndarray, a: float) -> np.ndarray:
    """x * sigmoid(a x) = x / (1 + exp(-a x)), in place in one buffer."""
    out = np.multiply(x, -a)
    np.exp(out, out=out)
    out += 1.0
    return np.divide(x, out, out=out)


@mx.custom_function
def _host_softmax(*scores):
    return _host(_softmax_rows, scores)


@_host_softmax.vjp
def _host_softmax_vjp(primals, cotangents, outputs):
    return tuple(p * (g - (g * p).sum(axis=-1, keepdims=True)) for p, g in zip(outputs, _tuple(cotangents)))


def _x_sigmoid_op(a: float):
    @mx.custom_function
    def op(x):
        return _host(lambda v: _x_sigmoid(v, a), [x])[0]

    @op.vjp
    def op_vjp(primals, cotangent, output):
        x = primals[0] if isinstance(primals, (list, tuple)) else primals
        s = mx.sigmoid(a * x)
        return cotangent * (s + a * x * s * (1 - s))

    return op


_host_quick_gelu, _host_silu = _x_sigmoid_op(1.702), _x_sigmoid_op(1.0)


def softmax_rows(*scores) -> list:
    """The softmax over the last axis of each array (all in one host round trip)."""
    if not scores:
        return []
    if not on_cpu():
        return [mx.softmax(s, axis=-1, precise=True) for s in scores]
    return list(_tuple(_host_softmax(*scores)))


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), as `nn.gelu_fast_approx` and transformers' quick_gelu."""
    return _host_quick_gelu(x) if on_cpu() else x * mx.sigmoid(1.702 * x)


def silu(x: mx.array) -> mx.array:
    return _host_silu(x) if on_cpu() else x * mx.sigmoid(x)
