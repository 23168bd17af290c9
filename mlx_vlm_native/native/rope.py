"""Fused 2-D rotary embedding for vision tokens (Qwen2-VL: per-token (row, col)
angles, rotate-half convention) applied to q and k in one kernel dispatch,
forward and backward (the transpose rotation), through `mx.custom_function`."""

from typing import Optional

import mlx.core as mx

from .backend import BACKENDS, gpu_backend
from .kernels_source import KernelSpec, Launch, run

_EXT = {"metal": ".metal", "cuda": ".cu"}


def rope_launch(backend: str, q, k, cos, sin, backward: bool) -> Launch:
    n, hq, d = q.shape
    hk = 0 if k is None else k.shape[1]
    return Launch(
        spec=KernelSpec(
            name="rope_2d", source_file=f"rope_2d{_EXT[backend]}",
            input_names=("q", "k", "cosines", "sines"), output_names=("q_out", "k_out"),
        ),
        inputs=[q, q if k is None else k, cos.astype(mx.float32), sin.astype(mx.float32)],
        template=[("T", q.dtype), ("HQ", hq), ("HK", hk), ("D", d), ("BACKWARD", backward)],
        grid=(d // 2, hq + hk, n), threadgroup=(d // 2, 1, 1),
        output_shapes=[q.shape, (1,) if k is None else k.shape], output_dtypes=[q.dtype, q.dtype],
    )


def rotate_half(x: mx.array) -> mx.array:
    """The rotate-half partner of x: (-second half, first half) on the last axis."""
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def reference_rope(x, cos, sin, backward: bool = False):
    """x (N, H, D) rotated in fp32; `backward` applies the transpose rotation."""
    half = x.shape[-1] // 2
    xf = x.astype(mx.float32)
    lo, hi = xf[..., :half], xf[..., half:]
    c_lo, c_hi = cos[:, None, :half], cos[:, None, half:]
    s_lo, s_hi = sin[:, None, :half], sin[:, None, half:]
    if backward:
        out = [lo * c_lo + hi * s_hi, hi * c_hi - lo * s_lo]
    else:
        out = [lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi]
    return mx.concatenate(out, axis=-1).astype(x.dtype)


def _rotate(backend: str, xs: list, cos, sin, backward: bool) -> list:
    if backend == "reference":
        return [reference_rope(x, cos, sin, backward) for x in xs]
    q_out, k_out = run(rope_launch(backend, xs[0], xs[1] if len(xs) > 1 else None, cos, sin, backward))
    return [q_out, k_out][: len(xs)]


def _check(x, cos, sin, name):
    if x.ndim != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape:
        raise ValueError(f"rope_2d: {name} must be (N, H, D) with cos/sin (N, D), got {x.shape}, {cos.shape}, {sin.shape}")
    if x.shape[-1] % 2:
        raise ValueError(f"rope_2d: head dim must be even, got {x.shape[-1]}")


def rope_2d(q: mx.array, k: Optional[mx.array], cos: mx.array, sin: mx.array, backend: Optional[str] = None):
    """(q, k) rotated by per-token angles: q (N, Hq, D), k (N, Hk, D) or None,
    cos/sin (N, D). Returns (q_rot, k_rot) (k_rot None when k is None)."""
    backend = backend or gpu_backend() or "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    _check(q, cos, sin, "q")
    if k is not None:
        _check(k, cos, sin, "k")
        if k.dtype != q.dtype:
            raise ValueError(f"rope_2d: q and k must share one dtype, got {q.dtype}, {k.dtype}")
    n_x = 1 if k is None else 2

    @mx.custom_function
    def rotate(*args):
        *xs, c, s = args
        return tuple(_rotate(backend, xs, c, s, backward=False))

    @rotate.vjp
    def rotate_vjp(primals, cotangents, outputs):
        *xs, c, s = primals
        gs = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        dxs = _rotate(backend, gs, c, s, backward=True)
        d_cos, d_sin = mx.zeros_like(c), mx.zeros_like(s)
        for x, g in zip(xs, gs):
            xf, gf = x.astype(mx.float32), g.astype(mx.float32)
            d_cos = d_cos + (gf * xf).sum(1)
            d_sin = d_sin + (gf * rotate_half(xf)).sum(1)
        return (*dxs, d_cos.astype(c.dtype), d_sin.astype(s.dtype))

    outs = rotate(*([q] if k is None else [q, k]), cos, sin)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    return (outs[0], outs[1] if n_x == 2 else None)
