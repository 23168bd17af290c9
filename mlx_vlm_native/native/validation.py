"""A native kernel is used only once it has agreed with the MLX reference on
this device.

The first time a variant (kernel, backend, dtype, head dim) is needed, it runs
at a small shape against the pure-MLX reference of the same algorithm (forward
and gradients); the verdict is cached per device, MLX version and hash of the
kernel sources in the user's cache folder (`cache_file()`), so later processes
do not check again. A variant that fails to compile or launch, or disagrees, is
not used: one warning per process names it and the reason, and the caller takes
the MLX path. `mlx-vlm-native selftest` prints every verdict.

MLX_VLM_NATIVE_KERNELS: unset (or "auto"): checked and cached as above;
"0": never the kernels; "1": the kernels without a check; "check": check again,
ignoring (and replacing) the cached verdicts.
"""

import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from . import attention, rope
from .backend import ENV, mode
from .kernels_source import KERNEL_DIR

KERNELS = ("varlen_attention", "rope_2d")
TOLERANCE = {mx.float32: 2e-4, mx.float16: 2e-2, mx.bfloat16: 6e-2}  # max |diff|, unit-normal inputs
CHECK_LENGTHS = (1, 7, 40)  # a length-1 segment, one shorter and one longer than a tile


class KernelWarning(UserWarning):
    """A native kernel is not used on this device (the MLX path answers)."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # "agrees with the MLX reference" or why it is not used
    max_abs_diff: Optional[float] = None
    checked_at: str = ""


def cache_dir() -> Path:
    """$MLX_VLM_NATIVE_CACHE_DIR if set (the tests use a temporary one), else
    $XDG_CACHE_HOME/mlx-vlm-native, else ~/Library/Caches (macOS) or ~/.cache."""
    if os.environ.get("MLX_VLM_NATIVE_CACHE_DIR"):
        return Path(os.environ["MLX_VLM_NATIVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        base = Path.home() / ("Library/Caches" if sys.platform == "darwin" else ".cache")
    return Path(base) / "mlx-vlm-native"


def cache_file() -> Path:
    return cache_dir() / "kernel-verdicts.json"


@lru_cache(maxsize=None)
def source_hash() -> str:
    """Of every kernel source and the Python that launches them."""
    h = hashlib.sha256()
    files = sorted(p for p in KERNEL_DIR.iterdir() if p.suffix in (".metal", ".cu"))
    for path in files + [Path(attention.__file__), Path(rope.__file__), KERNEL_DIR.parent / "kernels_source.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def device_context(backend: str) -> str:
    """The cache's key for this device, MLX version and kernel sources."""
    try:
        name = mx.device_info(mx.Device(mx.gpu)).get("device_name", "unknown")
    except Exception:  # noqa: BLE001 - a backend without device_info
        name = "unknown"
    return f"{backend}: {name} | mlx {mx.__version__} | kernels {source_hash()}"


def variant(kernel: str, backend: str, dtype, head_dim: int) -> str:
    return f"{kernel} {backend} {str(dtype).replace('mlx.core.', '')} D={head_dim}"


def _max_diff(pairs) -> float:
    return max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() for a, b in pairs)


def _inputs(shapes, dtype, seed):
    key = mx.random.key(seed)
    return [mx.random.normal(s, key=k).astype(dtype) for s, k in zip(shapes, mx.random.split(key, len(shapes)))]


def check_varlen_attention(backend: str, dtype, head_dim: int) -> float:
    """Max |diff| of O, the logsumexp and dQ/dK/dV against the reference."""
    cu = np.concatenate([[0], np.cumsum(CHECK_LENGTHS)])
    q, k, v, w = _inputs([(int(cu[-1]), 2, head_dim)] * 4, dtype, head_dim)

    def run(b):
        return attention.varlen_attention(q, k, v, cu, backend=b, return_lse=True)

    def grads(b):
        loss = lambda q, k, v: (attention.varlen_attention(q, k, v, cu, backend=b).astype(mx.float32) * w).sum()  # noqa: E731
        return mx.grad(loss, (0, 1, 2))(q, k, v)

    return _max_diff(list(zip(run(backend), run("reference"))) + list(zip(grads(backend), grads("reference"))))


def check_rope_2d(backend: str, dtype, head_dim: int) -> float:
    n = sum(CHECK_LENGTHS)
    q, k, wq, wk = _inputs([(n, 3, head_dim), (n, 2, head_dim)] * 2, dtype, head_dim)
    angles = mx.random.uniform(-10, 10, (n, head_dim), key=mx.random.key(head_dim))
    cos, sin = mx.cos(angles), mx.sin(angles)

    def grads(b):
        def loss(q, k):
            qr, kr = rope.rope_2d(q, k, cos, sin, backend=b)
            return (qr.astype(mx.float32) * wq).sum() + (kr.astype(mx.float32) * wk).sum()
        return mx.grad(loss, (0, 1))(q, k)

    forward = zip(rope.rope_2d(q, k, cos, sin, backend=backend), rope.rope_2d(q, k, cos, sin, backend="reference"))
    return _max_diff(list(forward) + list(zip(grads(backend), grads("reference"))))


CHECKS = {"varlen_attention": check_varlen_attention, "rope_2d": check_rope_2d}


def check(kernel: str, backend: str, dtype, head_dim: int) -> Verdict:
    """Run one variant against the reference now (nothing cached)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        diff = CHECKS[kernel](backend, dtype, head_dim)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile or launch is a verdict
        return Verdict(False, f"failed to compile or run: {type(e).__name__}: {e}"[:500], None, when)
    tol = TOLERANCE[dtype]
    if not diff <= tol:  # NaN included
        return Verdict(False, f"disagrees with the MLX reference: max |diff| {diff:.2e} > {tol:.0e}", diff, when)
    return Verdict(True, f"agrees with the MLX reference (max |diff| {diff:.2e} <= {tol:.0e})", diff, when)


def read_cache() -> dict:
    """{device context: {variant: verdict dict}}; an unreadable file counts as empty."""
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(context: str, name: str, verdict: Verdict) -> None:
    data = read_cache()
    data.setdefault(context, {})[name] = asdict(verdict)
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        warnings.warn(f"mlx-vlm-native: cannot write the kernel verdict cache {path}: {e}", KernelWarning, stacklevel=3)


_session = {}  # (context, variant) -> Verdict, this process


def verdict(kernel: str, backend: str, dtype, head_dim: int) -> Verdict:
    """This variant's verdict: this process's, else the cache's, else checked
    now and cached (always checked now under MLX_VLM_NATIVE_KERNELS=check).
    The first unfavourable verdict of a process warns once."""
    context, name = device_context(backend), variant(kernel, backend, dtype, head_dim)
    key = (context, name)
    if key in _session:
        return _session[key]
    cached = None if mode() == "check" else read_cache().get(context, {}).get(name)
    if cached is not None:
        result = Verdict(**cached)
    else:
        result = check(kernel, backend, dtype, head_dim)
        _write_cache(context, name, result)
    _session[key] = result
    if not result.ok:
        warnings.warn(
            f"mlx-vlm-native: native kernel {name} is not used on this device: {result.reason}; the MLX path "
            f"answers instead (verdict cached in {cache_file()}; {ENV}=check checks again)",
            KernelWarning, stacklevel=2,
        )
    return result


def trusted(kernel: str, backend: str, dtype, head_dim: int) -> bool:
    """Whether this variant may run: never under MLX_VLM_NATIVE_KERNELS=0,
    always under =1, else as its verdict says."""
    m = mode()
    if m in ("0", "1"):
        return m == "1"
    return verdict(kernel, backend, dtype, head_dim).ok


def forget_session() -> None:
    """Drop this process's verdicts (the cache file stays)."""
    _session.clear()


def cached_verdicts(backend: Optional[str] = None) -> dict:
    """{variant: Verdict} of this device's context in the cache (all contexts' when backend is None)."""
    data = read_cache()
    contexts = [device_context(backend)] if backend else list(data)
    return {f"{c} :: {n}" if backend is None else n: Verdict(**v)
            for c in contexts for n, v in sorted(data.get(c, {}).items())}
