"""benchmarks/bench_finetune.py: the sharded, streamed release writer it uses for
the 2B folder draws the same tensors as the one-file writer; (slow tier) the
script runs both trainers on the tiny geometry and prints its table. No timing
is asserted: the figures live in benchmarks/README.md."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert.write_hf_release import write_qwen2_vl_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_sharded_writer_draws_the_same_tensors(tmp_path):
    one = write_qwen2_vl_checkpoint(tmp_path / "one", "qwen2-vl-tiny", seed=3)
    sharded = write_qwen2_vl_checkpoint(tmp_path / "sharded", "qwen2-vl-tiny", seed=3, shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 1 and all((sharded / f).exists() for f in files)
    assert not list(sharded.glob("model-?????.safetensors"))  # every shard renamed to its -of- name
    expected = mx.load(str(one / "model.safetensors"))
    got = {}
    for f in files:
        got.update(mx.load(str(sharded / f)))
    assert sorted(got) == sorted(expected) == sorted(index)
    for k, v in expected.items():
        assert got[k].shape == v.shape and np.array_equal(np.array(got[k]), np.array(v)), k
    half = write_qwen2_vl_checkpoint(tmp_path / "bf16", "qwen2-vl-tiny", seed=3, dtype="bfloat16",
                                     shard_bytes=1 << 30)
    weights = {}
    for f in half.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}


@pytest.mark.slow
def test_the_script_on_the_tiny_geometry(tmp_path):
    pytest.importorskip("mlx_vlm")
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--preset", "tiny",
                        "--folder", str(tmp_path), "--only", "ours-fp32,mlx-vlm-fp32,ours-q4,load", "--steps", "1",
                        "--image-size", "112", "--answer-tokens", "16", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    for run in ("ours-fp32", "mlx-vlm-fp32", "ours-q4"):
        assert "error" not in results[run], results[run]
        assert results[run]["step_s"] > 0 and results[run]["mlx_peak_gb"] > 0
    assert results["ours-fp32"]["answer_tokens"] == 17  # 16 and the end token
    assert abs(results["ours-fp32"]["tokens"] - results["mlx-vlm-fp32"]["tokens"]) <= 2
    assert results["load"]["ours-q4"]["weights_gb"] < results["load"]["ours-fp32"]["weights_gb"]
    assert "| fp32 | mlx-vlm-native |" in r.stdout and "| fp32 | mlx-vlm 0.7.10 |" in r.stdout
