"""`mlx-vlm-native chat`: the conversation it keeps, its commands, and the
command itself with piped stdin."""

import io
import re
import subprocess
import sys

import pytest

from conftest import make_image
from mlx_vlm_native.chat import Conversation, chat_loop
from mlx_vlm_native.generate import chat_generate, generate
from convert.write_hf_release import write_checkpoint

SAMPLING = dict(max_tokens=6, temperature=0.0, top_p=1.0, seed=None)
STATS = re.compile(r"\[prompt: (\d+) tokens \((\d+) cached\), [\d.]+ tokens/s; answer: (\d+) tokens")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_images")
    paths = [folder / "a.png", folder / "b.png"]
    make_image(60, 90, 0).save(paths[0])
    make_image(70, 50, 1).save(paths[1])
    return [str(p) for p in paths]


def talk(tiny_56_model, lines, conversation=None, verbose=True, **sampling):
    """(stdout, stderr, conversation) of the REPL fed `lines`."""
    out, err = io.StringIO(), io.StringIO()
    conversation = conversation or Conversation()
    chat_loop(*tiny_56_model, conversation, lines, {**SAMPLING, **sampling}, verbose, out, err)
    return out.getvalue(), err.getvalue(), conversation


def prompt_tokens(stdout: str) -> list:
    return [(int(p), int(a)) for p, _, a in STATS.findall(stdout)]


def cached_tokens(stdout: str) -> list:
    return [int(c) for _, c, _ in STATS.findall(stdout)]


def test_messages_carry_images_in_the_first_user_turn():
    conversation = Conversation(images=["a", "b"])
    conversation.ask("What is this?")
    conversation.answer("A cat.")
    conversation.ask("What colour?")
    assert conversation.messages() == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ]
    conversation.reset()
    conversation.ask("Again?")
    assert conversation.messages()[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
    conversation.new_images([])
    conversation.ask("Hello")
    assert conversation.messages() == [{"role": "user", "content": "Hello"}]


def test_dropping_old_exchanges_keeps_the_image_turn_and_the_question():
    conversation = Conversation(images=["a"])
    for i in range(3):
        conversation.ask(f"q{i}")
        conversation.answer(f"a{i}")
    conversation.ask("q3")
    assert conversation.drop_oldest_exchange()
    assert [t["content"] for t in conversation.turns] == ["q0", "a0", "q2", "a2", "q3"]
    assert conversation.drop_oldest_exchange()
    assert not conversation.drop_oldest_exchange()
    assert [t["content"] for t in conversation.turns] == ["q0", "a0", "q3"]


def test_history_is_kept_and_reset(tiny_56_model, images):
    stdout, stderr, conversation = talk(
        tiny_56_model, ["What is in this image?", "And the colours?", "/reset", "What is in this image?"],
        Conversation([images[0]]))
    (p1, a1), (p2, _), (p3, _) = prompt_tokens(stdout)
    assert p2 > p1 + a1  # the first question and answer are in the second prompt
    assert p3 == p1  # /reset: the images again, without the history
    c1, c2, c3 = cached_tokens(stdout)
    assert c1 == 0 and c2 >= p1 and c3 == p1 - 1  # the last prompt token is always run again
    assert "conversation cleared" in stdout and not stderr
    assert len(conversation.turns) == 2


def test_the_answers_are_what_chat_generate_gives(tiny_56_model, images):
    model, processor = tiny_56_model
    stdout, _, conversation = talk(tiny_56_model, ["Describe it.", "More?"], Conversation([images[0]]), verbose=False)
    first = generate(model, processor, "Describe it.", images=[images[0]], **SAMPLING)
    assert conversation.turns[1]["content"] == first.text
    second = chat_generate(model, processor, conversation.messages()[:3], [images[0]], **SAMPLING)
    assert conversation.turns[3]["content"] == second.text
    assert stdout == first.text + "\n" + second.text + "\n"  # no stats without --verbose


@pytest.mark.parametrize("preset", ["tiny-56", "qwen2-vl-tiny", "points-tiny", None])
def test_prompt_cache_changes_nothing_but_the_work(preset, images, tmp_path):
    """Each turn through the conversation's ConversationCache gives the tokens a
    fresh run over the whole conversation gives, while reading the earlier
    turns from the cache (Qwen2-VL's M-RoPE positions included; None is the
    embedded default model)."""
    from mlx_vlm_native import load

    model, processor = load(str(write_checkpoint(tmp_path / "m", preset)) if preset else None)
    conversation = Conversation([images[0]])
    for turn, question in enumerate(["Describe it.", "And the colours?", "Anything else?"]):
        conversation.ask(question)
        sampling = {**SAMPLING, "max_tokens": 12}
        fresh = chat_generate(model, processor, conversation.messages(), conversation.images, **sampling)
        cached = chat_generate(model, processor, conversation.messages(), conversation.images,
                               conversation=conversation.cache, **sampling)
        assert cached.text == fresh.text and cached.prompt_tokens == fresh.prompt_tokens
        assert (cached.cached_tokens > 0) == (turn > 0)
        conversation.answer(cached.text)
    assert conversation.cache.vision_features is not None
    conversation.new_images([images[1]])
    assert conversation.cache.kv is None  # other images: nothing cached applies


def test_bad_image_path_keeps_the_session(tiny_56_model, images, tmp_path):
    lines = ["Describe it.", f"/image {tmp_path / 'missing.png'}", "And then?",
             f"/image {images[1]} {images[0]}", "Compare them.", "/image", "/frobnicate", "/help"]
    stdout, stderr, conversation = talk(tiny_56_model, lines, Conversation([images[0]]))
    assert "image not found" in stderr and "images and conversation are kept" in stderr
    (p1, a1), (p2, _), (p3, _) = prompt_tokens(stdout)
    assert p2 > p1 + a1  # the bad path lost nothing
    assert len(conversation.images) == 2 and len(conversation.turns) == 2
    assert "usage: /image" in stderr and "unknown command /frobnicate" in stderr and "/reset" in stdout


def test_context_overflow_forgets_old_turns_then_says_so(tiny_56_model, images, monkeypatch):
    model, _ = tiny_56_model
    first = talk(tiny_56_model, ["Describe it."], Conversation([images[0]]))[0]
    (p1, a1), = prompt_tokens(first)
    # room for the image turn and about two more exchanges
    monkeypatch.setattr(model.args.text_config, "max_position_embeddings", p1 + 3 * (a1 + 12))
    questions = ["Describe it.", "And the top?", "And the left?", "And the right?", "And the bottom?"]
    stdout, stderr, conversation = talk(tiny_56_model, questions, Conversation([images[0]]))
    assert "the oldest exchange is forgotten" in stderr
    assert len(prompt_tokens(stdout)) == 5  # every question answered
    assert conversation.turns[0]["content"] == "Describe it." and conversation.turns[-2]["content"] == "And the bottom?"
    stdout, stderr, conversation = talk(tiny_56_model, ["word " * 400, "Short?"], conversation)
    assert "context is" in stderr and len(prompt_tokens(stdout)) == 1  # the long one refused, the next answered


def test_chat_command_with_piped_stdin(tiny_56_dir, images, tmp_path):
    lines = ["What is in this image?", "And the colours?", "/reset", "What is in this image?",
             f"/image {tmp_path / 'nope.png'}", "Still there?", f"/image {images[1]}", "And this one?",
             "/quit", "never asked"]
    r = subprocess.run(
        [sys.executable, "-m", "mlx_vlm_native.cli", "chat", "--model", str(tiny_56_dir), "--image", images[0],
         "--max-tokens", "5", "--verbose"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stats = prompt_tokens(r.stdout)
    assert len(stats) == 5  # nothing after /quit
    (p1, a1), (p2, _), (p3, _), (p4, _), (p5, _) = stats
    assert p2 > p1 + a1 and p3 == p1 and p4 > p3 and p5 != p1
    assert "image not found" in r.stderr and "new conversation about" in r.stdout
    assert "execution path: cpu: MLX with NumPy host ops" in r.stderr or "execution path: gpu: plain MLX" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native.cli", "chat", "--model", str(tiny_56_dir),
                        "--image", str(tmp_path / "nope.png")], input="", capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "image not found" in r.stderr
