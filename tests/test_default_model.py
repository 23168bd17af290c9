"""The embedded default model: shipped, small, and right about held-out scenes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_vlm_native import generate, load, shapes
from mlx_vlm_native.utils import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default():
    return load()


def test_shipped_with_card_tokenizer_and_figures():
    weights = sum(f.stat().st_size for f in DEFAULT_MODEL.glob("*.safetensors"))
    assert 0 < weights < 25e6
    for name in ("config.json", "tokenizer.json", "README.md", "eval.json"):
        assert (DEFAULT_MODEL / name).exists(), name
    scores = json.loads((DEFAULT_MODEL / "eval.json").read_text())["scores"]
    assert set(scores) == set(shapes.QUESTION_TYPES)
    card = (DEFAULT_MODEL / "README.md").read_text()
    for kind, s in scores.items():
        assert f"| {kind} | {s['accuracy']:.1%} |" in card


def test_recorded_colour_and_shape_accuracy_meets_the_target():
    scores = json.loads((DEFAULT_MODEL / "eval.json").read_text())["scores"]
    assert scores["colour"]["total"] >= 100 and scores["colour"]["accuracy"] >= 0.9
    assert scores["shape"]["total"] >= 100 and scores["shape"]["accuracy"] >= 0.9


def test_answers_fresh_held_out_questions(default):
    """A fresh draw (not the card's): 20 colour and 20 shape questions, at most
    3 wrong of each (the card measures >= 90% on 200)."""
    model, processor = default
    questions = shapes.held_out_questions(20, seed=99, kinds=["colour", "shape"])
    scores = shapes.evaluate(model, processor, questions, max_tokens=16)
    assert scores["colour"]["correct"] >= 17, scores["colour"]
    assert scores["shape"]["correct"] >= 17, scores["shape"]


def test_load_without_a_path_is_the_default(default):
    model, _ = default
    assert model.model_type == "openvision_llava"


def test_readme_command_one(tmp_path):
    """README's first command, minus the install: no --model, our image, a right answer, tokens/s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native.cli", "generate", "--image",
                        str(ROOT / "examples/images/scene.png"), "--prompt", "What colour is the star?"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "The star is blue." in r.stdout
    assert "tokens-per-sec" in r.stdout


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    from mlx_vlm_native import utils

    monkeypatch.setattr(utils, "DEFAULT_MODEL", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="embedded default model is missing"):
        utils.load()
