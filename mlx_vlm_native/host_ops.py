"""Elementwise work that MLX's CPU backend does slowly, done by NumPy.

On the CPU, MLX evaluates `exp` and row reductions element by element, several
times slower than NumPy's vectorised loops (on a 2-core x86 box: `mx.exp`
~40 ns per float32, `np.exp` ~3 ns). In a vision tower that makes the softmax
of the attention scores and the MLP's sigmoid-based activation most of the
time. These functions compute them in NumPy on the CPU backend, and in MLX on
a GPU.

Decoding one token is one matrix-vector product per weight. MLX's CPU backend
hands it to BLAS as a one-row `sgemm`, which moves the weights at about half
the speed of NumPy's `gemv` (4 against 8 GB/s on that box, one thread), and
decode time is almost all weight traffic. `Linear` and `Embedding.as_linear`
take NumPy's path for one float32 row on the CPU; `use_host_matvec` puts them in
a loaded model. Each is an `mx.custom_function` with its usual vjp in MLX, so training
still differentiates through them; they evaluate their inputs, so they are
not for use inside `mx.compile`.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten


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


@mx.custom_function
def _host_matvec(x, weight):
    mx.eval(x, weight)
    y = np.asarray(weight) @ np.asarray(x).reshape(-1)  # the weight is viewed, not copied
    return mx.array(y).reshape(*x.shape[:-1], weight.shape[0])


@_host_matvec.vjp
def _host_matvec_vjp(primals, cotangent, output):
    x, weight = primals
    return cotangent @ weight, cotangent.reshape(-1, 1) * x.reshape(1, -1)


def matvec_applies(x: mx.array, weight: mx.array) -> bool:
    """One float32 row against a float32 weight, on the CPU backend."""
    return on_cpu() and x.size == x.shape[-1] and x.dtype == mx.float32 and weight.dtype == mx.float32


def matvec(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T for x of one row; NumPy's gemv where `matvec_applies`."""
    return _host_matvec(x, weight) if matvec_applies(x, weight) else x @ weight.T


class Linear(nn.Linear):
    """nn.Linear (same parameters) whose one-row float32 products on the CPU are NumPy's gemv."""

    def __call__(self, x: mx.array) -> mx.array:
        if not matvec_applies(x, self.weight):
            return super().__call__(x)
        y = _host_matvec(x, self.weight)
        return y + self.bias if "bias" in self else y


class Embedding(nn.Embedding):
    """nn.Embedding whose `as_linear` (a tied output head) takes `matvec`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return matvec(x, self.weight)


def use_host_matvec(model: nn.Module) -> nn.Module:
    """Put `Linear` / `Embedding` in place of the model's plain nn.Linear /
    nn.Embedding modules (quantized and LoRA layers are left as they are);
    parameter names and values do not change."""
    swapped = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            new = Linear(1, 1, bias=False)
        elif type(module) is nn.Embedding:
            new = Embedding(1, 1)
        else:
            continue
        for key, value in module.items():
            if isinstance(value, mx.array):
                setattr(new, key, value)
        swapped.append((name, new))
    if swapped:
        model.update_modules(tree_unflatten(swapped))
    return model
