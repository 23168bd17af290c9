"""LoRA finetuning at a real size: this project's trainer against mlx-vlm's, on
one random-weight Qwen2-VL-2B folder (see benchmarks/README.md).

    python benchmarks/bench_finetune.py [--folder /tmp/bench_finetune] [--preset 2b|2b-4layers|tiny]
        [--only ours-fp32,mlx-vlm-fp32,ours-bf16,mlx-vlm-bf16,ours-q4,mlx-vlm-q4,load]
        [--steps 2] [--steps-bf16 1] [--out results.json]

One hub release (Qwen2-VL-2B-Instruct's geometry, random weights, bf16 shards)
is written once under --folder and converted by `mlx-vlm-native convert` into
three MLX folders (fp32, bf16, and 4-bit with the tower in bf16) that both
projects load (`2b-4layers`: the same widths, vocabulary and image with 4
decoder layers and 4 tower blocks; `tiny`: a smoke test). One record: a
448x448 image, a short question and an answer of --answer-tokens tokens. Each (trainer, folder) runs in its own subprocess:
LoRA rank 8 on every decoder projection, batch 1, Adam; one warm-up step, then
--steps timed steps (the wall and CPU seconds between the ends of consecutive
steps, data preparation included on both sides). Peak memory is the worker's
`mx.get_peak_memory()` (weights included) and `ru_maxrss`.

- ours: `mlx_vlm_native.training.finetune.run` (what `mlx-vlm-native train
  --fine-tune-type lora --lora-rank 8` runs), the record in the LLaVA form;
- mlx-vlm 0.7.10: `mlx_vlm.train.run` (what `python -m mlx_vlm.train` runs)
  with `--train-on-completions` (the loss on the answer, as ours), the same
  targets, rank and scale, the record in its `messages` form.

`load` measures each folder's weights in memory after loading, in both
projects (seconds, no step): what a 4-bit base saves before any activation.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: convert/'s writers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared helpers

PRESETS = {"2b": "qwen2-vl-2b", "2b-4layers": "qwen2-vl-2b-4layers", "tiny": "qwen2-vl-tiny"}
FOLDERS = {"fp32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"),
           "q4": dict(dtype="bfloat16", quantize=True, q_bits=4, q_group_size=64)}
RUNS = ["ours-fp32", "mlx-vlm-fp32", "ours-bf16", "mlx-vlm-bf16", "ours-q4", "mlx-vlm-q4"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, SCALE, LR = 8, 20.0, 3e-4  # our defaults; mlx-vlm's scale is alpha / rank
QUESTION = "Describe this image in detail."
WORDS = ("the red circle sits next to a blue square on a white background while a green ball "
         "rolls from left to right under the bright star at the top of the picture").split()


# ------------------------------------------------------------------ the folder and the data


def write_folders(root: Path, preset: str) -> dict:
    """The hub release and its three MLX conversions (kept when already there)."""
    from convert import write_hf_release
    from mlx_vlm_native.convert import convert

    # Qwen2-VL-2B's widths, vocabulary and image, 4 decoder layers and 4 tower blocks: the
    # per-layer figures where a whole 2B step is too slow (bf16 and 4-bit on a CPU)
    real = write_hf_release.PRESETS["qwen2-vl-2b"]
    write_hf_release.PRESETS["qwen2-vl-2b-4layers"] = dict(
        real, vision=dict(real["vision"], depth=4), text=dict(real["text"], num_hidden_layers=4))
    hub = root / "hub"
    if not (hub / "model.safetensors.index.json").exists():
        tic = time.perf_counter()
        write_hf_release.write_qwen2_vl_checkpoint(hub, PRESETS[preset], seed=1, dtype="bfloat16",
                                                   shard_bytes=1 << 30)
        print(f"[bench] wrote {hub} in {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
    out = {}
    for name, options in FOLDERS.items():
        dst = root / name
        if not (dst / "config.json").exists():
            tic = time.perf_counter()
            convert(str(hub), str(dst), **options)
            print(f"[bench] converted {dst} in {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
        out[name] = dst
    return out


def answer_text(tokenizer, n: int) -> str:
    """Words until the answer is exactly `n` tokens (alone), trimmed a token at a time."""
    words, text = [], ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < n:
        words.append(WORDS[len(words) % len(WORDS)])
        text = " ".join(words).capitalize() + "."
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) > n:
        text = tokenizer.decode(ids[: len(ids) - 1])
        ids = tokenizer.encode(text, add_special_tokens=False)
    return text


def write_data(root: Path, hub: Path, image_size: int, answer_tokens: int) -> dict:
    """One record, twice: ours (LLaVA form) and mlx-vlm's (`messages`, in a folder
    holding train.jsonl), the same image file and answer."""
    from bench_llava_onevision import make_image
    from transformers import AutoTokenizer

    data = root / f"data-{image_size}-{answer_tokens}"
    (data / "mlx_vlm").mkdir(parents=True, exist_ok=True)
    image = data / "image.png"
    make_image(image_size, image_size, seed=0).save(image)
    answer = answer_text(AutoTokenizer.from_pretrained(str(hub)), answer_tokens)
    ours = {"images": [str(image)], "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]}
    theirs = {"images": [str(image)], "messages": [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]}
    (data / "ours.jsonl").write_text(json.dumps(ours) + "\n")
    (data / "mlx_vlm" / "train.jsonl").write_text(json.dumps(theirs) + "\n")
    return {"ours": str(data / "ours.jsonl"), "mlx-vlm": str(data / "mlx_vlm")}


# ------------------------------------------------------------------ workers


def mlx_blas() -> str:
    maps = Path("/proc/self/maps")
    return "OpenBLAS" if maps.exists() and "libopenblas" in maps.read_text() else "MLX's bundled BLAS"


def memory() -> dict:
    import mlx.core as mx

    return {"mlx_peak_gb": mx.get_peak_memory() / 1e9,
            "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "blas": mlx_blas()}


def now():
    """(wall seconds, CPU seconds of this process: all its threads)."""
    return time.perf_counter(), time.process_time()


def step_seconds(ends: list, start: list) -> dict:
    """Steps from the (wall, CPU) times their ends were reported: the first
    (warm-up) step is timed from the start of the training loop (model loaded,
    adapters on) and left out of the medians. CPU seconds are far steadier than
    wall seconds on a shared machine."""
    wall = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    return {"step_s": statistics.median(wall) if wall else None, "steps_s": wall,
            "step_cpu_s": statistics.median(cpu) if cpu else None, "steps_cpu_s": cpu,
            "first_step_s": ends[0][0] - start[0][0] if ends and start else None,
            "first_step_cpu_s": ends[0][1] - start[0][1] if ends and start else None}


def timed_entry(module, name: str, start: list) -> None:
    """Record when `module.name` (a training loop) is entered."""
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        start.append(now())
        return fn(*args, **kwargs)

    setattr(module, name, wrapped)


def weight_dtype(model) -> str:
    from mlx.utils import tree_flatten

    return str(next(v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("q_proj.weight")))


def worker_ours(folder: str, data: str, steps: int, out: str) -> dict:
    from mlx_vlm_native.training import finetune

    lengths, ends, losses = [], [], []
    tokenize = finetune.tokenize

    def counted(processor, conversation, mask_prompt=True):
        inputs, mask = tokenize(processor, conversation, mask_prompt)
        lengths.append((len(inputs.input_ids), int(mask.sum())))
        return inputs, mask

    finetune.tokenize = counted
    start = []
    timed_entry(finetune, "train", start)
    recipe = {"model": folder, "data": {"train": data}, "method": "lora",
              "lora": {"rank": RANK, "scale": SCALE, "targets": [r"language_model\..*(q|k|v|o|gate|up|down)_proj"]},
              "steps": steps, "micro_batch_size": 1, "optim": {"lr": LR}, "output": out, "seed": 0}
    finetune.run(recipe, progress=False, on_step=lambda step, loss: (ends.append(now()),
                                                                      losses.append(loss)))
    return {**step_seconds(ends, start), **memory(), "losses": losses,
            "tokens": lengths[0][0], "answer_tokens": lengths[0][1]}


def worker_mlx_vlm(folder: str, data: str, steps: int, out: str) -> dict:
    from mlx_vlm import train as peer
    from mlx_vlm.trainer.common import engine
    from mlx_vlm.trainer.common.callbacks import TrainingCallback

    start = []
    timed_entry(engine, "train", start)  # Trainer.train imports it from there when called

    reports, ends = [], []

    class Report(TrainingCallback):
        def on_train_loss_report(self, info):
            ends.append(now())
            reports.append(info)

    args, settings = peer.parse_args([
        "--model", folder, "--data", data, "--iters", str(steps), "--batch-size", "1",
        "--steps-per-report", "1", "--steps-per-save", "1000000", "--optimizer", "adam",
        "--learning-rate", str(LR), "--lora-rank", str(RANK), "--lora-alpha", str(SCALE * RANK),
        "--target-modules", *PROJECTIONS, "--train-on-completions", "--max-seq-length", "8192",
        "--output-path", out,
    ])
    peer.run(args, settings, training_callback=Report())
    first = reports[0]
    return {**step_seconds(ends, start), **memory(), "losses": [r["train_loss"] for r in reports],
            "own_step_s": [r["step_time"] for r in reports],
            "tokens": int(round(first.get("average_sequence_length", 0))) + 1,  # its inputs drop the last token
            "padded_tokens": int(first.get("num_padded_tokens", 0) if "num_padded_tokens" in first else 0)}


def worker_load(folders: dict) -> dict:
    """Active MLX memory of each folder's loaded model, in each project."""
    import gc

    import mlx.core as mx
    import mlx_vlm
    import mlx_vlm_native

    out = {}
    for name, folder in folders.items():
        for project, load in (("ours", mlx_vlm_native.load), ("mlx-vlm", mlx_vlm.load)):
            gc.collect()
            mx.clear_cache()
            before = mx.get_active_memory()
            model, _ = load(folder)
            mx.eval(model.parameters())
            out[f"{project}-{name}"] = {"weights_gb": (mx.get_active_memory() - before) / 1e9,
                                        "q_proj": weight_dtype(model)}
            del model
    return out


def worker(spec: dict) -> dict:
    if spec["run"] == "build":  # in its own process too: the conversions' memory goes with it
        root = Path(spec["root"])
        folders = write_folders(root, spec["preset"])
        data = write_data(root, root / "hub", spec["image_size"], spec["answer_tokens"])
        return {"folders": {k: str(v) for k, v in folders.items()}, "data": data,
                "params": count_params(root / "hub")}
    if spec["run"] == "load":
        return worker_load(spec["folders"])
    project, name = spec["run"].rsplit("-", 1)
    fn = worker_ours if project == "ours" else worker_mlx_vlm
    with tempfile.TemporaryDirectory() as out:
        result = fn(spec["folders"][name], spec["data"][project], spec["steps"], out)
    return result


def run_worker(spec: dict, echo: bool = False) -> dict:
    """`spec` in a fresh process (this script with --worker); `echo`: its stderr
    goes to ours as it comes."""
    from mlx_vlm_native.cli import find_openblas

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if "openblas" not in env.get("LD_PRELOAD", "") and find_openblas():
        env["LD_PRELOAD"] = find_openblas()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", f.name], env=env, stdout=subprocess.PIPE,
                          stderr=None if echo else subprocess.PIPE, text=True)
    os.unlink(f.name)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - tic
    return result


# ------------------------------------------------------------------ the table


def fmt(value, spec=".1f", none="—"):
    return none if value is None else format(value, spec)


def speed_ratio(ours: dict, theirs: dict) -> str:
    """mlx-vlm's seconds per step over ours (> 1: ours faster): CPU seconds where
    both have them, else wall; from the first step where no later one ran."""
    for key, label in (("step_cpu_s", "CPU"), ("step_s", "wall"), ("first_step_cpu_s", "CPU, first step"),
                       ("first_step_s", "wall, first step")):
        if ours.get(key) and theirs.get(key):
            return f"{theirs[key] / ours[key]:.2f}x ({label})"
    return ""


def print_table(results: dict, params: float) -> None:
    print("\n| base | trainer | tokens (answer) | s/step | CPU s/step | first step s | MLX peak GB | peak RSS GB | "
          "speed vs mlx-vlm | memory vs mlx-vlm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in FOLDERS:
        ours, theirs = results.get(f"ours-{name}"), results.get(f"mlx-vlm-{name}")
        for project, r in (("mlx-vlm-native", ours), ("mlx-vlm 0.7.10", theirs)):
            if r is None:
                continue
            if "error" in r:
                print(f"| {name} | {project} | error: {r['error'].splitlines()[-1][:80]} | | | | | | | |")
                continue
            speed = memory_ratio = ""
            if project == "mlx-vlm-native" and theirs and "error" not in theirs:
                speed = speed_ratio(r, theirs)
                memory_ratio = f"{r['mlx_peak_gb'] / theirs['mlx_peak_gb']:.2f}x"
            tokens = f"{r['tokens']}" + (f" ({r['answer_tokens']})" if "answer_tokens" in r else "")
            print(f"| {name} | {project} | {tokens} | {fmt(r['step_s'])} | {fmt(r.get('step_cpu_s'))} | "
                  f"{fmt(r.get('first_step_s'))} | {r['mlx_peak_gb']:.2f} | {r['rss_peak_gb']:.2f} | {speed} | "
                  f"{memory_ratio} |")
    load = results.get("load")
    if load and "error" not in load:
        print("\nweights in memory after load (GB):",
              ", ".join(f"{k} {v['weights_gb']:.2f} ({v['q_proj']})" for k, v in load.items() if isinstance(v, dict)))
    q4, bf16 = results.get("ours-q4"), results.get("ours-bf16")
    if q4 and bf16 and "error" not in q4 and "error" not in bf16:
        print(f"QLoRA (4-bit base) saves {bf16['mlx_peak_gb'] - q4['mlx_peak_gb']:.2f} GB of peak memory "
              f"against the bf16 base ({q4['mlx_peak_gb'] / bf16['mlx_peak_gb']:.2f}x)")
    print(f"\nparameters: {params / 1e9:.3f} B")
    for name in FOLDERS:
        r = results.get(f"ours-{name}")
        if r and "error" not in r:
            per = r["mlx_peak_gb"] * 1e9 / params
            print(f"ours {name}: {per:.2f} bytes of peak per parameter -> about "
                  f"{22e9 / per / 1e9:.1f} B parameters in 22 GB (an estimate: see benchmarks/README.md)")


def count_params(folder: Path) -> float:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "numpy") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "bench_finetune"))
    p.add_argument("--preset", choices=list(PRESETS), default="2b")
    p.add_argument("--only", default=",".join(RUNS + ["load"]))
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up (fp32)")
    p.add_argument("--steps-bf16", type=int, default=None,
                   help="timed steps for the bf16 and 4-bit runs (default --steps; MLX's CPU bf16 and "
                        "quantized matmuls are far slower than fp32 with OpenBLAS)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--out", help="write the results here as JSON (merged into an existing file)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(Path(a.worker).read_text()))))
        return
    built = run_worker({"run": "build", "root": str(Path(a.folder) / a.preset), "preset": a.preset,
                        "image_size": a.image_size, "answer_tokens": a.answer_tokens}, echo=True)
    if "error" in built:
        sys.exit(f"[bench] building the folders failed: {built['error']}")
    folders, data, params = built["folders"], built["data"], built["params"]
    results = json.loads(Path(a.out).read_text()) if a.out and Path(a.out).exists() else {}
    for run in a.only.split(","):
        steps = a.steps if run.endswith("fp32") or a.steps_bf16 is None else a.steps_bf16
        spec = {"run": run, "folders": folders, "data": data, "steps": 1 + steps}
        print(f"[bench] {run} ...", flush=True)
        results[run] = run_worker(spec)
        print(f"[bench] {run}: {json.dumps(results[run])}", flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2))
    print_table(results, params)


if __name__ == "__main__":
    main()
