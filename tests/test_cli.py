"""Smoke tests through the installed console entry point."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_image
from convert.write_hf_release import write_checkpoint

EXE = shutil.which("mlx-vlm-native") or os.path.join(os.path.dirname(sys.executable), "mlx-vlm-native")


def run(*args, check=True):
    r = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_generate_streams_answer_and_stats(tiny_hf_dir, tmp_path):
    image = tmp_path / "a.png"
    make_image(240, 360).save(image)
    r = run("generate", "--model", str(tiny_hf_dir), "--image", str(image),
            "--prompt", "What is this?", "--max-tokens", "12", "--seed", "0")
    assert "Prompt:" in r.stdout and "tokens-per-sec" in r.stdout and "Peak memory" in r.stdout
    assert "Execution path: cpu: MLX with NumPy host ops" in r.stdout or "Execution path: gpu: plain MLX" in r.stdout
    answer = r.stdout.split("==========")[0].strip()
    assert answer, "no text generated"


def test_generate_video_from_gif(tiny_hf_dir, tmp_path):
    gif = tmp_path / "v.gif"
    frames = [make_image(96, 128, s) for s in range(5)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    r = run("generate", "--model", str(tiny_hf_dir), "--video", str(gif), "--video-frames", "3",
            "--prompt", "Describe this video.", "--max-tokens", "4")
    n_prompt = int(r.stdout.split("Prompt: ")[1].split(" tokens")[0])
    text_tokens = n_prompt - (3 * 14 * 14 + 1)  # 3 pooled 14x14 frames + newline
    assert 5 < text_tokens < 40


def test_convert_then_generate(tiny_hf_dir, tmp_path):
    out = tmp_path / "mlx"
    run("convert", "--hf-path", str(tiny_hf_dir), "--mlx-path", str(out), "-q", "--q-group-size", "32")
    assert (out / "model.safetensors").exists()
    image = tmp_path / "b.png"
    make_image(100, 100).save(image)
    run("generate", "--model", str(out), "--image", str(image), "--max-tokens", "4")


def test_bad_inputs_exit_with_clear_errors(tiny_hf_dir, tmp_path):
    r = run("generate", "--model", str(tiny_hf_dir), "--image", str(tmp_path / "nope.png"), check=False)
    assert r.returncode != 0 and "image not found" in r.stderr
    r = run("generate", "--model", str(tmp_path / "no_model"), "--image", "x.png", check=False)
    assert r.returncode != 0 and "error:" in r.stderr
    r = run("frobnicate", check=False)
    assert r.returncode == 2 and "usage" in r.stderr


def test_module_entry_point(tiny_hf_dir):
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native.generate", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--image" in r.stdout


@pytest.mark.parametrize("preset", ["qwen2-vl-tiny", "qwen2.5-vl-tiny", "points-tiny"])
def test_generate_native_resolution_models(preset, tmp_path):
    """Qwen2-VL-family and POINTS-layout folders, two images of different sizes."""
    model = write_checkpoint(tmp_path / "model", preset)
    paths = []
    for i, (h, w) in enumerate([(200, 320), (90, 60)]):
        paths.append(str(tmp_path / f"{i}.png"))
        make_image(h, w, i).save(paths[-1])
    r = run("generate", "--model", str(model), "--image", *paths, "--prompt", "Compare them.",
            "--max-tokens", "5")
    n_prompt = int(r.stdout.split("Prompt: ")[1].split(" tokens")[0])
    image_tokens = (14 * 22 + 6 * 4) // 4  # grids (1,14,22) and (1,6,4), merged 2x2
    assert image_tokens < n_prompt < image_tokens + 60


def test_qwen2_vl_video_and_quantized_convert(tmp_path):
    model = write_checkpoint(tmp_path / "model", "qwen2-vl-tiny")
    gif = tmp_path / "v.gif"
    frames = [make_image(112, 140, s) for s in range(4)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    out = tmp_path / "q4"
    run("convert", "--hf-path", str(model), "--mlx-path", str(out), "-q", "--q-group-size", "32")
    r = run("generate", "--model", str(out), "--video", str(gif), "--video-frames", "4",
            "--prompt", "What happens?", "--max-tokens", "4")
    n_prompt = int(r.stdout.split("Prompt: ")[1].split(" tokens")[0])
    assert 2 * 4 * 5 < n_prompt < 2 * 4 * 5 + 60  # 2 temporal patches of 8x10 patches, merged 2x2
