#!/usr/bin/env python3
"""GPU acceptance: every kernel checked on the hardware and every GPU figure measured,
in one command for an offline GPU machine; everything goes to --out as JSON plus a
short summary.txt.

    benchmarks/gpu_acceptance.py prepare-wheels [--dest .gpu-wheels]      # here, with pip
    benchmarks/gpu_acceptance.py run --out DIR [--wheels DIR ...] [--rehearse] [--dry-run-install]

`prepare-wheels` downloads MLX's CUDA backend (mlx, mlx-cuda-13, mlx-lm; mlx-vlm
best effort) as cp312 manylinux wheels and splits them into two folders, a/ and b/,
each small enough for one device call (the tree that travels is capped at 64 MiB):
the first call copies a/ to /tmp/gpu-wheels on the machine, the second, on the still
warm machine, passes both folders to `run --wheels`, which joins the parts (checked
against the sha256 in MANIFEST.json), installs them with pip --no-index into a
private folder and re-executes itself with them on the path.

`run` steps, each in its own subprocess with a time limit, so one failure or hang
costs only its own figures: env, selftest (every kernel against its reference, fp32/
fp16/bf16, head dims 64-128), kernels (bench_kernels: varlen kernel vs segmented vs
dense-mask, packs of 1/8/32, fwd and fwd+bwd, with PyTorch varlen when CUDA torch is
there), matmul (bf16 mx.matmul peak) and the kernel's TFLOP/s as a fraction of it,
training_parity (CPU vs GPU loss curves), generation (prefill/decode tokens/s of a
random LLaVA-OneVision and Qwen2-VL at the 0.5B geometry, bf16 and 4-bit, and
mlx-vlm on the same folders when it imports), tests (the default test tier,
`pytest -m "not slow"`, on the GPU as MLX's default device: each failing test named
in the summary; it needs the test extras, and it gets what is left of --budget, so
give it its own call: `run --only tests --out DIR`). `--rehearse` runs the same
steps at toy sizes on whatever device this machine has, so the GPU run is one attempt.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ["mlx==0.32.4", "mlx-cuda-13==0.32.4", "mlx-lm==0.32.2"]
OPTIONAL_WHEELS = ["mlx-vlm==0.7.10"]
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# Most important first: a device call is capped at 10 minutes, so each step gets at most
# its own limit and what is left of --budget.
STEP_TIMEOUT = {"env": 60, "selftest": 240, "kernels": 180, "matmul": 60, "training_parity": 180, "generation": 360,
                "tests": 540}
REHEARSAL_TESTS = ["tests/test_cpu_backend.py", "tests/test_execution_path.py"]
STEPS = list(STEP_TIMEOUT)


# ---- wheels ---------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_wheels(dest: Path, calls: int) -> None:
    """Download the wheels and lay them out in `calls` folders (a/, b/, ...) of about
    equal size: a wheel larger than one folder's share is cut into one piece per folder."""
    download = dest / "download"
    download.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.12", "--implementation", "cp", *sum((["--platform", p] for p in PLATFORMS), []), "-d", str(download)]
    subprocess.run(base + WHEELS, check=True)
    for name in OPTIONAL_WHEELS:
        if subprocess.run(base + [name]).returncode:
            print(f"note: {name} not downloaded; the mlx-vlm comparison will be skipped")
    folders = [dest / "abcdefgh"[i] for i in range(calls)]
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir()
    wheels = sorted(download.glob("*.whl"), key=lambda p: -p.stat().st_size)
    share = sum(w.stat().st_size for w in wheels) / calls
    manifest, sizes = {}, [0] * calls
    for wheel in wheels:
        manifest[wheel.name] = sha256(wheel)
        data = wheel.read_bytes()
        if len(data) <= share:
            i = sizes.index(min(sizes))
            (folders[i] / wheel.name).write_bytes(data)
            sizes[i] += len(data)
            continue
        step = -(-len(data) // calls)
        for i in range(calls):
            (folders[i] / f"{wheel.name}.part{i:02d}").write_bytes(data[i * step:(i + 1) * step])
            sizes[i] += len(data[i * step:(i + 1) * step])
    for f, size in zip(folders, sizes):
        (f / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        print(f"{f}: {size / 2**20:.1f} MiB: {', '.join(sorted(p.name for p in f.iterdir()))}")


def join_wheels(folders, dest: Path) -> list:
    """The whole wheels from whole files and .partNN pieces spread over `folders`."""
    manifest, pieces = {}, {}
    for folder in map(Path, folders):
        if (folder / "MANIFEST.json").exists():
            manifest.update(json.loads((folder / "MANIFEST.json").read_text()))
        for f in folder.iterdir():
            if f.name.endswith(".whl") or ".whl.part" in f.name:
                pieces.setdefault(f.name.split(".part")[0] if ".whl.part" in f.name else f.name, []).append(f)
    missing = sorted(set(manifest) - set(pieces))
    if missing:
        raise SystemExit(f"error: MANIFEST.json lists wheels found in no folder: {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, files in sorted(pieces.items()):
        files.sort(key=lambda f: f.name)
        out = dest / name
        with open(out, "wb") as w:
            for f in files:
                w.write(f.read_bytes())
        expected = manifest.get(name)
        if expected and sha256(out) != expected:
            raise SystemExit(f"error: {name} does not match MANIFEST.json after joining {len(files)} part(s): "
                             "a part is missing or stale (copy both halves from the same prepare-wheels run)")
        wheels.append(out)
    return wheels


def install(folders, site: Path, dry_run: bool) -> None:
    wheels = join_wheels(folders, site.parent / "joined-wheels")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    print(("dry run, would run: " if dry_run else "") + " ".join(cmd))
    if not dry_run:
        subprocess.run(cmd, check=True)


# ---- steps ------------------------------------------------------------------------


def python(*args, timeout, env=None):
    """Run python with args in the repo; (return code, combined output). On a time-out
    the whole process group goes, so a step's own children do not outlive it."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, (out or "") + f"\n[timed out after {timeout:.0f} s]"


def step_env(out: Path, rehearse: bool) -> dict:
    import mlx.core as mx

    from mlx_vlm_native import native

    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if smi else None
    return {"mlx": mx.__version__, "device": str(mx.default_device()), "kernels": native.gpu_backend(),
            "nvidia_smi": gpu, "python": platform.python_version(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def step_selftest(out: Path, rehearse: bool) -> dict:
    args = ["-m", "mlx_vlm_native", "selftest", "--json", str(out / "selftest.json")]
    code, log = python(*args, *(["--quick", "--no-timing"] if rehearse else []), timeout=STEP_TIMEOUT["selftest"])
    (out / "selftest.log").write_text(log)
    report = json.loads((out / "selftest.json").read_text()) if (out / "selftest.json").exists() else {}
    return {"exit_code": code, "passed": report.get("passed"), "total": report.get("total"),
            "mismatches": [c["name"] for c in report.get("checks", []) if not c["ok"]]}


def attention_flops(lengths, heads, head_dim) -> float:
    """Forward FLOPs of attention over a pack: QK^T and PV, 2*L*L*D each, per head."""
    return 4.0 * heads * head_dim * sum(n * n for n in lengths)


def step_kernels(out: Path, rehearse: bool) -> dict:
    results = {}
    configs = [("float16", 80), ("bfloat16", 128)] if not rehearse else [("float16", 64)]
    for dtype, head_dim in configs:
        name = f"{dtype}_d{head_dim}"
        args = ["benchmarks/bench_kernels.py", "--dtype", dtype, "--head-dim", str(head_dim),
                "--json", str(out / f"kernels_{name}.json")]
        if rehearse:
            args += ["--packs", "1", "--runs", "1", "--heads", "1"]
        code, log = python(*args, timeout=STEP_TIMEOUT["kernels"] // len(configs))
        (out / f"kernels_{name}.log").write_text(log)
        path = out / f"kernels_{name}.json"
        results[name] = {"exit_code": code, **(json.loads(path.read_text()) if path.exists() else {})}
    return results


def step_matmul(out: Path, rehearse: bool) -> dict:
    import mlx.core as mx

    n = 512 if rehearse else 8192
    a, b = (mx.random.normal((n, n)).astype(mx.bfloat16) for _ in range(2))
    for _ in range(3):
        mx.eval(a @ b)
    runs = 3 if rehearse else 20
    tic = time.perf_counter()
    for _ in range(runs):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - tic) / runs
    return {"n": n, "dtype": "bfloat16", "ms": seconds * 1e3, "tflops": 2 * n**3 / seconds / 1e12}


def kernel_efficiency(kernels: dict, matmul: dict) -> list:
    """The kernel's achieved TFLOP/s per pack, and as a fraction of the matmul peak
    (fwd+bwd counted as 3.5x the forward: FlashAttention-2's backward does 5 of the
    7 matmul-sized products)."""
    rows = []
    for name, k in kernels.items():
        for row in k.get("rows", []):
            lengths = k["lengths"][str(row["images"])]
            flops = attention_flops(lengths, k["heads"], k["head_dim"])
            fwd_ms, both_ms = row["kernel"]
            seg_fwd, seg_both = row["segmented"]
            entry = {"config": name, "images": row["images"], "tokens": row["tokens"],
                     "fwd_tflops": flops / fwd_ms / 1e9, "fwd_bwd_tflops": 3.5 * flops / both_ms / 1e9,
                     "segmented_over_kernel_fwd": seg_fwd / fwd_ms, "segmented_over_kernel_fwd_bwd": seg_both / both_ms}
            if matmul.get("tflops"):
                entry["fwd_fraction_of_matmul_peak"] = entry["fwd_tflops"] / matmul["tflops"]
                entry["fwd_bwd_fraction_of_matmul_peak"] = entry["fwd_bwd_tflops"] / matmul["tflops"]
            rows.append(entry)
    return rows


def step_training_parity(out: Path, rehearse: bool) -> dict:
    steps = "3" if rehearse else "50"
    devices = ["cpu", "cpu" if rehearse else "gpu"]
    files, codes = [], []
    for i, device in enumerate(devices):
        f = out / f"training_{device}{i}.json"
        code, log = python("benchmarks/training_parity.py", "--device", device, "--steps", steps, "--out", str(f),
                           timeout=STEP_TIMEOUT["training_parity"] // 2)
        (out / f"training_{device}{i}.log").write_text(log)
        files.append(f)
        codes.append(code)
    if not all(f.exists() for f in files):
        return {"exit_codes": codes}
    code, log = python("benchmarks/training_parity.py", "--compare", *map(str, files), timeout=60)
    a, b = (json.loads(f.read_text())["losses"] for f in files)
    return {"devices": devices, "steps": len(a), "compare_exit_code": code, "compare": log.strip()[-500:],
            "max_abs_loss_diff": max(abs(x - y) for x, y in zip(a, b)), "first_loss": a[0], "last_loss": a[-1]}


GENERATION_WORKER = r"""
import json, sys, time
import numpy as np
from PIL import Image
spec = json.loads(sys.argv[1])
image = Image.fromarray((np.random.default_rng(0).random((448, 448, 3)) * 255).astype(np.uint8))
prompt, n = "Describe this image in detail.", spec["tokens"]
if spec["framework"] == "mlx-vlm-native":
    from mlx_vlm_native import load, generate
    model, processor = load(spec["model"])
    run = lambda: generate(model, processor, prompt, images=[image], max_tokens=n, temperature=0.0)
else:
    import mlx_vlm
    model, processor = mlx_vlm.load(spec["model"])
    formatted = mlx_vlm.prompt_utils.apply_chat_template(processor, model.config, prompt, num_images=1)
    run = lambda: mlx_vlm.generate(model, processor, formatted, image=[image], max_tokens=n, temperature=0.0)
run()  # warm-up: kernels compile
r = run()
print("RESULT " + json.dumps({"prompt_tokens": r.prompt_tokens, "prompt_tps": r.prompt_tps,
                              "generation_tokens": r.generation_tokens, "generation_tps": r.generation_tps}))
"""


def mlx_vlm_importable() -> bool:
    return python("-c", "import mlx_vlm", timeout=60)[0] == 0


def generation_figures(folder: Path, framework: str, tokens: int, timeout: int) -> dict:
    spec = json.dumps({"model": str(folder), "framework": framework, "tokens": tokens})
    code, log = python("-c", GENERATION_WORKER, spec, timeout=timeout)
    lines = [l for l in log.splitlines() if l.startswith("RESULT ")]
    if code or not lines:
        return {"error": log.strip()[-800:]}
    return json.loads(lines[-1][len("RESULT "):])


def step_generation(out: Path, rehearse: bool) -> dict:
    sys.path.insert(0, str(ROOT))  # convert/: the random checkpoints are layout fixtures outside the package
    from convert.write_hf_release import write_checkpoint
    from mlx_vlm_native.convert import convert

    presets = ["tiny", "qwen2-vl-tiny"] if rehearse else ["llava-onevision-0.5b", "qwen2-vl-0.5b"]
    tokens = 8 if rehearse else 64
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-acceptance-models"
    shutil.rmtree(work, ignore_errors=True)
    with_peer = mlx_vlm_importable()
    results = {"mlx_vlm": with_peer}
    for preset in presets:
        hf = write_checkpoint(work / preset / "hf", preset)
        folders = {"bfloat16": work / preset / "bf16", "4bit": work / preset / "q4"}
        convert(str(hf), str(folders["bfloat16"]), dtype="bfloat16")
        convert(str(hf), str(folders["4bit"]), dtype="bfloat16", quantize=True, q_bits=4, q_group_size=64)
        for variant, folder in folders.items():
            row = {"mlx-vlm-native": generation_figures(folder, "mlx-vlm-native", tokens, 120)}
            if with_peer:
                row["mlx-vlm"] = generation_figures(folder, "mlx-vlm", tokens, 120)
                ours, peer = row["mlx-vlm-native"], row["mlx-vlm"]
                if "error" not in ours and "error" not in peer:
                    row["ratio_prefill"] = ours["prompt_tps"] / peer["prompt_tps"]
                    row["ratio_decode"] = ours["generation_tps"] / peer["generation_tps"]
            results[f"{preset} {variant}"] = row
    shutil.rmtree(work, ignore_errors=True)
    return results


def junit_failures(path: Path) -> dict:
    """Counts and each failing test ("file::test: first line of the message") of a junit XML report."""
    import xml.etree.ElementTree as ET

    counts, failures = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in ET.parse(path).getroot().iter("testcase"):
        for bad in [c for c in case if c.tag in ("failure", "error")]:
            message = (bad.get("message") or bad.text or "").strip().splitlines() or [""]
            failures.append(f"{case.get('classname', '')}::{case.get('name', '')} ({bad.tag}): {message[0][:300]}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_tests": failures}


def step_tests(out: Path, rehearse: bool) -> dict:
    """The default test tier on this machine's default device (the GPU here)."""
    report = out / "tests.xml"
    args = ["-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", f"--junitxml={report}",
            *(REHEARSAL_TESTS if rehearse else [])]
    # the step's own limit (what is left of --budget), less time to write the report
    limit = float(os.environ.get("GPU_ACCEPTANCE_STEP_SECONDS", STEP_TIMEOUT["tests"])) - 15
    code, log = python(*args, timeout=limit)
    (out / "tests.log").write_text(log)
    if not report.exists():
        raise RuntimeError(f"pytest wrote no report (exit {code}): {log.strip()[-1000:]}")
    return {"exit_code": code, **junit_failures(report)}


def run_step(name: str, out: Path, rehearse: bool, timeout: float) -> dict:
    """One step in a subprocess of this script, so a crash or hang costs only it."""
    args = [__file__, "_step", name, "--out", str(out)] + (["--rehearse"] if rehearse else [])
    tic = time.perf_counter()
    code, log = python(*args, timeout=timeout, env=dict(os.environ, GPU_ACCEPTANCE_STEP_SECONDS=str(int(timeout))))
    (out / f"{name}.step.log").write_text(log)
    path = out / f"{name}.result.json"
    result = json.loads(path.read_text()) if code == 0 and path.exists() else {"error": log.strip()[-1500:]}
    result["seconds"] = round(time.perf_counter() - tic, 1)
    return result


def summarise(results: dict) -> str:
    lines = [f"GPU acceptance {results['env'].get('date', '')}: {results['env'].get('nvidia_smi') or 'no GPU'}, "
             f"mlx {results['env'].get('mlx')}, device {results['env'].get('device')}, "
             f"kernels {results['env'].get('kernels')}" + (" (REHEARSAL, toy sizes)" if results["rehearse"] else "")]
    for name in [n for n in STEPS if n in results]:
        r = results[name]
        lines.append(f"- {name}: {'FAILED: ' + r['error'].splitlines()[-1] if 'error' in r else 'ok'} "
                     f"({r.get('seconds', '?')} s)")
    s = results.get("selftest", {})
    if "passed" in s:
        lines.append(f"selftest: {s['passed']}/{s['total']} checks passed" +
                     (f"; mismatches: {', '.join(s['mismatches'][:5])}" if s.get("mismatches") else ""))
    m = results.get("matmul", {})
    if "tflops" in m:
        lines.append(f"matmul peak: {m['tflops']:.1f} TFLOP/s (bf16 {m['n']}^3)")
    for e in results.get("kernel_efficiency", []):
        lines.append(f"kernel {e['config']} {e['images']} images ({e['tokens']} tokens): fwd {e['fwd_tflops']:.1f} "
                     f"TFLOP/s ({e.get('fwd_fraction_of_matmul_peak', 0):.1%} of peak), fwd+bwd "
                     f"{e['fwd_bwd_tflops']:.1f}; segmented/kernel {e['segmented_over_kernel_fwd']:.2f}x fwd, "
                     f"{e['segmented_over_kernel_fwd_bwd']:.2f}x fwd+bwd")
    t = results.get("training_parity", {})
    if "max_abs_loss_diff" in t:
        lines.append(f"training parity {t['devices'][0]} vs {t['devices'][1]}: max |loss diff| "
                     f"{t['max_abs_loss_diff']:.2e} over {t['steps']} steps")
    for key, row in results.get("generation", {}).items():
        if not isinstance(row, dict):
            continue
        ours = row.get("mlx-vlm-native", {})
        text = ("error" if "error" in ours else
                f"prefill {ours['prompt_tps']:.0f} tok/s ({ours['prompt_tokens']} tokens), decode "
                f"{ours['generation_tps']:.1f} tok/s")
        if "ratio_decode" in row:
            text += f"; vs mlx-vlm: prefill {row['ratio_prefill']:.2f}x, decode {row['ratio_decode']:.2f}x"
        elif "mlx-vlm" in row:
            text += "; mlx-vlm failed on this folder"
        lines.append(f"generation {key}: {text}")
    t = results.get("tests", {})
    if "tests" in t:
        lines.append(f"tests (default tier): {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
        lines += [f"  FAILED {f}" for f in t["failed_tests"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    out = Path(args.out).resolve()
    raw = out / "raw"  # every step's files; packed into raw.tar.gz at the end (a device call returns 8 files)
    raw.mkdir(parents=True, exist_ok=True)
    if args.wheels and not os.environ.get("GPU_ACCEPTANCE_INSTALLED"):
        site = Path(args.site)
        install(args.wheels, site, args.dry_run_install)
        if not args.dry_run_install:
            env = dict(os.environ, GPU_ACCEPTANCE_INSTALLED="1",
                       PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
            return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    results = {"rehearse": args.rehearse}
    deadline = time.monotonic() + args.budget
    for name in args.only or STEPS:
        left = deadline - time.monotonic()
        if left < 10:
            results[name] = {"error": f"not run: the {args.budget} s budget was spent"}
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results[name] = run_step(name, raw, args.rehearse, min(STEP_TIMEOUT[name] * (3 if args.rehearse else 1), left))
    results.setdefault("env", {})
    results["kernel_efficiency"] = kernel_efficiency(
        {k: v for k, v in results.get("kernels", {}).items() if isinstance(v, dict)}, results.get("matmul", {}))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = summarise(results)
    (out / "summary.txt").write_text(summary)
    shutil.make_archive(str(raw), "gztar", raw)
    shutil.rmtree(raw)
    print(summary)
    failed = [n for n in args.only or STEPS if "error" in results[n]]
    return 1 if failed or results.get("selftest", {}).get("mismatches") or results.get("tests", {}).get(
        "failed_tests") else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-wheels", help="download and split the wheels (needs pip and the index)")
    prep.add_argument("--dest", default=str(ROOT / ".gpu-wheels"))
    prep.add_argument("--calls", type=int, default=2, help="device calls to spread the wheels over (each call "
                      "carries at most 64 MiB with the working tree)")
    r = sub.add_parser("run", help="run every step, results under --out")
    r.add_argument("--out", required=True)
    r.add_argument("--wheels", nargs="+", help="folders of wheels and .partNN pieces from prepare-wheels")
    r.add_argument("--site", default="/tmp/gpu-acceptance-site", help="where the wheels are installed")
    r.add_argument("--dry-run-install", action="store_true", help="join and verify the wheels, do not install")
    r.add_argument("--rehearse", action="store_true", help="toy sizes, any device: a rehearsal of the GPU run")
    r.add_argument("--only", nargs="+", choices=STEPS)
    r.add_argument("--budget", type=float, default=540, help="seconds for all steps together (default 540: "
                   "a device call is capped at 600)")
    st = sub.add_parser("_step")
    st.add_argument("name", choices=STEPS)
    st.add_argument("--out", required=True)
    st.add_argument("--rehearse", action="store_true")
    args = p.parse_args()
    if args.command == "prepare-wheels":
        prepare_wheels(Path(args.dest), args.calls)
        return 0
    if args.command == "_step":
        out = Path(args.out)
        result = globals()[f"step_{args.name}"](out, args.rehearse)
        (out / f"{args.name}.result.json").write_text(json.dumps(result, indent=1))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
