"""Packed attention paths: time and peak memory for packs of 1, 8 and 32
mixed-size images (64 to 4096 tokens each), as ratios to the segmented path.

    python benchmarks/bench_packed_attention.py [--heads 16 --head-dim 80 --runs 3]
"""

import argparse
import time

import mlx.core as mx
import numpy as np

from mlx_vlm_native.native.packed_attention import packed_attention

PATHS = ("segmented", "dense")


def pack_lengths(n_images: int, rng) -> list:
    if n_images == 1:
        return [4096]
    return rng.choice([64, 256, 576, 1024, 2304, 4096], size=n_images, p=[0.3, 0.25, 0.2, 0.12, 0.08, 0.05]).tolist()


def measure(path, q, k, v, cu, runs):
    mx.eval(packed_attention(q, k, v, cu, path=path))  # warm-up
    mx.reset_peak_memory()
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        mx.eval(packed_attention(q, k, v, cu, path=path))
        times.append(time.perf_counter() - tic)
    return float(np.median(times)), mx.get_peak_memory() / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--packs", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-dense-gb", type=float, default=8.0,
                   help="skip the dense path when its H*T*T score matrix would exceed this")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"device: {mx.default_device()}, H={a.heads}, D={a.head_dim}, fp32, median of {a.runs}")
    print("| images | tokens T | sum L_i^2 / T^2 | path | time (ms) | peak MB | time vs segmented | memory vs segmented |")
    print("|---|---|---|---|---|---|---|---|")
    for n in a.packs:
        lengths = pack_lengths(n, rng)
        T = sum(lengths)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        q, k, v = (mx.random.normal((T, a.heads, a.head_dim)) for _ in range(3))
        mx.eval(q, k, v)
        dense_gb = a.heads * T * T * 4 / 2**30
        paths = [p for p in PATHS if p != "dense" or dense_gb <= a.max_dense_gb]
        results = {path: measure(path, q, k, v, cu, a.runs) for path in paths}
        base_t, base_m = results["segmented"]
        density = sum(x * x for x in lengths) / T**2
        if "dense" not in results:
            print(f"| {n} | {T} | {density:.3f} | dense | skipped: scores alone need {dense_gb:.0f} GB | | | |")
        for path, (t, m) in results.items():
            print(f"| {n} | {T} | {density:.3f} | {path} | {t * 1e3:.1f} | {m:.0f} | {t / base_t:.2f}x | {m / base_m:.2f}x |")


if __name__ == "__main__":
    main()
