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


def test_served_over_http_with_a_data_url(default):
    """The OpenAI-compatible server answering with the embedded model (real HTTP, localhost)."""
    import base64
    import threading
    import urllib.request

    from mlx_vlm_native.server import make_server

    model, processor = default
    server = make_server(model, processor, "default", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "data:image/png;base64," + base64.b64encode((ROOT / "examples/images/scene.png").read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is the circle?"}]}]}
        host, port = server.server_address[:2]
        request = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert reply["choices"][0]["message"]["content"] == "The circle is red."
        assert reply["choices"][0]["finish_reason"] == "stop"
    finally:
        server.shutdown()
        server.server_close()


def test_chat_keeps_the_image_and_history():
    """Piped `chat`: two questions about the same image, then a new image."""
    script = "What colour is the star?\nWhere is the blue star?\n/image {}\nWhat word is written in the image?\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native.cli", "chat", "--image",
                        str(ROOT / "examples/images/scene.png")],
                       input=script.format(ROOT / "examples/images/word.png"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "The star is blue." in r.stdout
    assert "The blue star is on the right." in r.stdout
    assert 'The word is "owl".' in r.stdout
