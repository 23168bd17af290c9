"""OpenVision 2 training efficiency in MLX: images/s and peak memory of a full
training step (encoder + masked caption decoder, forward, backward, AdamW)
with keep_ratio 0.35 vs 1.0, and stage-1 low resolution vs high resolution.

    python benchmarks/bench_openvision2.py                       # small CPU sizes
    python benchmarks/bench_openvision2.py --vision L --decoder L --batch 32 --high-res 224

Every configuration runs in this one process, same sizes and batch, median of
`--steps` timed steps after `--warmup` untimed ones; peak memory is
`mx.get_peak_memory()` after `mx.reset_peak_memory()` around the timed steps.
"""

import argparse
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


def measure(a, size: int, keep: float) -> dict:
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
    key = mx.random.key(0)
    for _ in range(a.warmup):
        step([batch], key)
    mx.reset_peak_memory()
    times = []
    for i in range(a.steps):
        tic = time.perf_counter()
        step([batch], mx.random.key(i))
        times.append(time.perf_counter() - tic)
    t = float(np.median(times))
    n = (size // a.patch) ** 2
    return {"size": size, "keep": keep, "tokens": n, "kept": min(int(n * keep), n),
            "step_s": t, "img_s": a.batch / t, "peak_mb": mx.get_peak_memory() / 2**20}


def row(r, base=None):
    rel = ""
    if base is not None:
        rel = f" | {r['img_s'] / base['img_s']:.2f}x | {r['peak_mb'] / base['peak_mb']:.2f}x"
    return (f"| {r['size']} | {r['keep']} | {r['tokens']} -> {r['kept']} | {r['step_s'] * 1000:.0f} "
            f"| {r['img_s']:.1f} | {r['peak_mb']:.0f}{rel} |")


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
    print("| res | keep | image tokens -> decoder | step (ms) | images/s | peak MB | speed-up | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (a.low_res, a.high_res):
        full = measure(a, size, 1.0)
        masked = measure(a, size, 0.35)
        print(row(full))
        print(row(masked, full))

    print("\n### stage 1 (low res) vs high res all along, keep 0.35\n")
    low, high = measure(a, a.low_res, 0.35), measure(a, a.high_res, 0.35)
    ratio = (high["step_s"] / a.batch) / (low["step_s"] / a.batch)
    print(f"time per sample: {a.low_res}px {low['step_s'] / a.batch * 1000:.1f} ms, "
          f"{a.high_res}px {high['step_s'] / a.batch * 1000:.1f} ms -> high/low = {ratio:.2f}x")


if __name__ == "__main__":
    from mlx_vlm_native.cli import ensure_fast_blas

    ensure_fast_blas()
    main()
