"""NaViT training efficiency, in one process, ratios in one run:

1. packed (NaViT) vs padded-to-max vs resized-to-square training of the same
   classifier on the same data (lone-shape pictures of the shapes world written
   by train/navit/make_shapes_data.py, `--train` of them read in epochs, colour
   labels, long sides sampled in [min-side, max-side] with the aspect ratio kept): images/s,
   tokens/s, padding fraction, peak memory, then held-out accuracy after the
   same CPU-time budget;
2. packed training with token dropping at rates 0, 0.25 and 0.5: the same;
3. finetuning text, packed vs right-padded, on conversations of mixed
   lengths (a tiny random Qwen2-VL): answer tokens/s and padding fraction.

    python benchmarks/bench_navit.py                    # ~8 minutes on 2 CPU cores
    python benchmarks/bench_navit.py --seconds 120 --eval 512

The budget is process CPU time (`time.process_time`), less sensitive to other
processes on a shared machine than wall time; wall time is reported too.
Every variant trains with the task's own batching (`training/navit.py`) on the
shared loop, constant learning rate after a short warmup.
"""

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_vlm_native.training import navit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: convert/ and train/
from train.navit.make_shapes_data import classes, write_split  # noqa: E402


def base_recipe(args, out) -> dict:
    return {
        "family": "navit", "data": {"jsonl": str(args.data / "train.jsonl")}, "classes": classes(args.label),
        "model": {"patch_size": 16, "hidden_size": args.width, "num_layers": args.layers, "num_heads": 4,
                  "position_table": 16},
        "image": {"min_side": args.min_side, "max_side": args.max_side},
        "batching": {"mode": "packed", "seq_len": args.seq_len, "sequences": args.sequences},
        "token_drop": None, "steps": 100_000, "seed": 0, "output": str(out),
        "optim": {"lr": args.lr, "warmup_steps": 10, "end_lr": args.lr},
    }


def token_stats(args) -> dict:
    """Token counts of the sampled training resolutions, to size the baselines."""
    data = navit.open_data(base_recipe(args, None)["data"], 0, classes(args.label))
    counts = []
    for s, _ in itertools.islice(data.iterate(), 400):
        rng = np.random.default_rng((0, *s.key))
        h, w = navit.image_size(s.image, {"min_side": args.min_side, "max_side": args.max_side}, 16, rng)
        counts.append(h * w // 256)
    return {"mean": float(np.mean(counts)), "max": int(np.max(counts))}


def train_for(recipe: dict, seconds: float) -> dict:
    mx.reset_peak_memory()
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    result = navit.run(recipe, progress=False, should_stop=lambda: time.process_time() - start_cpu >= seconds)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    stats = result["stats"]
    steps = result["step"]
    return {"model": result["model"], "steps": steps, "cpu_s": cpu, "wall_s": wall,
            "images": stats["images"], "tokens": stats["tokens"], "padding": stats["padding"],
            "peak_mb": mx.get_peak_memory() / 1e6}


def held_out(args):
    return navit.LabelledFiles({"jsonl": str(args.data / "valid.jsonl"), "shuffle": False}, classes=classes(args.label))


def evaluate(model, samples, **resolution) -> float:
    return navit.accuracy(model, samples, **resolution)


def vision_rows(args, tmp: Path, samples) -> list:
    stats = token_stats(args)
    per_batch = args.seq_len * args.sequences
    images = max(1, round(per_batch / stats["mean"]))
    square = int(round(np.sqrt(stats["mean"]))) * 16
    print(f"[bench] sampled resolutions: mean {stats['mean']:.1f} tokens, max {stats['max']}; "
          f"padded/square batches of {images} images; square side {square}")
    variants = [
        ("packed", {}, None),
        ("padded-to-max", {"batching": {"mode": "padded", "images": images}}, None),
        ("resized-to-square", {"batching": {"mode": "square", "images": images, "side": square}}, square),
        ("packed, drop 0.25", {"token_drop": {"rate": 0.25}}, None),
        ("packed, drop 0.5", {"token_drop": {"rate": 0.5}}, None),
    ]
    rows = []
    for name, extra, side in variants:
        recipe = {**base_recipe(args, tmp / name.replace(" ", "_").replace(",", "")), **extra}
        r = train_for(recipe, args.seconds)
        model = r.pop("model")
        model.eval()
        at = {"side": side} if side else {"long_side": args.eval_side}
        r["accuracy"] = evaluate(model, samples, **at)
        if name == "packed":
            r["curve"] = navit.resolution_curve(model, samples, args.curve)
        r["name"] = name
        rows.append(r)
        print(f"[bench] {name}: {r['steps']} steps, {r['images']} images, acc {r['accuracy']:.3f}", flush=True)
    return rows


# ---------------------------------------------------------------- text packing


def text_rows(args, tmp: Path) -> list:
    from PIL import Image

    from mlx_vlm_native import load
    from convert.write_hf_release import write_checkpoint
    from mlx_vlm_native.training.finetune import (
        ConversationFile, PackedBatch, answer_loss, answer_tokens, parse_record, sample_batches, tokenize,
    )

    model, processor = load(str(write_checkpoint(tmp / "qwen", "qwen2-vl-tiny")))
    rng = np.random.default_rng(0)
    samples, records = [], []
    for i in range(args.conversations):
        h, w = (int(x) for x in rng.integers(2, 5, 2) * 28)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / f"c{i}.png")
        turns = int(rng.integers(1, 5))
        conv = []
        for t in range(turns):
            q = "Question" + " about it" * int(rng.integers(0, 12))
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                     {"from": "gpt", "value": "Answer" + " words" * int(rng.integers(1, 30)) + "."}]
        records.append({"images": [f"c{i}.png"], "conversations": conv})
        samples.append(tokenize(processor, parse_record(records[-1], tmp)))
    lengths = [len(s[0].input_ids) for s in samples]
    budget = args.pack_tokens or max(lengths)
    (tmp / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data = ConversationFile(tmp / "chats.jsonl", shuffle=False)

    def one_epoch(**kw):  # the task's own batching, until every conversation is in a batch
        out = []
        for batch, position in sample_batches(data, processor, max_tokens=10_000, **kw):
            out.append(batch)
            if position["epoch"] > 0 or position["index"] == len(data):
                return out

    padded = one_epoch(micro_batch=args.text_batch)
    packed = one_epoch(micro_batch=args.pack_rows, pack_tokens=budget)
    loss_and_grad = nn.value_and_grad(model, lambda m, b: answer_loss(m, b)[0])
    opt = optim.Adam(1e-4)
    out = {}
    for name, batches in (("padded", padded), ("packed", packed)) * args.text_rounds:
        positions = sum((len(b) * max(len(s[0].input_ids) for s in b)) if not isinstance(b, PackedBatch)
                        else len(b) * max(sum(len(s[0].input_ids) for s in r) for r in b) for b in batches)
        real = sum(len(s[0].input_ids) for b in batches for r in (b if isinstance(b, PackedBatch) else [b])
                   for s in r)
        l, g = loss_and_grad(model, batches[0])  # warm-up
        mx.eval(l, g)
        mx.reset_peak_memory()
        cpu, wall = time.process_time(), time.perf_counter()
        for b in batches:
            l, g = loss_and_grad(model, b)
            opt.update(model, g)
            mx.eval(l, model.parameters(), opt.state)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        answers = sum(answer_tokens(b) for b in batches)
        row = {"name": name, "micro_batches": len(batches), "answer_tokens": answers,
               "positions": positions, "real": real, "cpu_s": cpu, "wall_s": wall,
               "peak_mb": mx.get_peak_memory() / 1e6}
        if name not in out or cpu < out[name]["cpu_s"]:  # the faster of the interleaved rounds
            out[name] = row
    return list(out.values()), {"conversations": len(samples), "min": min(lengths), "max": max(lengths),
                 "mean": float(np.mean(lengths)), "budget": budget}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=50, help="CPU-time budget of each vision variant")
    p.add_argument("--eval", type=int, default=384, help="held-out images")
    p.add_argument("--label", default="colour")
    p.add_argument("--train", type=int, default=6000, help="training pictures written (read in epochs)")
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-side", type=int, default=48)
    p.add_argument("--max-side", type=int, default=192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--eval-side", type=int, default=128, help="long side for the packed/padded accuracy")
    p.add_argument("--curve", type=int, nargs="*", default=[32, 48, 64, 96, 128, 192, 256, 320])
    p.add_argument("--conversations", type=int, default=48)
    p.add_argument("--text-batch", type=int, default=8)
    p.add_argument("--pack-tokens", type=int, default=0, help="row length (default: the longest conversation)")
    p.add_argument("--pack-rows", type=int, default=4, help="packed rows per micro-batch")
    p.add_argument("--text-rounds", type=int, default=2, help="interleaved timing rounds (the faster is kept)")
    p.add_argument("--skip-vision", action="store_true")
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report = {"args": dict(vars(args))}
        if not args.skip_vision:
            args.data = tmp / "shapes"
            write_split(args.data, "train", args.train, 0, args.label)
            write_split(args.data, "valid", args.eval, 10_000, args.label)
            data = held_out(args)
            samples = [data.get(n, (0, n)) for n in range(args.eval)]
            rows = vision_rows(args, tmp, samples)
            report["vision"] = [{k: v for k, v in r.items()} for r in rows]
            base = rows[0]
            print(f"\n## vision: {args.seconds:.0f} s CPU each, {args.label} labels, long sides "
                  f"{args.min_side}-{args.max_side}, eval {len(samples)} held-out images")
            print("| variant | steps | images/s | tokens/s | padding | peak MB | accuracy | vs packed (img/s, acc) |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                ips, tps = r["images"] / r["cpu_s"], r["tokens"] / r["cpu_s"]
                pad = r["padding"] / max(r["tokens"] + r["padding"], 1)
                ratio = (r["images"] / r["cpu_s"]) / (base["images"] / base["cpu_s"])
                print(f"| {r['name']} | {r['steps']} | {ips:.1f} | {tps:.0f} | {pad:.1%} | {r['peak_mb']:.0f} | "
                      f"{r['accuracy']:.3f} | {ratio:.2f}x, {r['accuracy'] - base['accuracy']:+.3f} |")
            curve = base["curve"]
            print("\naccuracy of the packed model by long side (trained on "
                  f"{args.min_side}-{args.max_side}): " + ", ".join(f"{k}: {v:.3f}" for k, v in curve.items()))
        text, info = text_rows(args, tmp)
        report["text"], report["text_data"] = text, info
        print(f"\n## finetuning text: {info['conversations']} conversations of {info['min']}-{info['max']} tokens "
              f"(mean {info['mean']:.0f}), padded batches of {args.text_batch} vs {args.pack_rows} rows of {info['budget']} tokens")
        print("| batching | micro-batches | answer tokens/s | padding | peak MB |")
        print("|---|---|---|---|---|")
        for r in text:
            print(f"| {r['name']} | {r['micro_batches']} | {r['answer_tokens'] / r['cpu_s']:.0f} | "
                  f"{1 - r['real'] / r['positions']:.1%} | {r['peak_mb']:.0f} |")
        a, b = text
        print(f"packed / padded answer tokens/s: {(b['answer_tokens'] / b['cpu_s']) / (a['answer_tokens'] / a['cpu_s']):.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    from mlx_vlm_native.cli import ensure_fast_blas

    ensure_fast_blas()
    main()
