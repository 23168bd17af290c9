"""The embedded default model: shipped, small, and right about held-out scenes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_vlm_native import load
from mlx_vlm_native.utils import DEFAULT_MODEL
from train import shapes_world as shapes  # the generated world: train/shapes_world.py

from answers import names

ROOT = Path(__file__).resolve().parents[1]
# Least right answers of 12 fresh held-out questions per type (chance: colour 1.5, shape 2,
# count 2, position 1.3, two images 6, word 0.4), a little below what the shipped model scores on
# this draw (colour 12, shape 12, count 12, position 12, two images 12, word 8; the model before
# the lookup loss: 12, 8, 12, 9, 11 and word 9).
THRESHOLDS = {"colour": 10, "shape": 10, "count": 10, "position": 10, "multi_image": 10, "word": 7}
# least right of 10 questions per type about one PIL-drawn shape (measured 10 of 10 on each,
# as the previous models did)
DRAWN_THRESHOLDS = {"colour": 9, "shape": 9, "count": 9, "position": 9}


@pytest.fixture(scope="module")
def default():
    return load()


def test_shipped_small_with_its_tokenizer():
    weights = sum(f.stat().st_size for f in DEFAULT_MODEL.glob("*.safetensors"))
    assert 0 < weights < 25e6
    _, processor = load()
    ids = processor.tokenizer.encode("What colour is the circle?")
    assert processor.tokenizer.decode(ids).strip() == "What colour is the circle?"


@pytest.fixture(scope="module")
def held_out(default):
    """A fresh held-out draw (not the card's seed): 12 questions of each type."""
    model, processor = default
    return shapes.evaluate(model, processor, shapes.held_out_questions(12, seed=99, kinds=list(THRESHOLDS)), max_tokens=24)


@pytest.mark.parametrize("kind,least", THRESHOLDS.items())
def test_held_out_scenes(held_out, kind, least):
    s = held_out[kind]
    assert s["correct"] >= least, (s["correct"], s["failures"])


@pytest.fixture(scope="module")
def drawn(default):
    """Pictures drawn with plain PIL primitives, not the generator (10 of each type)."""
    model, processor = default
    return shapes.evaluate(model, processor, shapes.drawn_questions(10, seed=31, kinds=list(DRAWN_THRESHOLDS)),
                           max_tokens=24)


@pytest.mark.parametrize("kind,least", DRAWN_THRESHOLDS.items())
def test_pil_drawn_single_shapes(drawn, kind, least):
    s = drawn[kind]
    assert s["correct"] >= least, (s["correct"], s["failures"])


def test_load_without_a_path_is_the_default(default):
    model, _ = default
    assert model.model_type == "openvision_llava"


def test_readme_command_one(tmp_path):
    """README's first command, minus the install: no --model, our image, a right answer, tokens/s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native.cli", "generate", "--image",
                        str(ROOT / "examples/images/circle.png"), "--prompt", "What colour is the circle?"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    answer = r.stdout.split("==========")[0]
    assert names(answer, "green") and not names(answer, "red", "blue"), answer
    assert "tokens-per-sec" in r.stdout
    assert "model of type" not in r.stderr  # transformers' warning about our config.json is kept quiet


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
        url = "data:image/png;base64," + base64.b64encode((ROOT / "examples/images/circle.png").read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is the circle?"}]}]}
        host, port = server.server_address[:2]
        request = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert names(reply["choices"][0]["message"]["content"], "green")
        assert reply["choices"][0]["finish_reason"] == "stop"
    finally:
        server.shutdown()
        server.server_close()


def test_chat_keeps_the_image_and_history():
    """Piped `chat`: two questions about the same image, then a new image."""
    script = "What colour is the circle?\nWhere is the green circle?\n/image {}\nWhat colour is the circle?\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native.cli", "chat", "--image",
                        str(ROOT / "examples/images/circle.png")],
                       input=script.format(ROOT / "examples/images/word.png"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if names(line, "circle")]
    assert len(answers) >= 3, r.stdout
    assert names(answers[0], "green")
    assert names(answers[1], "green")  # the follow-up is answered in the same conversation
    assert names(answers[2], "orange")  # about the new image


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    """`train/default_model/build.py` (data, tokenizer, stages 1-3, held-out
    eval) at a few steps; a second run finds every step done and only reprints."""
    out = tmp_path / "build"
    cmd = [sys.executable, str(ROOT / "train/default_model/build.py"), "--out", str(out), "--images", "40",
           "--encoder-steps", "2", "--encoder-batch", "4", "--probe-pictures", "30", "--ignore-probe",
           "--stage2-steps", "2", "--eval-per-type", "2", "--mix", "colour=1,shape=1,position=2", "--turns", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((out / "eval.json").read_text())
    assert set(scores["scenes"]) == set(shapes.QUESTION_TYPES)
    assert all(s["total"] == 2 for s in scores["scenes"].values())
    assert set(scores["drawn"]) == {"colour", "shape", "count", "position"}
    assert {"colour", "shape", "cell", "word", "count"} <= set(json.loads((out / "encoder/probe.json").read_text()))
    assert len((out / "data/captions.jsonl").read_text().splitlines()) == 40
    conversations = [[m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
                     for line in (out / "data/conversations.jsonl").read_text().splitlines()]
    assert max(len(c) for c in conversations) == 2  # --turns
    texts = [part["text"] for c in conversations for content in c for part in content if part["type"] == "text"]
    assert texts and not any(t.startswith(("How many", "What word", "Describe")) for t in texts)  # only --mix's types
    model, processor = load(str(out / "stage2/model"))
    assert model.model_type == "openvision_llava"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "colour" in again.stdout and "train:" not in again.stderr


def test_recipe_rejects_an_unknown_question_type():
    r = subprocess.run([sys.executable, str(ROOT / "train/default_model/build.py"), "--mix", "colour=1,colour_name=2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "colour_name" in r.stderr and "known: colour, shape" in r.stderr


def build_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", ROOT / "train/default_model/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_continued_builds_keep_every_earlier_builds_cost():
    """Stage 2 continued twice: the second continuation's card still counts the first build's steps."""
    build = build_module()
    first = {"stage1": {"wall": 60.0, "cpu": 30.0}, "stage2": {"wall": 120.0, "cpu": 100.0}}
    second = {**build.carried_timings(first), "stage2": {"wall": 240.0, "cpu": 200.0}}
    third = build.carried_timings(second)
    assert third == {"stage1 (previous build)": {"wall": 60.0, "cpu": 30.0},
                     "stage2 (previous build)": {"wall": 360.0, "cpu": 300.0}}


def test_a_fresh_decoder_keeps_only_the_encoder_and_its_cost(tmp_path):
    """--from-model with --fresh-decoder: stage 1's output is the shipped ViT, weight for
    weight; the decoder is not copied and only stage 1's rows of the cost are carried."""
    import mlx.core as mx

    build = build_module()
    out = tmp_path / "build"
    tok, enc, init = out / "tokenizer", out / "encoder", out / "init"
    out.mkdir()
    build.continue_from(DEFAULT_MODEL, tok, enc, init, out, fresh_decoder=True)
    shipped = mx.load(str(DEFAULT_MODEL / "model.safetensors"))
    kept = mx.load(str(enc / "vision.safetensors"))
    assert kept and set(kept) == {k[len("vision_tower."):] for k in shipped if k.startswith("vision_tower.")}
    assert all(mx.array_equal(v, shipped["vision_tower." + k]).item() for k, v in kept.items())
    assert not init.exists() and (tok / "tokenizer.json").exists() and (enc / "probe.json").exists()
    timings = json.loads((out / "timings.json").read_text())
    assert timings and all(k.startswith(("stage1", "probe")) for k in timings)
    assert json.loads((out / "previous_build.json").read_text())["fresh_decoder"] is True
    from mlx.utils import tree_flatten

    vit = build.encoder.load_vit(enc)  # strict: loads as stage 1's own output does
    assert len(tree_flatten(vit.parameters())) == len(kept)


def test_fresh_decoder_needs_a_model():
    r = subprocess.run([sys.executable, str(ROOT / "train/default_model/build.py"), "--fresh-decoder"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--fresh-decoder needs --from-model" in r.stderr


def test_more_encoder_steps_need_a_model():
    r = subprocess.run([sys.executable, str(ROOT / "train/default_model/build.py"), "--more-encoder-steps", "10"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--more-encoder-steps needs --from-model" in r.stderr


def test_swap_encoder_replaces_only_the_vision_tower(tmp_path):
    import shutil

    import mlx.core as mx

    build = build_module()
    model, enc = tmp_path / "model", tmp_path / "enc"
    shutil.copytree(DEFAULT_MODEL, model)
    enc.mkdir()
    build.write_encoder(DEFAULT_MODEL, enc)
    vision = {k: v + 1.0 for k, v in mx.load(str(enc / "vision.safetensors")).items()}
    mx.save_safetensors(str(enc / "vision.safetensors"), vision)
    build.swap_encoder(model, enc)
    shipped, swapped = mx.load(str(DEFAULT_MODEL / "model.safetensors")), mx.load(str(model / "model.safetensors"))
    assert set(shipped) == set(swapped) and sorted(model.glob("*.safetensors")) == [model / "model.safetensors"]
    for k, v in swapped.items():
        expected = vision[k[len("vision_tower."):]] if k.startswith("vision_tower.") else shipped[k]
        assert mx.array_equal(v, expected).item(), k
    load(str(model))  # still a loadable folder
    name = sorted(vision)[0]
    mx.save_safetensors(str(enc / "vision.safetensors"), {k: v for k, v in vision.items() if k != name})
    with pytest.raises(ValueError, match=f"missing \\['{name}'"):
        build.swap_encoder(model, enc)


def test_stage1_loss_weights_scale_their_terms():
    """The stage-1 loss is linear in each term's weight: raising the word weight by 2
    adds twice the word term, and the other terms are unchanged."""
    import mlx.core as mx

    encoder = build_module().encoder
    mx.random.seed(0)
    model = encoder.build_model(encoder.VISION)
    batch = encoder.make_batch(5, 2, 128, model.vit.config.grid, shapes.MAX_OBJECTS)
    loss = {w: encoder.loss_fn(model, *batch, weights={**encoder.WEIGHTS, "word": w})[0].item() for w in (0.0, 1.0, 3.0)}
    word_term = loss[1.0] - loss[0.0]
    assert word_term > 0.1  # fresh heads: a cross-entropy of several nats
    assert abs((loss[3.0] - loss[0.0]) - 3 * word_term) < 1e-4 * loss[3.0]
    assert abs(encoder.loss_fn(model, *batch)[0].item() - loss[encoder.WEIGHTS["word"]]) < 1e-6 * loss[1.0]


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["fresh", "continued"])
def test_a_build_can_train_the_kept_encoder_further(tmp_path, decoder):
    """--from-model --more-encoder-steps: the kept ViT is trained further (its weights
    change), probed again, and that stage 1 is timed and described; stage 2 starts from
    a fresh decoder or (without --fresh-decoder) the model's, on the new encoder."""
    import mlx.core as mx

    out = tmp_path / "build"
    cmd = [sys.executable, str(ROOT / "train/default_model/build.py"), "--out", str(out), "--from-model",
           str(DEFAULT_MODEL), "--more-encoder-steps", "2", "--encoder-batch", "4",
           "--encoder-lr", "1e-3", "--word-weight", "3", "--images", "30", "--probe-pictures", "30",
           "--ignore-probe", "--stage2-steps", "2", "--eval-per-type", "1", "--mix", "colour=1,shape=1"]
    cmd += ["--fresh-decoder"] if decoder == "fresh" else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shipped = mx.load(str(DEFAULT_MODEL / "model.safetensors"))
    trained = mx.load(str(out / "encoder/vision.safetensors"))
    assert set(trained) == {k[len("vision_tower."):] for k in shipped if k.startswith("vision_tower.")}
    assert not all(mx.array_equal(v, shipped["vision_tower." + k]).item() for k, v in trained.items())
    probe = json.loads((out / "encoder/probe.json").read_text())
    assert probe["objects"] < json.loads((DEFAULT_MODEL / "eval.json").read_text())["probe"]["objects"]  # 30 pictures
    timings = json.loads((out / "timings.json").read_text())
    assert "stage1" in timings and "probe" in timings and "stage2" in timings
    assert (out / "encoder/history.txt").read_text() == ("2 more steps from that encoder with fresh heads "
                                                         "(lr 0.001, word loss weight 3)")
    init = mx.load(str(out / "init/model.safetensors"))
    if decoder == "continued":  # the model's projector and decoder, on the new encoder
        assert set(init) == set(shipped)
        assert all(mx.array_equal(v, trained[k[len("vision_tower."):]] if k.startswith("vision_tower.")
                                  else shipped[k]).item() for k, v in init.items())
        assert "stage2 (previous build)" in timings
    else:
        decoder_weights = [k for k, v in init.items() if k.startswith("language_model.") and v.size > 1000]
        assert decoder_weights and set(decoder_weights) <= set(shipped)
        assert not any(mx.array_equal(init[k], shipped[k]).item() for k in decoder_weights)
        assert "stage2 (previous build)" not in timings
