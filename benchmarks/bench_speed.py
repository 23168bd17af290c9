"""Speed of this project against mlx-vlm on the same random Qwen2-VL folder,
as ratios (ours / mlx-vlm, higher is better); see benchmarks/README.md.

    python benchmarks/bench_speed.py --mlx-vlm-python /work/venv-mlxvlm/bin/python
        [--rounds 3] [--out results.json] [--only tower,decode,batch,server,cache]

One folder (hub layout, which both load) is written once; then, per round,
each project runs every measurement in its own subprocess, the order of the
two flipped every round. Reported: each project's median and the median of
the per-round ratios. The machine is shared, so single figures are noisy;
the per-round ratio is what the table shows.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_llava_onevision import make_image  # this folder's shared helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: convert/'s layout fixtures

PRESET = "qwen2-vl-bench"
# ~110M parameters: a 6-block 512-wide tower and a 12-layer 768-wide decoder
PRESET_SPEC = dict(
    family="qwen2_vl",
    vision=dict(depth=6, embed_dim=512, num_heads=8, mlp_ratio=4, hidden_act="quick_gelu"),
    text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=2),
    mrope_section=[8, 12, 12], tie_word_embeddings=False,
)
MIXED = [(20, 30), (44, 24), (16, 16), (36, 36), (12, 52), (28, 28), (40, 20), (24, 48)]  # patch grids


def small_grids(n=32, seed=0):
    """n grids of 64-256 patches (8x8 .. 16x16, even sides)."""
    rng = np.random.default_rng(seed)
    return [(int(2 * rng.integers(4, 9)), int(2 * rng.integers(4, 9))) for _ in range(n)]


def build(folder: Path) -> Path:
    """The random checkpoint in the hub's flat config layout (mlx-vlm reads only that)."""
    from convert import write_hf_release
    from mlx_vlm_native.models.qwen2_vl import flat_config

    write_hf_release.PRESETS[PRESET] = PRESET_SPEC
    path = write_hf_release.write_checkpoint(folder, PRESET)
    config = flat_config(json.loads((path / "config.json").read_text()))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def grid_patches(grids, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((h * w, 3 * 2 * 14 * 14)).astype(np.float32) for h, w in grids]


def time_stream(tokens):
    """Seconds to the first token, then the rest of the stream's tokens per
    second and per CPU second of the process (all its threads)."""
    tic = time.perf_counter()
    it = iter(tokens)
    next(it)
    first, cpu = time.perf_counter(), time.process_time()
    rest = sum(1 for _ in it)
    return first - tic, rest / (time.perf_counter() - first), rest / (time.process_time() - cpu)


def timed(fn, repeats: int):
    """Median (wall, CPU) seconds of `repeats` calls after one warm-up. CPU
    time (all threads of the process) is far steadier than wall time on a
    shared machine."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
    return statistics.median(wall), statistics.median(cpu)


# ------------------------------------------------------------------ workers


PROMPT = "Describe this image in detail."
IMAGE_SIZE = (224, 336)  # 16 x 24 patches -> 96 merged tokens
DECODE = 32


def image(seed=0):
    return make_image(*IMAGE_SIZE, seed)


class Ours:
    name = "mlx-vlm-native"

    def __init__(self, folder):
        import mlx_vlm_native

        self.model, self.processor = mlx_vlm_native.load(folder)

    def tower(self, grids):
        import mlx.core as mx

        from mlx_vlm_native.native.packing import pack

        p = pack([(x, (1, h, w)) for x, (h, w) in zip(grid_patches(grids), grids)])
        return lambda: mx.eval(self.model.visual(p))

    def generate(self):
        """(prompt tokens, TTFT s, decode tok/s) of one image prompt, greedy."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_vlm_native.engine import PromptReader, attach_prompt

        inputs = self.processor(self.processor.format_prompt(PROMPT, 1), images=[image()])

        def run():
            embeds, positions = self.model.get_input_embeddings(inputs)
            cache = self.model.make_cache()
            attach_prompt(cache, embeds[0], positions)
            return time_stream(generate_step(mx.array(inputs.input_ids), PromptReader(self.model),
                                             max_tokens=DECODE + 1, prompt_cache=cache))
        return len(inputs.input_ids), run

    def batch(self, n):
        """Aggregate decode tok/s of n prompts (one image each) decoded together."""
        from mlx_vlm_native import batch_generate

        images = [[image(i)] for i in range(n)]
        results = batch_generate(self.model, self.processor, [PROMPT] * n, images=images,
                                 max_tokens=DECODE + 1)
        return results[0].generation_tps  # the batch's (mlx-lm's BatchStats), as mlx-vlm reports its own


class MlxVlm:
    name = "mlx-vlm"

    def __init__(self, folder):
        import mlx_vlm

        self.model, self.processor = mlx_vlm.load(folder)
        self.folder = folder

    def tower(self, grids):
        import mlx.core as mx

        x = mx.array(np.concatenate(grid_patches(grids)))
        thw = mx.array([(1, h, w) for h, w in grids])
        return lambda: mx.eval(self.model.vision_tower(x, thw))

    def prompt(self):
        from mlx_vlm.prompt_utils import apply_chat_template

        return apply_chat_template(self.processor, self.model.config, PROMPT, num_images=1)

    def generate(self):
        from mlx_vlm.generate.ar import generate_step
        from mlx_vlm.utils import prepare_inputs

        inputs = prepare_inputs(self.processor, images=[image()], prompts=self.prompt(),
                                image_token_index=self.model.config.image_token_id)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}

        def run():
            return time_stream(generate_step(inputs["input_ids"], self.model, inputs["pixel_values"],
                                               inputs["attention_mask"], max_tokens=DECODE + 1,
                                               temperature=0.0, **extra))
        return inputs["input_ids"].shape[1], run

    def batch(self, n):
        from mlx_vlm import batch_generate

        r = batch_generate(self.model, self.processor, images=[image(i) for i in range(n)],
                           prompts=[PROMPT] * n, max_tokens=DECODE + 1)
        return r.stats.generation_tps



# ------------------------------------------------------------------ servers


SERVE_COMMANDS = {  # how each project serves a folder on a port
    "mlx-vlm-native": lambda folder, port: ["-m", "mlx_vlm_native.cli", "serve", "--model", folder,
                                            "--port", str(port), "--max-tokens", str(DECODE + 1)],
    "mlx-vlm": lambda folder, port: ["-m", "mlx_vlm.server", "--model", folder, "--host", "127.0.0.1",
                                     "--port", str(port)],
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(project: str, folder: str):
    """The project's server on a free loopback port, once /health answers."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable] + SERVE_COMMANDS[project](folder, port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {project} server exited during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the {project} server did not start within 300 s")


def data_url(img) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stream_times(port: int, folder: str, img, max_tokens: int) -> tuple:
    """(send time, arrival time of every streamed content chunk) of one greedy request."""
    import http.client

    body = {"model": folder, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                      {"type": "text", "text": PROMPT}]}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]}")
    arrivals = []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data: "):])
        if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
            arrivals.append(time.perf_counter())
    conn.close()
    return sent, arrivals


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def concurrent_decode(proc, port: int, folder: str, n: int) -> tuple:
    """n clients at once, each with its own image: (aggregate decode tokens/s
    while all n are in the batch, end-to-end tokens/s, decode tokens per CPU
    second of the server in that window). The window runs from the last
    client's first token to the first client's last one. On a shared machine
    the last is the steadiest: it does not count the time other jobs hold
    the cores (the server's CPU is read every 20 ms and interpolated)."""
    import threading

    results = [None] * n
    barrier = threading.Barrier(n)

    def client(i):
        barrier.wait()
        results[i] = stream_times(port, folder, image(i), DECODE + 1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    readings, done = [], threading.Event()

    def read_cpu():  # (time, server CPU seconds) every 20 ms, to find the CPU of the decode window
        while not done.is_set():
            readings.append((time.perf_counter(), cpu_seconds(proc.pid)))
            time.sleep(0.02)

    reader = threading.Thread(target=read_cpu)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    start = max(arrivals[0] for _, arrivals in results)
    end = min(arrivals[-1] for _, arrivals in results)
    decoded = sum(sum(1 for a in arrivals if start < a <= end) for _, arrivals in results)
    total = sum(len(arrivals) for _, arrivals in results)
    first_sent = min(sent for sent, _ in results)
    last = max(arrivals[-1] for _, arrivals in results)
    if end <= start:
        return None, total / (last - first_sent), None
    times, cpus = zip(*readings)
    window_cpu = float(np.interp(end, times, cpus) - np.interp(start, times, cpus))
    return decoded / (end - start), total / (last - first_sent), decoded / window_cpu if window_cpu > 0 else None


def serve_worker(project: str, folder: str, tasks) -> dict:
    proc, port = start_server(project, folder)
    out = {}
    try:
        stream_times(port, folder, image(99), 4)  # warm-up
        if "server" in tasks:
            for n in (1, 4, 8):
                (out[f"server{n}_decode_tps"], out[f"server{n}_e2e_tps"],
                 out[f"server{n}_decode_per_cpu_s"]) = concurrent_decode(proc, port, folder, n)
        if "cache" in tasks:  # a new image asked twice: the second ask finds its features and KV prefix
            for name in ("first", "second"):
                sent, arrivals = stream_times(port, folder, image(1000), 2)
                out[f"cache_ttft_{name}_s"] = arrivals[0] - sent
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def worker(project: str, folder: str, tasks, repeats: int) -> dict:
    if not {"tower", "generate", "batch"} & set(tasks):
        return serve_worker(project, folder, tasks)
    impl = (Ours if project == Ours.name else MlxVlm)(folder)
    out = {}
    if "tower" in tasks:
        for name, grids in (("mixed", MIXED), ("small", small_grids())):
            out[f"tower_{name}_s"], out[f"tower_{name}_cpu_s"] = timed(impl.tower(grids), repeats)
    if "generate" in tasks:
        n_prompt, run = impl.generate()
        run()  # warm-up
        runs = [run() for _ in range(repeats)]
        out["prompt_tokens"] = n_prompt
        out["prefill_tps"] = statistics.median(n_prompt / t for t, _, _ in runs)
        out["decode_tps"] = statistics.median(d for _, d, _ in runs)
        out["decode_tokens_per_cpu_s"] = statistics.median(c for _, _, c in runs)
    if "batch" in tasks:
        impl.batch(2)  # warm-up
        for n in (1, 4, 8):
            out[f"batch{n}_decode_tps"] = impl.batch(n)
    if "server" in tasks or "cache" in tasks:
        del impl
        out.update(serve_worker(project, folder, tasks))
    return out


def bf16_copy(src: Path, dst: Path) -> Path:
    import shutil

    import mlx.core as mx

    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    weights = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(dst / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})
    return dst


# (metric, label, higher is better, tasks, folder)
METRICS = [
    ("tower_mixed_cpu_s", "vision tower, 8 mixed images (6,568 patches), CPU s", False),
    ("tower_mixed_s", "vision tower, 8 mixed images, wall s", False),
    ("tower_small_cpu_s", "vision tower, 32 small images (64-256 patches each), CPU s", False),
    ("tower_small_s", "vision tower, 32 small images, wall s", False),
    ("prefill_tps", "prefill fp32 (tokens/s, TTFT incl. vision)", True),
    ("decode_tps", "decode fp32 (tokens/s)", True),
    ("decode_tokens_per_cpu_s", "decode fp32 (tokens per CPU second)", True),
    ("bf16_prefill_tps", "prefill bf16 (tokens/s)", True),
    ("bf16_decode_tps", "decode bf16 (tokens/s)", True),
    ("bf16_decode_tokens_per_cpu_s", "decode bf16 (tokens per CPU second)", True),
    ("q4_prefill_tps", "prefill 4-bit (tokens/s)", True),
    ("q4_decode_tps", "decode 4-bit (tokens/s)", True),
    ("q4_decode_tokens_per_cpu_s", "decode 4-bit (tokens per CPU second)", True),
    ("batch1_decode_tps", "batch_generate, 1 sequence: decode tokens/s", True),
    ("batch4_decode_tps", "batch_generate, 4 sequences: aggregate decode tokens/s", True),
    ("batch8_decode_tps", "batch_generate, 8 sequences: aggregate decode tokens/s", True),
    ("server1_decode_tps", "server, 1 client: decode tokens/s", True),
    ("server4_decode_tps", "server, 4 clients: aggregate decode tokens/s", True),
    ("server8_decode_tps", "server, 8 clients: aggregate decode tokens/s", True),
    ("server1_e2e_tps", "server, 1 client: end-to-end tokens/s (prefill included)", True),
    ("server4_e2e_tps", "server, 4 clients: end-to-end tokens/s", True),
    ("server8_e2e_tps", "server, 8 clients: end-to-end tokens/s", True),
    ("server1_decode_per_cpu_s", "server, 1 client: decode tokens per server CPU second", True),
    ("server4_decode_per_cpu_s", "server, 4 clients: decode tokens per server CPU second", True),
    ("server8_decode_per_cpu_s", "server, 8 clients: decode tokens per server CPU second", True),
    ("cache_ttft_first_s", "server, time to first token, new image (s)", False),
    ("cache_ttft_second_s", "server, time to first token, same image again (s)", False),
]


LOADS = []  # the 1-minute load average at the start of every measurement


def run_worker(python, project, folder, tasks, repeats, prefix=""):
    from mlx_vlm_native.cli import find_openblas

    LOADS.append(os.getloadavg()[0])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if find_openblas():
        env["LD_PRELOAD"] = find_openblas()
    cmd = [python, __file__, "--worker", project, "--folder", str(folder), "--tasks", ",".join(tasks),
           "--repeats", str(repeats)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        print(f"{project} {tasks}: failed (exit {r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
        return {}
    return {prefix + k: v for k, v in json.loads(lines[-1][len("RESULT "):]).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlx-vlm-python", required=False, help="python of a venv with mlx-vlm 0.7.10")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement and round")
    p.add_argument("--only", default="tower,generate,batch,q4,server,cache",
                   help="comma-separated: tower, generate (fp32 and bf16), q4 (4-bit generate), batch, "
                        "server (1, 4, 8 concurrent clients), cache (the server's prompt cache)")
    p.add_argument("--out", help="write all figures as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--tasks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.folder, args.tasks.split(","), args.repeats)))
        return
    tasks = args.only.split(",")
    projects = [(Ours.name, sys.executable)]
    if args.mlx_vlm_python:
        projects.append((MlxVlm.name, args.mlx_vlm_python))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = build(Path(tmp) / "fp32")
        bf16 = bf16_copy(fp32, Path(tmp) / "bf16")
        q4 = None
        if "q4" in tasks:  # this project's converter; mlx-vlm loads its folders (README, layouts)
            from mlx_vlm_native.convert import convert

            q4 = convert(str(fp32), str(Path(tmp) / "q4"), quantize=True, q_bits=4, q_group_size=64)
        rounds = []
        for r in range(args.rounds):
            order = projects if r % 2 == 0 else projects[::-1]
            results = {}
            for name, python in order:
                print(f"round {r + 1}: {name} ...", flush=True)
                res = run_worker(python, name, fp32, [t for t in tasks if t != "q4"], args.repeats)
                if "generate" in tasks:
                    res.update(run_worker(python, name, bf16, ["generate"], args.repeats, "bf16_"))
                if q4 is not None:
                    res.update(run_worker(python, name, q4, ["generate"], args.repeats, "q4_"))
                results[name] = res
            rounds.append(results)
            if args.out:  # what is done so far, should a later round not finish
                Path(args.out).write_text(json.dumps(dict(rounds=rounds, load_averages=LOADS), indent=2))
    report(rounds, [n for n, _ in projects], args)


def report(rounds, names, args):
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    LOADS.append(os.getloadavg()[0])
    print(f"\n{len(rounds)} rounds, order flipped each round; the machine is shared ({os.cpu_count()} cores, "
          f"1-minute load average {min(LOADS):.1f} to {max(LOADS):.1f}, median {statistics.median(LOADS):.1f}, "
          f"over {len(LOADS)} readings), so single figures are noisy.\n")
    head = "| metric | " + " | ".join(names) + (" | ratio (ours / mlx-vlm, median of rounds) |" if len(names) > 1 else " |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    table = {}
    for key, label, higher in METRICS:
        values = {n: med(r[n].get(key) for r in rounds) for n in names}
        if all(v is None for v in values.values()):
            continue
        row = [f"{values[n]:.2f}" if values[n] is not None else "n/a" for n in names]
        ratio = None
        if len(names) > 1:
            per_round = []
            for r in rounds:
                a, b = r[names[0]].get(key), r[names[1]].get(key)
                if a and b:
                    per_round.append(a / b if higher else b / a)
            ratio = med(per_round)
            row.append(f"**{ratio:.2f}**" if ratio is not None else "n/a")
        table[key] = dict(values=values, ratio=ratio)
        print(f"| {label} | " + " | ".join(row) + " |")
    for n in names:
        for what, key in (("batched decode", "batch{}_decode_tps"), ("server decode", "server{}_decode_tps"),
                          ("server end to end", "server{}_e2e_tps"),
                          ("server decode per CPU second", "server{}_decode_per_cpu_s")):
            one, eight = (med(r[n].get(key.format(k)) for r in rounds) for k in (1, 8))
            if one and eight:
                print(f"\n{n}: {what}, 8 / 1 = {eight / one:.2f}x")
        first, second = (med(r[n].get(f"cache_ttft_{k}_s") for r in rounds) for k in ("first", "second"))
        if first and second:
            print(f"{n}: time to first token, first / second ask of an image = {first / second:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rounds=rounds, table=table, load_averages=LOADS), indent=2))


if __name__ == "__main__":
    main()
