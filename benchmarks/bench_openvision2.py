"""OpenVision 2 training efficiency in MLX: images/s and peak memory of a full
training step (encoder + masked caption decoder, forward, backward, AdamW)
with keep_ratio 0.35 vs 1.0, and stage-1 low resolution vs high resolution.

    python benchmarks/bench_openvision2.py                       # small CPU sizes
    python benchmarks/bench_openvision2.py --vision L --decoder L --batch 32 --high-res 224

Every configuration runs in this one process, same sizes and batch; the two
configurations compared are interleaved step by step, median of `--steps`
timed steps after `--warmup` untimed ones, as wall time and as process CPU
time (less sensitive to other processes on a shared machine). Peak memory is
`mx.get_peak_memory()` over one step after `mx.reset_peak_memory()`.
"""

import argparse
import gc
import time

import mlx.core as mx
import numpy as np

from mlx_vlm_native.models.openvision import DecoderConfig, Model, ModelArgs, VisionConfig
from mlx_vlm_native.training.loop import TrainConfig, enable_grad_checkpoint, make_step
from mlx_vlm_native.training.optim import adamw


def build(vision: str, decoder: str, patch: int, size: int, vocab: int, keep: float):
    v = VisionConfig.from_variant(vision, size, patch)
    d = DecoderConfig.from_variant(decoder, v.width, vocab)
    mx.random.seed(0)
    model = Model(ModelArgs(vision_config=v, decoder_config=d, keep_ratio=keep))
    mx.eval(model.parameters())
    return model


def loss_fn(model, batch, key):
    return model.loss(*batch, key=key)


def step_flops(a, size: int, keep: float) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward):
    the ViT on all N+1 tokens, the decoder on kept + text tokens, the head on text."""
    v = VisionConfig.from_variant(a.vision, size, a.patch)
    d = DecoderConfig.from_variant(a.decoder, v.width, a.vocab)
    n = (size // a.patch) ** 2
    kept, T = min(int(n * keep), n), a.text_len

    def blocks(tokens, layers, width, mlp):
        return layers * (tokens * (8 * width * width + 4 * width * mlp) + 4 * tokens * tokens * width)

    forward = (
        n * 2 * 3 * a.patch * a.patch * v.width
        + blocks(n + 1, v.layers, v.width, v.mlp_dim)
        + kept * 2 * v.width * d.width
        + blocks(kept + T, d.depth, d.width, d.mlp_dim)
        + T * 2 * d.width * a.vocab
    )
    return 3 * a.batch * forward


def prepare(a, size: int, keep: float):
    """A ready-to-run training step (model, AdamW, one fixed batch), warmed up."""
    model = build(a.vision, a.decoder, a.patch, size, a.vocab, keep)
    if a.grad_checkpoint:
        enable_grad_checkpoint(model.layers)
    config = TrainConfig(steps=1, compute_dtype=a.dtype)
    step = make_step(model, loss_fn, adamw(1e-4, weight_decay=0.2, betas=(0.9, 0.95)), config)
    rng = np.random.default_rng(0)
    pixels = mx.array(rng.standard_normal((a.batch, size, size, 3)).astype(np.float32))
    text = rng.integers(3, a.vocab, (a.batch, a.text_len + 1)).astype(np.int32)
    text[:, 0] = 1
    batch = (pixels, mx.array(text))
    for i in range(a.warmup):
        step([batch], mx.random.key(i))
    n = (size // a.patch) ** 2
    return {"size": size, "keep": keep, "tokens": n, "kept": min(int(n * keep), n),
            "run": lambda i: step([batch], mx.random.key(i)), "wall": [], "cpu": []}


def measure_pair(a, configs) -> list:
    """Interleave the configurations step by step (A B A B ...) so that load from
    other processes hits both alike; report median wall and process-CPU time.
    Peak memory is measured for each alone (no other model alive), over one step."""
    peaks = []
    for size, keep in configs:
        r = prepare(a, size, keep)
        mx.clear_cache()
        mx.reset_peak_memory()
        r["run"](0)
        peaks.append(mx.get_peak_memory() / 2**20)
        del r
        gc.collect()
        mx.clear_cache()
    runs = [prepare(a, size, keep) for size, keep in configs]
    for r, peak in zip(runs, peaks):
        r["peak_mb"] = peak
    for i in range(a.steps):
        for r in runs:
            wall, cpu = time.perf_counter(), time.process_time()
            r["run"](i)
            r["wall"].append(time.perf_counter() - wall)
            r["cpu"].append(time.process_time() - cpu)
    for r in runs:
        r["step_s"], r["cpu_s"] = float(np.median(r["wall"])), float(np.median(r["cpu"]))
        r["img_s"], r["img_cpu_s"] = a.batch / r["step_s"], a.batch / r["cpu_s"]
        del r["run"]
    return runs


def row(r, base=None):
    rel = " | | |"
    if base is not None:
        rel = (f" | {r['img_s'] / base['img_s']:.2f}x | {r['img_cpu_s'] / base['img_cpu_s']:.2f}x "
               f"| {r['peak_mb'] / base['peak_mb']:.2f}x |")
    return (f"| {r['size']} | {r['keep']} | {r['tokens']} -> {r['kept']} | {r['step_s'] * 1000:.0f} "
            f"| {r['img_s']:.2f} | {r['img_cpu_s']:.2f} | {r['peak_mb']:.0f}{rel}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision", default="Ti", help="ViT variant: Ti S B L So400m H g")
    p.add_argument("--decoder", default="Ti", help="decoder variant: Ti S B L H G")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--low-res", type=int, default=84)
    p.add_argument("--high-res", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-len", type=int, default=32, help="decoder input tokens per caption")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (default fp32)")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    print(f"device: {mx.default_device()}, ViT-{a.vision}/{a.patch} + decoder {a.decoder}, "
          f"batch {a.batch}, caption {a.text_len} tokens, vocab {a.vocab}, "
          f"{a.dtype or 'float32'}, median of {a.steps} steps")

    print("\n### keep_ratio 0.35 vs 1.0 (ratios: 0.35 over 1.0)\n")
    print("| res | keep | image tokens -> decoder | step (ms) | images/s (wall) | images/s (CPU time) "
          "| peak MB | speed-up (wall) | speed-up (CPU) | memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results, flops = {}, {}
    for size in (a.low_res, a.high_res):
        full, masked = measure_pair(a, [(size, 1.0), (size, 0.35)])
        results[size] = masked
        print(row(full))
        print(row(masked, full))
        flops[size] = (step_flops(a, size, 1.0), step_flops(a, size, 0.35))
    print()
    for size, (f_full, f_masked) in flops.items():
        print(f"{size}px: {f_full / 1e9:.0f} -> {f_masked / 1e9:.0f} GFLOP per step, "
              f"speed-up expected from FLOPs alone {f_full / f_masked:.2f}x")

    print("\n### stage 1 (low res) vs high res all along, keep 0.35\n")
    low, high = results[a.low_res], results[a.high_res]
    print(f"time per sample: {a.low_res}px {low['step_s'] / a.batch * 1000:.1f} ms "
          f"(CPU {low['cpu_s'] / a.batch * 1000:.1f}), {a.high_res}px {high['step_s'] / a.batch * 1000:.1f} ms "
          f"(CPU {high['cpu_s'] / a.batch * 1000:.1f}) -> high/low = {high['step_s'] / low['step_s']:.2f}x wall, "
          f"{high['cpu_s'] / low['cpu_s']:.2f}x CPU; FLOPs "
          f"{step_flops(a, a.high_res, 0.35) / step_flops(a, a.low_res, 0.35):.2f}x")


if __name__ == "__main__":
    from mlx_vlm_native.cli import ensure_fast_blas

    ensure_fast_blas()
    main()
