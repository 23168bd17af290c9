"""The CPU backend: NumPy in place of the MLX CPU ops that are slow, put into a
loaded model by `install` (`execution.apply` calls it when the model runs on
the CPU). Model code never imports this module; on a GPU nothing here runs.

On the CPU, MLX evaluates `exp` and row reductions element by element, several
times slower than NumPy's vectorised loops (on a 2-core x86 box: `mx.exp`
~40 ns per float32, `np.exp` ~3 ns). In a vision tower that makes the softmax
of the attention scores and the MLP's sigmoid-based activation most of the
time: `PackedAttention`, `QuickGELU` and `SiLU` compute them in NumPy.

Decoding one token is one matrix-vector product per weight. MLX's CPU backend
hands it to BLAS as a one-row `sgemm`, which moves the weights at about half
the speed of NumPy's `gemv` (4 against 8 GB/s on that box, one thread), and
decode time is almost all weight traffic. `Linear` and `Embedding.as_linear`
take NumPy's path for one float32 row.

Decoding a batch is a product of a few rows per weight. OpenBLAS packs the
whole weight into a buffer before such a product (about half of a batched
decode step's time under `perf`), except in its small-matrix kernels
(AVX-512 cores, M*N*K <= 100**3), which read the weight as it lies. Where
OpenBLAS runs on such a core, products of 1-16 float32 rows are made as one
batched product of column blocks small enough for them, in place of the
gemv too (plain MLX: nothing is evaluated, so mlx-lm's async decode steps
still overlap): a decode step of 1 sequence ~25% and of 4-8 ~30% faster here.

Each op is an `mx.custom_function` with its usual vjp in MLX, so training still
differentiates through them; they evaluate their inputs (`mx.eval` inside the
forward), so a model with them installed cannot be wrapped in `mx.compile`:
load it with MLX_VLM_NATIVE_HOST_OPS=0 for that.
"""

import ctypes
import functools
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .packed_attention import PackedAttention as _PackedAttention


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


quick_gelu, silu = _x_sigmoid_op(1.702), _x_sigmoid_op(1.0)


def softmax_rows(*scores) -> list:
    """The softmax over the last axis of each array, all in one host round trip."""
    return list(_tuple(_host_softmax(*scores))) if scores else []


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
    """One float32 row against a float32 weight."""
    return x.size == x.shape[-1] and x.dtype == mx.float32 and weight.dtype == mx.float32


SMALL_MATRIX_CORES = ("skylakex", "cooperlake", "sapphirerapids")  # OpenBLAS cores with small-matrix sgemm
SMALL_MATRIX_MNK = 100**3  # the largest product M*N*K those kernels take


@functools.lru_cache(maxsize=None)
def openblas_core() -> str:
    """The core OpenBLAS runs on in this process, lower case ('' where MLX uses another BLAS)."""
    try:
        corename = ctypes.CDLL(None).openblas_get_corename
    except (AttributeError, OSError, TypeError):
        return ""
    corename.restype = ctypes.c_char_p
    return (corename() or b"").decode().lower()


def column_block(rows: int, inner: int, out: int) -> int:
    """Output columns per block that make a float32 product of 1-16 rows one
    small-matrix product per block; 0 where it stays one product."""
    if not 1 <= rows <= 16 or openblas_core() not in SMALL_MATRIX_CORES:
        return 0
    block = 256
    while block >= 8 and (rows * block * inner > SMALL_MATRIX_MNK or out % block):
        block //= 2
    return block if block >= 8 else 0


def few_rows_product(x: mx.array, weight: mx.array, block: int) -> mx.array:
    """x @ weight.T as one batched product over blocks of `block` output columns."""
    out, inner = weight.shape
    rows = x.size // inner
    y = mx.matmul(x.reshape(1, rows, inner), weight.reshape(out // block, block, inner).swapaxes(1, 2))
    return y.swapaxes(0, 1).reshape(*x.shape[:-1], out)


def fast_product(x: mx.array, weight: mx.array) -> Optional[mx.array]:
    """x @ weight.T where this backend has a faster path than MLX's one product
    (column blocks for 1-16 float32 rows where OpenBLAS has small-matrix
    kernels, else NumPy's gemv for one row), else None."""
    if x.dtype == mx.float32 and weight.dtype == mx.float32:
        block = column_block(x.size // x.shape[-1], weight.shape[1], weight.shape[0])
        if block:
            return few_rows_product(x, weight, block)
    return _host_matvec(x, weight) if matvec_applies(x, weight) else None


# ---- the modules `install` puts in place of MLX's (same state, NumPy inside) --------


class Linear(nn.Linear):
    """nn.Linear whose few-row float32 products take `fast_product`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = fast_product(x, self.weight)
        if y is None:
            return super().__call__(x)
        return y + self.bias if "bias" in self else y


class Embedding(nn.Embedding):
    """nn.Embedding whose `as_linear` (a tied output head) takes `fast_product`."""

    def as_linear(self, x: mx.array) -> mx.array:
        y = fast_product(x, self.weight)
        return x @ self.weight.T if y is None else y


class QuickGELU(nn.GELU):
    """nn.GELU(approx="fast"), x * sigmoid(1.702 x), in NumPy."""

    def __call__(self, x: mx.array) -> mx.array:
        return quick_gelu(x)


class SiLU(nn.SiLU):
    def __call__(self, x: mx.array) -> mx.array:
        return silu(x)


class PackedAttention(_PackedAttention):
    """The packed attention's "auto" path with the softmax of every segment
    batch in one NumPy call (a forced path is still honoured)."""

    softmax = staticmethod(softmax_rows)


def host_class(module: nn.Module):
    """The CPU backend's class for `module`, or None where it keeps MLX's
    (quantized and LoRA layers, exact GELU, anything else)."""
    kind = type(module)
    if kind is nn.GELU:
        return QuickGELU if module._approx == "fast" else None
    return {nn.Linear: Linear, nn.Embedding: Embedding, nn.SiLU: SiLU, _PackedAttention: PackedAttention}.get(kind)


def install(model: nn.Module) -> nn.Module:
    """Give each plain nn.Linear / nn.Embedding / fast nn.GELU / nn.SiLU /
    PackedAttention of `model` its NumPy class above; parameter names, values
    and module identities do not change."""
    for _, module in model.named_modules():
        cls = host_class(module)
        if cls is not None:
            module.__class__ = cls
    return model


def installed(model: nn.Module) -> list:
    """The names of the modules of `model` that run CPU-backend code."""
    own = (Linear, Embedding, QuickGELU, SiLU, PackedAttention)
    return [name for name, m in model.named_modules() if isinstance(m, own)]
