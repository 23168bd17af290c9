"""Native varlen attention kernels: time (forward, forward+backward) for packs of
1, 8 and 32 mixed-size images against the segmented reference and one
dense-mask SDPA; on a CUDA machine with PyTorch, also against PyTorch's
FlashAttention varlen (`torch.nn.attention.varlen.varlen_attn`, or the
`flash_attn` package) on the same pack, as a ratio in the same run.

    python benchmarks/bench_kernels.py [--heads 16 --head-dim 80 --dtype float16 --runs 5]

Without a Metal or CUDA backend the "kernel" column is the pure-MLX reference of
the same algorithm; the script says so. `mlx-vlm-native selftest` prints the same
table after its correctness checks.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_vlm_native import native
from mlx_vlm_native.selftest import DTYPES, pack_lengths, print_timings, timing_rows


def torch_varlen(lengths, heads, head_dim, dtype_name, runs):
    """(name, fwd ms, fwd+bwd ms) of PyTorch FlashAttention varlen on CUDA, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func as attend_fn

        name = "flash_attn.flash_attn_varlen_func"

        def attend(q, k, v, cu, max_len):
            return attend_fn(q, k, v, cu, cu, max_len, max_len)
    except ImportError:
        from torch.nn.attention.varlen import varlen_attn

        name = "torch.nn.attention.varlen.varlen_attn"

        def attend(q, k, v, cu, max_len):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len)

    dtype = getattr(torch, dtype_name)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(int(cu[-1]), heads, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    max_len = max(lengths)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            tic = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
        return float(np.median(times)) * 1e3

    fwd = timed(lambda: attend(q, k, v, cu, max_len))
    both = timed(lambda: attend(q, k, v, cu, max_len).float().sum().backward())
    return name, fwd, both


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--packs", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the timings to this file")
    args = p.parse_args()

    gpu = native.gpu_backend()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, kernels: {gpu or 'none (reference of the kernel algorithm)'}")
    rows = timing_rows(gpu or "reference", args.packs, args.heads, args.head_dim, DTYPES[args.dtype], args.runs,
                       dense_limit=16384 if gpu else 4096)
    print(f"heads={args.heads} head_dim={args.head_dim} {args.dtype}, median of {args.runs}")
    print_timings(rows, f"{gpu} kernel" if gpu else "kernel path (reference, no GPU)")

    torch_rows = []
    for n_images in args.packs:
        result = torch_varlen(pack_lengths(n_images), args.heads, args.head_dim, args.dtype, args.runs)
        if result is None:
            print("\nPyTorch varlen: not run (needs PyTorch with CUDA)")
            break
        torch_rows.append((n_images, *result))
    if torch_rows:
        print(f"\n| images | PyTorch ({torch_rows[0][1]}) fwd / fwd+bwd (ms) | ours / PyTorch (fwd) | ours / PyTorch (fwd+bwd) |")
        print("|---|---|---|---|")
        for row, (n_images, _, fwd, both) in zip(rows, torch_rows):
            ours_fwd, ours_both = row["kernel"]
            print(f"| {n_images} | {fwd:.2f} / {both:.2f} | {ours_fwd / fwd:.2f}x | {ours_both / both:.2f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "mlx": mx.__version__, "device": str(mx.default_device()), "kernels": gpu, "heads": args.heads,
            "head_dim": args.head_dim, "dtype": args.dtype, "runs": args.runs, "rows": rows,
            "lengths": {n: pack_lengths(n) for n in args.packs},
            "torch_varlen": [dict(zip(("images", "name", "fwd_ms", "fwd_bwd_ms"), r)) for r in torch_rows],
        }, indent=1))


if __name__ == "__main__":
    main()
