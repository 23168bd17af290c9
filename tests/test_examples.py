"""Every script under examples/ runs: with the embedded model, or with tiny
local checkpoints where it needs another family."""

import subprocess
import sys
from pathlib import Path

import pytest
from answers import names

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"


def run_example(name, *args, timeout=300, cwd=None):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_describe_image_example():
    out = run_example("describe_image.py", "--image", IMAGES / "circle.png", "--prompt", "What colour is the circle?")
    assert names(out, "green")
    assert "prompt tokens at" in out


def test_describe_image_example_other_model(tiny_hf_dir):
    out = run_example("describe_image.py", "--model", tiny_hf_dir, "--image", IMAGES / "shapes.png",
                      "--max-tokens", 5)
    assert "prompt tokens at" in out


def test_multi_image_example():
    out = run_example("multi_image.py")
    assert "(2 images)" in out and " image has a " in out  # which one it names depends on shape, its weak point


def test_batch_images_example():
    out = run_example("batch_images.py")
    assert out.count("prompt tokens") == 4
    assert names(out, "green")


def test_batch_images_example_packed(tmp_path):
    from convert.write_hf_release import write_checkpoint

    model = write_checkpoint(tmp_path / "model", "qwen2-vl-tiny")
    out = run_example("batch_images.py", "--model", model, "--max-tokens", 4)
    assert out.count("prompt tokens") == 4


def test_video_frames_example_frame_by_frame():
    out = run_example("video_frames.py", "--frames", 3)
    lines = [line for line in out.splitlines() if line.startswith("frame")]
    assert len(lines) == 3 and all(names(line, "blue", "star") for line in lines)


def test_video_frames_example_video_model(tmp_path):
    from convert.write_hf_release import write_checkpoint

    model = write_checkpoint(tmp_path / "model", "qwen2-vl-tiny")
    out = run_example("video_frames.py", "--model", model, "--frames", 4, "--max-tokens", 4)
    assert "4 frames as one video" in out


def test_convert_example_offline(tiny_hf_dir, tmp_path):
    out = run_example("convert_hub_checkpoint.py", "--hf-path", tiny_hf_dir, "--mlx-path", tmp_path / "q",
                      "--quantize", "--max-tokens", 4)
    assert (tmp_path / "q" / "config.json").exists()
    assert "tokens/s" in out


@pytest.mark.slow
def test_lora_finetune_example(tmp_path):
    out = run_example("lora_finetune_shapes.py", "--out", tmp_path / "run", "--images", 120, "--steps", 40,
                      "--eval", 8, timeout=600)
    line = next(line for line in out.splitlines() if line.startswith("loss:"))
    first, last = float(line.split()[4]), float(line.split()[-1])
    assert last < first, out
    assert (tmp_path / "run" / "adapters" / "adapters.safetensors").exists()


@pytest.mark.slow
def test_openvision2_toy_pretrain_example(tmp_path):
    out = run_example("openvision2_toy_pretrain.py", "--out", tmp_path / "ov2", "--images", 64, "--steps", 30)
    line = next(line for line in out.splitlines() if line.startswith("caption loss"))
    first, last = float(line.split()[5]), float(line.split()[-1])
    assert last < first, out
    assert "model:" in out


@pytest.mark.slow
def test_teach_new_format_example(tmp_path):
    """docs/finetuning.md's example: PIL-drawn data, `train` with only --data, >= 90% held out."""
    run_example("teach_new_format.py", "write", tmp_path)
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native", "train", "--data", str(tmp_path / "train.jsonl"),
                        "--adapter-path", str(tmp_path / "adapters"), "--output", str(tmp_path / "run"),
                        "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = run_example("teach_new_format.py", "score", tmp_path, "--adapter-path", tmp_path / "adapters")
    right = int(out.split("held-out: ")[1].split("/")[0])
    assert right >= 45, out

