"""LLaVA-OneVision on CPU: this project against transformers (torch, fp32) and,
when installed, mlx-vlm, on one checkpoint, image and prompt; see README.md.

    python benchmarks/bench_llava_onevision.py [--model PATH | --preset tiny]
        [--image-size 500x800 --decode-tokens 32 --runs 3] [--mlx-vlm-python PY]

Each framework runs in its own subprocess (`--worker NAME`), so peak memory is
per framework.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: convert/'s layout fixtures

PROMPT = "Describe this image in detail."
METRICS = [  # key, label, higher is better
    ("preprocess_ms", "image preprocessing (ms)", False),
    ("prefill_tps", "prefill (tokens/s)", True),
    ("decode_tps", "decode (tokens/s)", True),
    ("peak_rss_mb", "peak RSS (MB)", False),
    ("mlx_peak_mb", "MLX peak memory (MB)", False),
]


def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise, like the tests' images (resampling has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def time_stream(tokens):
    """Seconds to the first token, then tokens/s for the rest of the stream."""
    tic = time.perf_counter()
    it = iter(tokens)
    next(it)
    first = time.perf_counter()
    rest = sum(1 for _ in it)
    return first - tic, rest / (time.perf_counter() - first)


def measure(preprocess, generate, n_prompt: int, runs: int) -> dict:
    """One warm-up, then medians; `generate()` -> (prefill seconds, decode tokens/s)."""
    results = []
    for _ in range(runs + 1):
        tic = time.perf_counter()
        preprocess()
        pre = time.perf_counter() - tic
        prefill, decode_tps = generate()
        results.append((pre * 1e3, n_prompt / prefill, decode_tps))
    pre, prefill, decode = (statistics.median(col) for col in zip(*results[1:]))
    return dict(preprocess_ms=pre, prefill_tps=prefill, decode_tps=decode, prompt_tokens=n_prompt)


def mlx_blas() -> str:
    maps = Path("/proc/self/maps")
    return "OpenBLAS (LD_PRELOAD)" if maps.exists() and "libopenblas" in maps.read_text() else "MLX's bundled BLAS"


def worker_ours(spec, image):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    import mlx_vlm_native
    from mlx_vlm_native.processors.image import load_image, to_chw

    model, processor = mlx_vlm_native.load(spec["model"])
    inputs = processor(spec["prompt"], images=[image])
    n = spec["decode_tokens"]

    def generate():
        embeds = model.get_input_embeddings(inputs)[0][0]
        ids = mx.array(inputs.input_ids)
        return time_stream(generate_step(ids, model, max_tokens=n + 1, input_embeddings=embeds))

    preprocess = lambda: processor.image_processor.anyres_crops(to_chw(load_image(image)))
    stats = measure(preprocess, generate, len(inputs.input_ids), spec["runs"])
    return dict(stats, mlx_peak_mb=mx.get_peak_memory() / 2**20, blas=mlx_blas(),
                version=mlx_vlm_native.__version__)


def worker_transformers(spec, image):
    import torch
    import transformers
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    torch.set_num_threads(os.cpu_count())
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32).eval()
    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(spec["model"])
    # the same input ids and pixel values as this project's processor gives
    data = np.load(spec["inputs"])
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))[None]
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids),
        pixel_values=torch.from_numpy(data["pixel_values"])[None],
        image_sizes=torch.from_numpy(data["image_sizes"])[None], batch_num_images=torch.tensor([1]),
    )
    n = spec["decode_tokens"]

    class Clock(BaseStreamer):  # generate() puts the prompt, then each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate():
        clock, tic = Clock(), time.perf_counter()
        with torch.inference_mode():
            model.generate(**kwargs, max_new_tokens=n + 1, min_new_tokens=n + 1,
                           do_sample=False, streamer=clock)
        t = clock.times  # the prompt, the first token, then the decoded ones
        return t[1] - tic, (len(t) - 2) / (t[-1] - t[1])

    preprocess = lambda: image_processor(images=[image], return_tensors="pt")
    stats = measure(preprocess, generate, ids.shape[1], spec["runs"])
    blas = "MKL" if torch.backends.mkl.is_available() else "built-in BLAS"
    return dict(stats, blas=f"torch {blas}, {torch.get_num_threads()} threads", version=transformers.__version__)


def worker_mlx_vlm(spec, image):
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.utils import prepare_inputs

    model, processor = mlx_vlm.load(spec["model"])
    inputs = prepare_inputs(processor, images=[image], prompts=spec["prompt"],
                            image_token_index=model.config.image_token_index)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    n = spec["decode_tokens"]

    def generate():
        return time_stream(generate_step(
            inputs["input_ids"], model, inputs["pixel_values"], inputs["attention_mask"],
            max_tokens=n + 1, temperature=0.0, **extra,
        ))

    preprocess = lambda: processor.image_processor(images=[image])
    stats = measure(preprocess, generate, inputs["input_ids"].shape[1], spec["runs"])
    return dict(stats, mlx_peak_mb=mx.get_peak_memory() / 2**20, blas=mlx_blas(),
                version=mlx_vlm.__version__)


WORKERS = {"mlx-vlm-native": worker_ours, "transformers": worker_transformers, "mlx-vlm": worker_mlx_vlm}


def run_worker(name, python, spec_file, preload_openblas):
    """MLX workers get OpenBLAS preloaded (MLX's Linux wheel bundles the reference
    BLAS); torch must not: with OpenBLAS preloaded it runs ~10x slower."""
    from mlx_vlm_native.cli import find_openblas

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if preload_openblas and find_openblas():
        env["LD_PRELOAD"] = find_openblas()
    cmd = [python, __file__, "--worker", name, "--spec", str(spec_file)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not lines:
        print(f"{name}: failed (exit {r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def prepare(args, work: Path) -> Path:
    """The checkpoint (built if needed), the image, and our processor's inputs."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from mlx_vlm_native.models.llava_onevision import ModelArgs
    from mlx_vlm_native.processors.llava_onevision import LlavaOnevisionProcessor
    from convert.write_hf_release import write_checkpoint
    from mlx_vlm_native.utils import load_config

    model = Path(args.model) if args.model else None
    if model is None:
        print(f"building a random {args.preset!r} checkpoint ...", flush=True)
        model = write_checkpoint(work / "model", args.preset)
        mx.clear_cache()
    config = ModelArgs.from_dict(load_config(model))
    processor = LlavaOnevisionProcessor.from_pretrained(model, load_tokenizer(model), config)
    h, w = args.image_size
    make_image(h, w).save(work / "image.png")
    prompt = processor.format_prompt(PROMPT, num_images=1)
    inputs = processor(prompt, images=[work / "image.png"])
    np.savez(work / "inputs.npz", input_ids=inputs.input_ids, pixel_values=inputs.pixel_values[0],
             image_sizes=np.array(inputs.image_sizes[0]))
    spec = dict(model=str(model), prompt=prompt, image=str(work / "image.png"),
                inputs=str(work / "inputs.npz"), decode_tokens=args.decode_tokens, runs=args.runs)
    (work / "spec.json").write_text(json.dumps(spec))
    return work / "spec.json"


def cell(key, value, base, higher_is_better):
    """The value, and how the framework compares with this project."""
    if value is None:
        return "n/a"
    text = f"{value:.1f}"
    if base is None:
        return text
    r = base / value if higher_is_better else value / base  # > 1: worse than ours
    worse, better = ("more", "less") if key.endswith("_mb") else ("slower", "faster")
    return f"{text} ({r:.2f}x {worse})" if r >= 1 else f"{text} ({1 / r:.2f}x {better})"


def cpu_seconds():
    """(CPU seconds used by the whole machine, by this process's children); Linux."""
    if not Path("/proc/stat").exists():
        return None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = list(map(int, Path("/proc/stat").read_text().split("\n")[0].split()[1:8]))
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def print_table(results, args, others):
    names = list(results)
    ours = results["mlx-vlm-native"]
    print(f"\nLLaVA-OneVision, {args.model or 'random ' + args.preset + ' checkpoint'}, fp32, "
          f"one {args.image_size[0]}x{args.image_size[1]} image, {ours['prompt_tokens']} prompt tokens, "
          f"{args.decode_tokens} decode tokens, median of {args.runs} after a warm-up")
    load = "" if others is None else f"; other processes used {others:.0%} of the CPU during the runs"
    if others and others > 0.1:
        load += " (expect noise; torch suffers most)"
    print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores{load}\n")
    print("| metric | " + " | ".join(f"{n} {results[n]['version']}" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key, label, higher in METRICS:
        row = [cell(key, results[n].get(key), None if r is ours else ours.get(key), higher)
               for n, r in results.items()]
        print(f"| {label} | " + " | ".join(row) + " |")
    print("\nRatios are to mlx-vlm-native. BLAS: " + "; ".join(f"{n}: {results[n]['blas']}" for n in names))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF-layout LLaVA-OneVision folder (default: a random --preset one)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "llava-onevision-0.5b"])
    p.add_argument("--image-size", default="500x800", type=lambda s: tuple(map(int, s.split("x"))),
                   help="HxW of the synthetic image (500x800: 2x3 tiles + base, 4829 image tokens)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mlx-vlm-python", help="python of a venv with mlx-vlm installed")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        image = Image.open(spec["image"]).convert("RGB")
        result = WORKERS[args.worker](spec, image)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        result["peak_rss_mb"] = rss / (2**20 if sys.platform == "darwin" else 2**10)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare(args, Path(tmp))
        frameworks = [("mlx-vlm-native", sys.executable, True), ("transformers", sys.executable, False)]
        if args.mlx_vlm_python:
            frameworks.append(("mlx-vlm", args.mlx_vlm_python, True))
        elif importlib.util.find_spec("mlx_vlm") is not None:
            frameworks.append(("mlx-vlm", sys.executable, True))
        else:
            print("mlx-vlm: not installed (pip install mlx-vlm, or pass --mlx-vlm-python)")
        tic, before = time.perf_counter(), cpu_seconds()
        results = {}
        for name, python, preload in frameworks:
            print(f"running {name} ...", flush=True)
            results[name] = run_worker(name, python, spec, preload)
        results = {k: v for k, v in results.items() if v is not None}
        others = None
        if before is not None:  # CPU used by other processes, as a share of all cores
            (busy, ours), (busy2, ours2) = before, cpu_seconds()
            others = max(busy2 - busy - (ours2 - ours), 0) / ((time.perf_counter() - tic) * os.cpu_count())
    if "mlx-vlm-native" not in results:
        sys.exit("mlx-vlm-native failed: nothing to compare with")
    print_table(results, args, others)


if __name__ == "__main__":
    main()
