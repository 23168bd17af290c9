import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_describe_image_example(tiny_hf_dir):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples/describe_image.py"), "--model", str(tiny_hf_dir),
         "--image", str(ROOT / "examples/images/shapes.png"), "--max-tokens", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "prompt tokens at" in r.stdout


def test_batch_images_example(tmp_path):
    from mlx_vlm_native.random_checkpoint import write_checkpoint

    model = write_checkpoint(tmp_path / "model", "qwen2-vl-tiny")
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples/batch_images.py"), "--model", str(model), "--max-tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("prompt tokens") == 3
