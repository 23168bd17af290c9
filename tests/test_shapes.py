"""The procedural shapes world: deterministic, unambiguous questions, answers
that score back to their values, datasets the finetuning reader accepts."""

import json
import re

import numpy as np
import pytest

from train import shapes_world as shapes  # the generated world: train/shapes_world.py


def test_same_seed_same_scene_and_pixels():
    a = shapes.render(shapes.random_scene(np.random.default_rng(5)), np.random.default_rng(6))
    b = shapes.render(shapes.random_scene(np.random.default_rng(5)), np.random.default_rng(6))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_scenes_respect_the_layout():
    rng = np.random.default_rng(0)
    aspects = []
    for _ in range(200):
        scene = shapes.random_scene(rng)
        cells = [i.cell for i in scene.items]
        assert len(cells) == len(set(cells)) and len(cells) <= shapes.MAX_OBJECTS
        if scene.word:
            assert all(c // 3 != scene.word_cell for c in cells)
        else:
            assert cells
        aspects.append(scene.width / scene.height)
    assert min(aspects) < 0.7 and max(aspects) > 1.4


def test_object_colour_is_drawn_in_its_cell():
    scene = shapes.Scene(300, 150, "plain", [shapes.Item("square", "red", "large", 0),
                                              shapes.Item("circle", "blue", "large", 8)])
    x = np.asarray(shapes.render(scene, np.random.default_rng(0))).astype(int)
    top_left, bottom_right = x[:50, :100].reshape(-1, 3), x[100:, 200:].reshape(-1, 3)
    names, refs = list(shapes.COLOURS), np.array(list(shapes.COLOURS.values()))

    def near(px, colour):  # the share of pixels whose nearest named colour is `colour`, within 60
        d = np.abs(px[:, None] - refs[None]).sum(-1)
        return ((d.argmin(1) == names.index(colour)) & (d.min(1) < 60)).mean()

    assert near(top_left, "red") > 0.1 and near(top_left, "blue") == 0
    assert near(bottom_right, "blue") > 0.1 and near(bottom_right, "red") == 0


def test_questions_are_unambiguous_or_refused():
    rng = np.random.default_rng(0)
    two_circles = shapes.Scene(200, 200, "plain", [shapes.Item("circle", "red", "small", 0),
                                                    shapes.Item("circle", "blue", "large", 4)])
    assert shapes.ask(two_circles, "colour", rng) is None  # which circle?
    assert shapes.ask(two_circles, "word", rng) is None
    q, a, value = shapes.ask(two_circles, "shape", rng)
    assert value == "circle" and a in ("It is a red circle.", "It is a blue circle.")
    q, a, value = shapes.ask(two_circles, "count", rng)
    assert (a, value) == ("There are two shapes.", "two")
    with pytest.raises(ValueError, match="unknown question type"):
        shapes.ask(two_circles, "smell", rng)


def test_answers_name_the_value_right_after_the_object():
    """The trained answer forms put the value straight after the words that pick the
    object out, and the scorer reads the value back from them."""
    rng = np.random.default_rng(0)
    scene = shapes.Scene(200, 200, "plain", [shapes.Item("star", "red", "small", 0),
                                             shapes.Item("circle", "blue", "large", 8)])
    for kind, value in (("shape", "circle"), ("position", "bottom right")):
        while True:
            q, a, v = shapes.ask(scene, kind, rng)
            if "blue" in q:
                break
        assert v == value and shapes.answer_value(kind, a) == value
        assert a in ("It is a blue circle.", "The blue circle is bottom right.")


@pytest.mark.parametrize("kind,answer,value", [
    ("colour", "The star is red.", "red"),
    ("colour", "The star is Color red", "red"),
    ("shape", "The red shape is a triangle.", "triangle"),
    ("shape", "It is a red triangle.", "triangle"),
    ("shape", "two crosses", "cross"),
    ("position", "The red star is at the top left.", "top left"),
    ("position", "The red star is top left.", "top left"),
    ("position", "The red star is on the left.", "left"),
    ("position", "The red star is in the center.", "centre"),
    ("count", "There are four shapes.", "four"),
    ("word", 'The word is "owl".', "owl"),
    ("multi_image", "The second image has a star.", "second"),
    ("colour", "I do not know.", None),
])
def test_answer_values(kind, answer, value):
    assert shapes.answer_value(kind, answer) == value


def test_every_generated_answer_scores_as_its_value():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene, other = shapes.random_scene(rng), shapes.random_scene(rng, with_word=False)
        for kind in shapes.QUESTION_TYPES + ("size",):
            qa = shapes.ask(scene, kind, rng, other)
            if qa is not None and kind != "caption":
                assert shapes.answer_value(kind, qa[1]) == qa[2], qa


def test_dataset_feeds_the_finetuning_reader(tmp_path, tiny_hf_dir):
    from mlx_vlm_native import load
    from mlx_vlm_native.training.finetune import ConversationFile, tokenize

    shapes.write_dataset(tmp_path, 30, seed=0, two_image_fraction=0.3)
    lines = (tmp_path / "conversations.jsonl").read_text().splitlines()
    assert len(lines) == 30 and len((tmp_path / "captions.jsonl").read_text().splitlines()) == 30
    assert any(len([c for c in json.loads(x)["messages"][0]["content"] if c["type"] == "image"]) == 2 for x in lines)
    _, processor = load(str(tiny_hf_dir))
    data = ConversationFile(tmp_path / "conversations.jsonl", shuffle=False)
    for i in range(5):
        inputs, mask = tokenize(processor, data.read(i))
        assert mask.any() and len(inputs.pixel_values) >= 1


def test_two_image_conversations_ask_about_several_shapes(tmp_path):
    """With two_image_turns, a two-image conversation asks about a different shape each
    turn, gives both images with the first question only, and every answer names the
    image that alone has the shape; the default keeps one question."""
    def two_image_records(root, **kw):
        shapes.write_dataset(root, 60, seed=0, two_image_fraction=1.0, **kw)
        records = [json.loads(x)["messages"] for x in (root / "conversations.jsonl").read_text().splitlines()]
        return [m for m in records if sum(c["type"] == "image" for c in m[0]["content"]) == 2]

    single = two_image_records(tmp_path / "one")
    assert single and all(len(m) == 2 for m in single)
    several = two_image_records(tmp_path / "four", two_image_turns=4)
    assert max(len(m) for m in several) == 8 and min(len(m) for m in several) >= 2
    captions = {}
    for line in (tmp_path / "four" / "captions.jsonl").read_text().splitlines():
        record = json.loads(line)  # the first image's scene, without its printed word
        captions[record["image"]] = shapes.words(re.sub(r'the word "[^"]*"', "", record["caption"]))
    for m in several:
        questions = [turn["content"][-1]["text"] for turn in m[0::2]]
        assert len(set(questions)) == len(questions)
        assert all(c["type"] == "text" for turn in m[2::2] for c in turn["content"])
        in_first = captions[m[0]["content"][0]["image"]]
        for question, answer in zip(questions, [turn["content"] for turn in m[1::2]]):
            shape = question.removeprefix("Which image has a ").rstrip("?")
            which = "first" if f" {shape} " in f" {in_first} " else "second"
            assert answer == f"The {which} image has a {shape}."


def test_held_out_questions_cover_every_type():
    qs = shapes.held_out_questions(3, seed=0)
    assert [q.kind for q in qs] == [k for k in shapes.QUESTION_TYPES for _ in range(3)]
    assert all(len(q.images) == (2 if q.kind == "multi_image" else 1) for q in qs)


def test_later_turns_cannot_copy_an_earlier_answer():
    """With one red circle, "What colour is the circle?" and "What shape is the
    red object?" answer each other, so a conversation holds only one of them;
    a second object gives the second turn something new to ask."""
    one = shapes.Scene(160, 160, "plain", [shapes.Item("circle", "red", "large", 4)])
    two = shapes.Scene(160, 160, "plain", [shapes.Item("circle", "red", "large", 4),
                                           shapes.Item("star", "blue", "small", 0)])
    mix = {"colour": 0.5, "shape": 0.5}
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert len(shapes.conversation(one, "x.png", rng, turns=2, mix=mix)["messages"]) == 2
        answers = [m["content"] for m in shapes.conversation(two, "x.png", rng, turns=2, mix=mix)["messages"][1::2]]
        assert len(answers) == 2 and shapes.words(answers[1]) not in shapes.words(answers[0])


def test_backgrounds_lone_shapes_and_drawn_geometry():
    """Every background kind occurs, a lone shape spans 10-60% of the short side
    and sits inside its cell, and the drawn box and word box are recorded."""
    rng = np.random.default_rng(3)
    seen, extents = set(), []
    for _ in range(300):
        scene = shapes.random_scene(rng)
        shapes.render(scene, rng)
        seen.add(scene.background)
        for item in scene.items:
            assert item.colour not in shapes.HIDDEN_ON.get(scene.background, ())
            cx, cy, r = item.box
            x0, y0, x1, y1 = shapes.cell_box(scene, item.cell)
            assert x0 <= cx <= x1 and y0 <= cy <= y1
            if item.extent is not None:
                extents.append(2 * r / min(scene.width, scene.height))
        if scene.word:
            assert scene.word_box[2] > scene.word_box[0]
    assert seen == set(shapes.BACKGROUNDS)
    assert 0.1 <= min(extents) < 0.2 and 0.5 < max(extents) <= 0.6


def test_lone_shape_questions_take_the_plain_forms():
    rng = np.random.default_rng(0)
    one = shapes.Scene(200, 200, "white", [shapes.Item("star", "red", "large", 4)])
    asked = {shapes.ask(one, kind, rng)[0] for kind in ("colour", "shape") for _ in range(60)}
    assert {"What colour is the shape?", "What shape is this?"} <= asked
    two = shapes.Scene(200, 200, "white", [shapes.Item("star", "red", "large", 4), shapes.Item("circle", "blue", "small", 0)])
    assert not {shapes.ask(two, "colour", rng)[0] for _ in range(30)} & {"What colour is the shape?", "What colour is it?"}


def test_drawn_pictures_are_deterministic_and_show_their_colour():
    a = shapes.drawn_questions(3, seed=4)
    b = shapes.drawn_questions(3, seed=4)
    assert [q.question for q in a] == [q.question for q in b]
    assert all(np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(a, b))
    for q in a:
        w, h = q.images[0].size
        assert 100 <= min(w, h) and max(w, h) <= 400 and max(w, h) / min(w, h) <= 2.01
        if q.kind == "colour":
            px = np.asarray(q.images[0]).reshape(-1, 3).astype(int)
            assert (np.abs(px - shapes.PAINT_COLOURS[q.expected]).max(axis=1) < 8).sum() > 20


def test_list_answers_put_each_value_right_after_the_words_naming_its_object():
    scene = shapes.Scene(width=240, height=240, background="white", items=[
        shapes.Item("cross", "green", "large", 4), shapes.Item("circle", "red", "small", 0)], word=None)
    pick = lambda options: options[0]  # noqa: E731
    assert shapes.ask_list(scene, "colours", pick)[1] == "Colours: circle red and cross green."
    assert shapes.ask_list(scene, "places", pick)[1] == "Places: red circle top left and green cross centre."
    scene.items.append(shapes.Item("circle", "blue", "small", 8))
    assert shapes.ask_list(scene, "colours", pick) is None  # "circle" no longer names one object


def test_a_list_question_ends_its_conversation():
    rng = np.random.default_rng(3)
    mix = {"colour": 1.0, "colours": 0.5, "places": 0.5}  # every conversation tries to end with a list
    endings = 0
    for _ in range(60):
        c = shapes.conversation(shapes.random_scene(rng, min_items=2), "x.png", rng, turns=3, mix=mix)
        answers = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        assert len(answers) <= 3 and c["messages"][0]["content"][0]["type"] == "image"
        assert not any(a.startswith(("Colours:", "Places:")) for a in answers[:-1])
        endings += answers[-1].startswith(("Colours:", "Places:"))
    assert endings > 20
