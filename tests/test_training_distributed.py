"""Data parallel with `mx.distributed`: two processes (ring backend, launched
by `mlx.launch`) each on half the batch end one step with the weights a single
process gets on the whole batch. This file is also the worker script."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BATCH = 8


def worker(out_dir: str) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_vlm_native.models.openvision import Model, ModelArgs
    from mlx_vlm_native.training.loop import TrainConfig, make_step

    args = ModelArgs(
        vision_config={"image_size": 28, "patch_size": 7, "width": 32, "layers": 1, "head_width": 8},
        decoder_config={"width": 24, "depth": 1, "num_heads": 3, "mlp_dim": 48, "vocab_size": 37,
                        "vision_width": 32},
        keep_ratio=1.0,
    )
    mx.random.seed(0)
    model = Model(args)
    rng = np.random.default_rng(0)
    pixels = mx.array(rng.standard_normal((BATCH, 28, 28, 3)).astype(np.float32))
    text = rng.integers(3, 37, (BATCH, 7)).astype(np.int32)
    text[: BATCH // 2, 3:] = 0  # unequal token counts per rank: the average must be token-weighted
    text = mx.array(text)
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    per = BATCH // size
    batch = (pixels[rank * per : (rank + 1) * per], text[rank * per : (rank + 1) * per])
    step = make_step(model, lambda m, b, k: m.loss(*b, key=k), optim.SGD(1.0), TrainConfig(steps=1))
    loss = step([batch], mx.random.key(0))
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    np.savez(Path(out_dir) / f"size{size}_rank{rank}.npz", loss=np.array(loss), **weights)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        launcher = shutil.which("mlx.launch")
    if not launcher:
        pytest.skip("mlx.launch not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    script = str(Path(__file__).resolve())
    subprocess.run([sys.executable, script, str(tmp_path)], env=env, check=True, timeout=120)
    cmd = [str(launcher), "-n", "2", "--backend", "ring", "--python", sys.executable,
           "--env", "OMP_NUM_THREADS=1"]
    if os.environ.get("LD_PRELOAD"):
        cmd += ["--env", f"LD_PRELOAD={os.environ['LD_PRELOAD']}"]
    proc = subprocess.run(cmd + [script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = np.load(tmp_path / "size1_rank0.npz")
    r0, r1 = np.load(tmp_path / "size2_rank0.npz"), np.load(tmp_path / "size2_rank1.npz")
    for k in one.files:
        assert np.array_equal(r0[k], r1[k]), k  # the ranks stay in sync
        np.testing.assert_allclose(r0[k], one[k], atol=1e-5, err_msg=k)


if __name__ == "__main__":
    worker(sys.argv[1])
