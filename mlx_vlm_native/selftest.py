"""`mlx-vlm-native selftest`: check this machine's native kernels against the
references, then time them.

1. Correctness: the varlen attention forward, its backward (dQ, dK, dV via
   `mx.grad`) and the fused 2-D RoPE (forward and backward), on packs with
   length-1 and odd-length segments, every supported head dim and fp32/fp16/bf16,
   against independent references (dense block-diagonal-mask SDPA and autodiff of
   it; the rotate-half formula). Any mismatch makes the command exit 1.
2. Timing (forward and forward+backward) on packs of 1, 8 and 32 mixed-size
   images: the kernel, the segmented reference, and one dense-mask
   `scaled_dot_product_attention`.

3. The verdicts the "auto" dispatch goes by (`native/validation.py`): for every
   kernel variant, whether it is used on this device and why, as cached in the
   user's cache folder (MLX_VLM_NATIVE_KERNELS=check checks them all again).

Without a Metal or CUDA backend the kernel path is the pure-MLX reference of the
same algorithm (FlashAttention-2 forward/backward with its custom vjp): the
checks still run, and the report says that no GPU kernel was exercised.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import native
from .native import validation
from .native.validation import TOLERANCE
from .native.packed_attention import dense_attention, segmented_attention

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
CASES = ([1, 5, 17, 33], [64, 1, 100, 7], [130])


def max_diff(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def attention_checks(backend, head_dims, dtypes, heads=2):
    """(name, max |diff|, tolerance) for forward and gradients of every case."""
    rows = []
    for lengths in CASES:
        cu = np.concatenate([[0], np.cumsum(lengths)])
        for d in head_dims:
            for dtype in dtypes:
                mx.random.seed(d + len(lengths))
                q, k, v, w = (mx.random.normal((cu[-1], heads, d)).astype(dtype) for _ in range(4))
                name = f"lengths={lengths} D={d} {dtype}".replace("mlx.core.", "")
                tol = TOLERANCE[dtype]
                try:
                    mx.eval(native.varlen_attention(q, k, v, cu, backend=backend))
                except Exception as e:  # noqa: BLE001 - a kernel that does not build is a failed check
                    rows.append((f"attention fwd  {name}: {error_text(e)}", float("nan"), tol))
                    continue
                out = native.varlen_attention(q, k, v, cu, backend=backend)
                rows.append((f"attention fwd  {name}", max_diff(out, dense_attention(q, k, v, cu, d**-0.5)), tol))
                if dtype != mx.float32:
                    continue  # gradients: fp32, where the references are exact enough to compare at 2e-4

                def loss(attend):
                    return lambda q, k, v: (attend(q, k, v) * w).sum()

                ours = mx.grad(loss(lambda q, k, v: native.varlen_attention(q, k, v, cu, backend=backend)), (0, 1, 2))
                ref = mx.grad(loss(lambda q, k, v: dense_attention(q, k, v, cu, d**-0.5)), (0, 1, 2))
                for label, a, b in zip(("dq", "dk", "dv"), ours(q, k, v), ref(q, k, v)):
                    rows.append((f"attention {label:4s} {name}", max_diff(a, b), tol))
    return rows


def rope_reference(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.astype(mx.float32)
    rotated = mx.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def rope_checks(backend, head_dims, dtypes):
    rows = []
    for d in head_dims:
        for dtype in dtypes:
            mx.random.seed(d)
            n = 37
            q, k = mx.random.normal((n, 3, d)).astype(dtype), mx.random.normal((n, 2, d)).astype(dtype)
            angles = mx.random.uniform(-10, 10, (n, d))
            cos, sin = mx.cos(angles), mx.sin(angles)
            name = f"D={d} {dtype}".replace("mlx.core.", "")
            tol = TOLERANCE[dtype] / 10
            try:
                qr, kr = native.rope_2d(q, k, cos, sin, backend=backend)
                mx.eval(qr, kr)
            except Exception as e:  # noqa: BLE001 - a kernel that does not build is a failed check
                rows.append((f"rope fwd {name}: {error_text(e)}", float("nan"), tol))
                continue
            rows.append((f"rope fwd {name}", max(max_diff(qr, rope_reference(q, cos, sin)),
                                                  max_diff(kr, rope_reference(k, cos, sin))), tol))
            if dtype == mx.float32:
                wq, wk = mx.random.normal(q.shape), mx.random.normal(k.shape)
                ours = mx.grad(lambda q, k: sum((o * w).sum() for o, w in zip(native.rope_2d(q, k, cos, sin, backend=backend), (wq, wk))), (0, 1))
                ref = mx.grad(lambda q, k: (rope_reference(q, cos, sin) * wq).sum() + (rope_reference(k, cos, sin) * wk).sum(), (0, 1))
                rows.append((f"rope bwd {name}", max(max_diff(a, b) for a, b in zip(ours(q, k), ref(q, k))), tol))
    return rows


def pack_lengths(n_images: int, seed: int = 0) -> list:
    if n_images == 1:
        return [1024]
    rng = np.random.default_rng(seed)
    return rng.choice([64, 256, 576, 1024, 2304], size=n_images, p=[0.3, 0.3, 0.2, 0.15, 0.05]).tolist()


def timed(fn, runs: int) -> float:
    mx.eval(fn())  # warm-up (and JIT compile)
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return float(np.median(times)) * 1e3


def timing_rows(backend, packs, heads, head_dim, dtype, runs, dense_limit):
    rows = []
    for n_images in packs:
        lengths = pack_lengths(n_images)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        T = int(cu[-1])
        q, k, v = (mx.random.normal((T, heads, head_dim)).astype(dtype) for _ in range(3))
        scale = head_dim**-0.5
        paths = {
            "kernel": lambda q, k, v: native.varlen_attention(q, k, v, cu, scale, backend=backend),
            "segmented": lambda q, k, v: segmented_attention(q, k, v, cu, scale),
            "dense-mask SDPA": lambda q, k, v: dense_attention(q, k, v, cu, scale),
        }
        row = {"images": n_images, "tokens": T}
        for name, attend in paths.items():
            if name == "dense-mask SDPA" and T > dense_limit:
                row[name] = (None, None)
                continue
            grad = mx.grad(lambda q, k, v: attend(q, k, v).astype(mx.float32).sum(), (0, 1, 2))
            row[name] = (timed(lambda: attend(q, k, v), runs), timed(lambda: grad(q, k, v), runs))
        rows.append(row)
    return rows


def print_timings(rows, kernel_label):
    names = ("kernel", "segmented", "dense-mask SDPA")
    print(f"\n| images | tokens | {kernel_label} fwd / fwd+bwd (ms) | segmented fwd / fwd+bwd (ms) "
          "| dense-mask SDPA fwd / fwd+bwd (ms) | segmented / kernel (fwd) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for n in names:
            f, b = r[n]
            cells.append("-" if f is None else f"{f:.2f} / {b:.2f}")
        ratio = r["segmented"][0] / r["kernel"][0]
        print(f"| {r['images']} | {r['tokens']} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


def kernel_verdicts(gpu, head_dims, dtypes) -> list:
    """(variant, Verdict) for every kernel variant on this device: the cached
    verdict, or checked now (as the first model that needs it would)."""
    if not gpu:
        return []
    with warnings.catch_warnings():  # the table says it
        warnings.simplefilter("ignore", validation.KernelWarning)
        return [(validation.variant(kernel, gpu, dtype, d), validation.verdict(kernel, gpu, dtype, d))
                for kernel in validation.KERNELS for d in head_dims for dtype in dtypes]


def print_verdicts(gpu, verdicts) -> None:
    if not gpu:
        print(f"\nkernel verdicts: none, no GPU kernel runs here ({validation.ENV}={validation.mode()}, "
              f"device {mx.default_device()})")
        return
    print(f"\nkernel verdicts for {validation.device_context(gpu)} ({validation.cache_file()}):")
    print("\n| kernel variant | used | why |")
    print("|---|---|---|")
    for name, v in verdicts:
        print(f"| {name} | {'yes' if v.ok else 'NO'} | {v.reason} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mlx-vlm-native selftest", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer head dims and dtypes, small packs, 1 run")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="timing dtype (default: float16 on a GPU, float32 on the CPU, where float16 is emulated)")
    p.add_argument("--packs", type=int, nargs="+", default=None,
                   help="images per timed pack (default: 1 8 32 on a GPU, 1 8 on the CPU)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per path (default: 5 on a GPU, 1 on the CPU)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the checks and timings to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    gpu = native.gpu_backend()
    backend = gpu or "reference"
    print(f"mlx {mx.__version__}, device {mx.default_device()}")
    if gpu:
        print(f"native kernels: {gpu}")
    else:
        print("native kernels: none on this machine (no Metal or CUDA backend, or MLX_VLM_NATIVE_KERNELS=0);"
              " checking the pure-MLX reference of the kernel algorithm instead. No GPU kernel was run.")
    head_dims = (64, 80) if args.quick else native.SUPPORTED_HEAD_DIMS
    dtypes = (mx.float32, mx.float16) if args.quick else tuple(DTYPES.values())
    rows = attention_checks(backend, head_dims, dtypes) + rope_checks(backend, head_dims, dtypes)
    failed = [r for r in rows if not r[1] <= r[2]]
    print(f"\n| check ({backend}) | max abs diff | tolerance | |")
    print("|---|---|---|---|")
    for name, diff, tol in rows:
        print(f"| {name} | {diff:.2e} | {tol:.0e} | {'ok' if diff <= tol else 'MISMATCH'} |")
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed")
    verdicts = kernel_verdicts(gpu, head_dims, dtypes)
    print_verdicts(gpu, verdicts)

    timings = []
    if not args.no_timing:
        # on the CPU the full GPU timing (32-image packs, float16, 5 runs) takes many minutes
        args.dtype = args.dtype or ("float16" if gpu else "float32")
        packs = args.packs or ([1, 8, 32] if gpu else [1, 8])
        args.runs = args.runs or (5 if gpu else 1)
        if args.quick:
            packs, args.runs = [p for p in packs if p <= 8], 1
        timings = timing_rows(backend, packs, args.heads, args.head_dim, DTYPES[args.dtype], args.runs,
                              dense_limit=16384 if gpu else 4096)
        label = f"{gpu} kernel" if gpu else "kernel path (reference, no GPU)"
        print(f"\ntimings: heads={args.heads} head_dim={args.head_dim} {args.dtype}, median of {args.runs}")
        print_timings(timings, label)
    if args.json is not None:
        report = {"mlx": mx.__version__, "device": str(mx.default_device()), "kernels": gpu,
                  "checks": [{"name": n, "max_abs_diff": d, "tolerance": t, "ok": d <= t} for n, d, t in rows],
                  "passed": len(rows) - len(failed), "total": len(rows),
                  "verdicts": [{"variant": n, **vars(v)} for n, v in verdicts],
                  "timing": {"heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype, "runs": args.runs,
                             "rows": timings}}
        args.json.write_text(json.dumps(report, indent=1))
    if failed:
        print(f"\nFAILED: {len(failed)} mismatches, first: {failed[0][0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
