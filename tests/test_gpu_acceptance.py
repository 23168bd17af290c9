"""benchmarks/gpu_acceptance.py: the wheel split/join it uses to carry MLX's CUDA backend
to an offline GPU machine, and (slow tier) the whole run rehearsed at toy sizes on
this machine's device, so the GPU run is one attempt."""

import hashlib
import json
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
def load_script(path: Path):
    loader = SourceFileLoader(path.name.replace("-", "_"), str(path))
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


acceptance = load_script(ROOT / "benchmarks" / "gpu_acceptance.py")


def split(tmp_path, data: bytes, cut: int):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "big.whl.part00").write_bytes(data[:cut])
    (b / "big.whl.part01").write_bytes(data[cut:])
    (a / "small.whl").write_bytes(b"small")
    manifest = {"big.whl": hashlib.sha256(data).hexdigest(), "small.whl": hashlib.sha256(b"small").hexdigest()}
    for half in (a, b):
        (half / "MANIFEST.json").write_text(json.dumps(manifest))
    return a, b


def test_parts_from_two_folders_join_into_the_original_wheels(tmp_path):
    data = bytes(range(256)) * 5000
    a, b = split(tmp_path, data, 300_001)
    wheels = acceptance.join_wheels([a, b], tmp_path / "joined")
    assert sorted(w.name for w in wheels) == ["big.whl", "small.whl"]
    assert (tmp_path / "joined" / "big.whl").read_bytes() == data


def test_a_missing_or_stale_part_is_named(tmp_path):
    data = bytes(range(256)) * 5000
    a, b = split(tmp_path, data, 300_001)
    with pytest.raises(SystemExit, match="big.whl does not match MANIFEST.json after joining 1 part"):
        acceptance.join_wheels([a], tmp_path / "joined")
    (b / "big.whl.part01").write_bytes(b"stale")
    with pytest.raises(SystemExit, match="big.whl does not match"):
        acceptance.join_wheels([a, b], tmp_path / "joined2")
    (a / "small.whl").unlink()
    with pytest.raises(SystemExit, match="lists wheels found in no folder: small.whl"):
        acceptance.join_wheels([b], tmp_path / "joined3")


def test_kernel_efficiency_counts_attention_flops():
    kernels = {"float16_d64": {"heads": 2, "head_dim": 64, "lengths": {"2": [10, 20]},
                               "rows": [{"images": 2, "tokens": 30, "kernel": [1.0, 4.0], "segmented": [2.0, 6.0]}]}}
    (row,) = acceptance.kernel_efficiency(kernels, {"tflops": 1.0})
    flops = 4 * 2 * 64 * (100 + 400)
    assert row["fwd_tflops"] == pytest.approx(flops / 1e-3 / 1e12)
    assert row["fwd_bwd_tflops"] == pytest.approx(3.5 * flops / 4e-3 / 1e12)
    assert row["segmented_over_kernel_fwd"] == 2.0 and row["segmented_over_kernel_fwd_bwd"] == 1.5
    assert row["fwd_fraction_of_matmul_peak"] == pytest.approx(row["fwd_tflops"])


@pytest.mark.slow
def test_rehearsal_runs_every_step(tmp_path):
    """Every step at toy sizes, the install dry-run on split wheel parts."""
    a, b = split(tmp_path, b"wheel bytes" * 1000, 5000)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "run", "--out", str(out),
                        "--wheels", str(a), str(b), "--dry-run-install", "--rehearse", "--budget", "1500"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert all("error" not in results[s] for s in acceptance.STEPS), results
    assert results["selftest"]["passed"] == results["selftest"]["total"] > 0
    assert results["training_parity"]["max_abs_loss_diff"] == 0.0  # CPU twice in a rehearsal
    assert results["tests"]["passed"] > 0 and results["tests"]["failed_tests"] == []
    for key in ("tiny bfloat16", "tiny 4bit", "qwen2-vl-tiny bfloat16", "qwen2-vl-tiny 4bit"):
        assert results["generation"][key]["mlx-vlm-native"]["generation_tps"] > 0
    assert "dry run, would run:" in r.stdout and "summary" not in r.stderr
    assert (out / "summary.txt").read_text().startswith("GPU acceptance")
    assert sorted(p.name for p in out.iterdir()) == ["raw.tar.gz", "results.json", "summary.txt"]


def test_the_test_step_names_each_failure(tmp_path):
    """The junit report of a test run with a failure and an error becomes counts
    and one line per failing test in the summary."""
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2&#10;more">tb</failure>'
        '</testcase><testcase classname="tests.test_b" name="test_boom"><error message="RuntimeError: no">tb</error>'
        '</testcase><testcase classname="tests.test_b" name="test_skip"><skipped message="no GPU"/></testcase>'
        '</testsuite></testsuites>')
    result = acceptance.junit_failures(tmp_path / "tests.xml")
    assert (result["passed"], result["failures"], result["errors"], result["skipped"]) == (1, 1, 1, 1)
    assert result["failed_tests"] == ["tests.test_a::test_bad (failure): assert 1 == 2",
                                      "tests.test_b::test_boom (error): RuntimeError: no"]
    summary = acceptance.summarise({"env": {}, "rehearse": False, "tests": result})
    assert "tests (default tier): 1 passed, 1 failed, 1 errors, 1 skipped" in summary
    assert "  FAILED tests.test_a::test_bad (failure): assert 1 == 2" in summary
