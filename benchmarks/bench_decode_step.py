"""CPU milliseconds per batched decode step, this project against mlx-vlm, on
bench_speed.py's random Qwen2-VL folder: the steadiest figure for batched
decode on a shared machine (wall time counts the other jobs, CPU time hardly).

    python benchmarks/bench_decode_step.py [--batch 8] [--rounds 3]

Each project runs in its own subprocess, the order flipped every round; each
times its generation batch's `_step` (one decode step of all sequences, mlx-lm's
`GenerationBatch` here, mlx-vlm's own there) during a `batch_generate` of
`--batch` prompts, counting only the steps with every sequence in the batch.
"""

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_speed as bench


def step_class(project: str):
    if project == bench.Ours.name:
        return importlib.import_module("mlx_lm.generate").GenerationBatch
    ar = importlib.import_module("mlx_vlm.generate.ar")
    return next(c for name, c in vars(ar).items()
                if isinstance(c, type) and "Generation" in name and "_step" in vars(c))


def worker(project: str, folder: str, n: int) -> float:
    """Median CPU ms of the full-batch steps of one batch_generate of n prompts."""
    cls, impl = step_class(project), (bench.Ours if project == bench.Ours.name else bench.MlxVlm)(folder)
    original, steps = cls._step, []

    def timed_step(self, *args, **kwargs):
        cpu = time.process_time()
        out = original(self, *args, **kwargs)
        steps.append((time.process_time() - cpu, len(self.uids)))
        return out

    cls._step = timed_step
    impl.batch(2)  # warm-up
    steps.clear()
    impl.batch(n)
    full = [cpu for cpu, size in steps if size == n][2:]
    return statistics.median(full) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlx-vlm-python", default=sys.executable, help="python of a venv with mlx-vlm 0.7.10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.folder, args.batch)))
        return
    projects = [(bench.Ours.name, sys.executable), (bench.MlxVlm.name, args.mlx_vlm_python)]
    results = {name: [] for name, _ in projects}
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench.build(Path(tmp) / "fp32")
        for r in range(args.rounds):
            for name, python in projects if r % 2 == 0 else projects[::-1]:
                out = subprocess.run([python, __file__, "--worker", name, "--folder", str(folder),
                                      "--batch", str(args.batch)], capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
                results[name].append(json.loads(line[-1][len("RESULT "):]))
                print(f"round {r + 1}: {name} {results[name][-1]:.1f} CPU ms per step", flush=True)
    ours, theirs = (results[name] for name, _ in projects)
    ratios = [b / a for a, b in zip(ours, theirs)]
    print(f"\nbatch {args.batch}: {statistics.median(ours):.1f} against {statistics.median(theirs):.1f} CPU ms per "
          f"step; per CPU second ours / mlx-vlm = {statistics.median(ratios):.2f} (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
