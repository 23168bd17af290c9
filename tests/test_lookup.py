"""Stage 2's lookup loss (train/default_model/lookup.py): which object an answer names, which
positions are supervised, the loss against a NumPy reference, exact resume of the generated
batches, and training that moves an untrained head onto the named objects."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_vlm_native import load
from mlx_vlm_native.utils import DEFAULT_MODEL
from train import shapes_world as shapes  # the generated world: train/shapes_world.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lookup():
    sys.path.insert(0, str(ROOT / "train/default_model"))
    spec = importlib.util.spec_from_file_location("lookup", ROOT / "train/default_model/lookup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def default():
    return load()


def test_the_named_object_is_the_one_whose_colour_and_shape_the_answer_says(lookup):
    scene = shapes.Scene(200, 200, "plain", [shapes.Item("star", "red", "small", 0),
                                             shapes.Item("circle", "red", "large", 4),
                                             shapes.Item("cross", "white", "large", 8)])
    assert lookup.named_item(scene, "It is a white cross.") is scene.items[2]
    assert lookup.named_item(scene, "The star is red.") is scene.items[0]
    assert lookup.named_item(scene, "The red circle is centre.") is scene.items[1]
    assert lookup.named_item(scene, "There are three shapes.") is None
    assert lookup.named_item(scene, shapes.caption(scene)) is None  # names all three
    assert lookup.named_item(scene, "Colours: star red, circle red and cross white.") is None


def test_in_captions_and_lists_each_object_is_its_own_words(lookup):
    scene = shapes.Scene(200, 200, "plain", [shapes.Item("star", "red", "small", 0),
                                             shapes.Item("circle", "blue", "large", 8)])
    text = shapes.caption(scene)  # "A small red star at the top left and a large blue circle at the bottom right."
    spans = lookup.mentions(scene, text, in_lists=True)
    assert [(i.shape, text[a:b]) for i, a, b in spans] == [("star", "A small red star at the top left"),
                                                             ("circle", "a large blue circle at the bottom right")]
    assert lookup.mentions(scene, text) == []  # answers about one object only
    listed = "Places: red star top left and blue circle bottom right."
    assert [listed[a:b] for _, a, b in lookup.mentions(scene, listed, True)] == ["red star top left",
                                                                                  "blue circle bottom right"]
    assert [(i.shape, a, b) for i, a, b in lookup.mentions(scene, "It is a blue circle.", True)] == [("circle", 0, 20)]


def test_the_rows_of_a_mention_predict_its_tokens(lookup, default):
    _, processor = default
    tokenizer = processor.tokenizer
    answer = "Colours: star red and circle blue."
    ids = np.array(tokenizer.encode(answer, add_special_tokens=False) + [2])  # the end token follows
    rows = np.arange(len(ids)) + 40
    said = lookup.mention_rows(tokenizer, answer, ids, rows, answer.index("circle"), answer.index("blue") + 4)
    assert tokenizer.decode(ids[said - 40].tolist()).strip() == "circle blue"
    with pytest.raises(ValueError, match="is not the text of its tokens"):
        lookup.mention_rows(tokenizer, answer + " Extra", ids, rows, 0, 3)


def test_supervised_positions_are_those_predicting_each_answer(lookup):
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0], bool)
    runs = lookup.answer_runs(mask)
    assert [r.tolist() for r in runs] == [[1, 2], [6, 7, 8]]  # position p predicts token p + 1
    assert lookup.answer_runs(np.zeros(5, bool)) == []


def test_lookup_loss_is_minus_log_attention_mass_on_the_object(lookup, monkeypatch):
    """Against NumPy: softmax over the causal keys, -log of the mass on the object's tokens,
    averaged over supervised positions and the heads in LOOKUP_HEADS (with GQA's key sharing)."""
    monkeypatch.setattr(lookup, "LOOKUP_HEADS", ((0, 1), (1, 3)))
    rng = np.random.default_rng(0)
    B, H, KV, T, D, scale = 2, 4, 2, 9, 8, 0.35
    seen = {layer: [mx.array(rng.normal(size=(B, H, T, D)).astype(np.float32)),
                    mx.array(rng.normal(size=(B, KV, T, D)).astype(np.float32))] for layer in (0, 1)}
    lookups = [[(np.array([5, 6]), np.array([1, 2])), (np.array([8]), np.array([3]))],
               [(np.array([4]), np.array([0, 2, 3]))]]
    got = lookup.lookup_loss(seen, lookups, scale).item()
    terms = []
    for layer, head in ((0, 1), (1, 3)):
        q, k = np.array(seen[layer][0])[:, head], np.array(seen[layer][1])[:, head // 2]
        per_row = []
        for b, sample in enumerate(lookups):
            for rows, tokens in sample:
                for i in rows:
                    s = q[b, i] @ k[b, : i + 1].T * scale
                    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                    per_row.append(-np.log(p[tokens].sum()))
        terms.append(np.mean(per_row))
    assert abs(got - np.mean(terms)) < 1e-5 * max(1.0, abs(got))


def test_recording_leaves_the_forward_unchanged(lookup, default):
    model, processor = default
    conversation, _ = lookup.sample(np.random.default_rng(3), None, 3, 0.0, 1, 8)
    inputs, mask = lookup.tokenize(processor, conversation)
    plain = lookup.forward_batch(model, [(inputs, mask)])[0]
    with lookup.recorded_queries_and_keys(model, [1, 2]) as seen:
        recorded = lookup.forward_batch(model, [(inputs, mask)])[0]
    assert mx.array_equal(plain, recorded).item()
    T = len(inputs.input_ids)
    assert [tuple(a.shape) for a in seen[1]] == [(1, 4, T, 32), (1, 2, T, 32)]
    assert all(not hasattr(layer.self_attn.rope, "__closure__") for layer in model.layers)  # put back


def test_generated_batches_resume_exactly(lookup, default):
    _, processor = default
    data = dict(mix=None, turns=3, two_image_fraction=0.2, two_image_turns=2)
    stream = lookup.batches(processor, 5, 3, None, 8, 3, **data)
    _, after_first = next(stream)
    second, _ = next(stream)
    resumed, _ = next(lookup.batches(processor, 5, 3, after_first, 8, 3, **data))
    for (a, ma, la), (b, mb, lb) in zip(second, resumed):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(ma, mb)
        assert np.array_equal(np.asarray(a.pixel_values), np.asarray(b.pixel_values))
        assert [(r.tolist(), t.tolist()) for r, t in la] == [(r.tolist(), t.tolist()) for r, t in lb]
    assert any(la for _, _, la in second)  # some answers are about one object


def test_training_moves_an_untrained_head_onto_the_named_objects(lookup, monkeypatch, tmp_path):
    """A head the shipped model was never taught (layer 3, head 3): after 6 steps with the
    lookup loss alone weighing in, its loss on a fixed batch has fallen."""
    monkeypatch.setattr(lookup, "LOOKUP_HEADS", ((3, 3),))
    model, processor = load()
    batch, _ = next(lookup.batches(processor, 123, 8, None, 8, 3, mix=None, turns=3, two_image_fraction=0.0,
                                   two_image_turns=1))
    stats = {}
    scale = model.layers[0].self_attn.scale
    lookup.make_loss(1.0, scale, stats)(model, batch)
    before = stats["lookup"].item()
    lookup.train(DEFAULT_MODEL, tmp_path, steps=6, lr=3e-3, weight=1.0, micro_batch=8, checkpoint_every=3,
                 progress=False)
    trained, _ = load(str(tmp_path / "model"))
    lookup.make_loss(1.0, scale, stats)(trained, batch)
    after = stats["lookup"].item()
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "checkpoints/step_00000006").exists()


@pytest.mark.slow
def test_a_build_trains_stage_two_with_the_lookup_loss(tmp_path):
    """build.py --lookup-weight: stage 2 from generated conversations (no data files written
    when the tokenizer is the model's), timed, evaluated and described."""
    import json

    out = tmp_path / "build"
    cmd = [sys.executable, str(ROOT / "train/default_model/build.py"), "--out", str(out), "--from-model",
           str(DEFAULT_MODEL), "--lookup-weight", "0.1", "--lookup-in-lists", "--stage2-steps", "2",
           "--eval-per-type", "1", "--mix", "colour=1,shape=1,position=1,caption=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "data").exists()
    assert "stage2" in json.loads((out / "timings.json").read_text())
    load(str(out / "stage2/model"))


@pytest.mark.parametrize("flags,message", [(["--lookup-weight", "-1"], "--lookup-weight must be >= 0"),
                                           (["--lookup-in-lists"], "--lookup-in-lists needs --lookup-weight")])
def test_lookup_flags_are_checked(flags, message):
    r = subprocess.run([sys.executable, str(ROOT / "train/default_model/build.py"), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr
