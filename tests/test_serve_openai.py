"""`serve` against what we did not write: the official `openai` client, and
mlx-lm's own log-probabilities; stop strings; several conversations kept in
the LRU prompt cache."""

import base64
import io
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from conftest import make_image
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native import chat_generate, load
from mlx_vlm_native.generate import prepare_chat_inputs
from mlx_vlm_native.server import Limits, ConversationCaches, make_server

import openai  # noqa: E402 - the test extras install it (pyproject.toml); a missing client fails, not skips


@pytest.fixture(scope="module", params=["tiny-56", "qwen2-vl-tiny"])
def loaded(request, tmp_path_factory):
    return load(str(write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)))


@pytest.fixture
def server(loaded):
    model, processor = loaded
    httpd = make_server(model, processor, "tiny", "127.0.0.1", 0, Limits())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def client(httpd):
    host, port = httpd.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_messages(text: str, image) -> tuple:
    """(OpenAI messages, the template's messages) for one question about `image`."""
    return ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(image)}},
                                           {"type": "text", "text": text}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}])


def test_the_openai_client_lists_completes_and_streams(loaded, server):
    model, processor = loaded
    image = make_image(64, 80, 3)
    messages, template = image_messages("What is it?", image)
    expected = chat_generate(model, processor, template, [image], max_tokens=6)
    c = client(server)
    assert [m.id for m in c.models.list()] == ["tiny"]
    reply = c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.generation_tokens
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.generation_tokens
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        c.chat.completions.create(model="tiny", messages=messages, n=2)


def test_logprobs_equal_mlx_lms_own(loaded, server):
    """The logprobs of each answer token, and the top 3, as mlx-lm's
    `generate_step` gives them on the same model and prompt (text only, so
    that mlx-lm calls the model as it is)."""
    model, processor = loaded
    messages = [{"role": "user", "content": "Hello there"}]
    ids = prepare_chat_inputs(model, processor, messages).input_ids
    reference = [(t, np.array(lp)) for t, lp in generate_step(mx.array(ids), model, max_tokens=5)]
    eos = set(processor.tokenizer.eos_token_ids)
    c = client(server)
    for stream in (False, True):
        reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3, stream=stream)
        if stream:
            entries = [e for ch in reply if ch.choices and ch.choices[0].logprobs
                       for e in ch.choices[0].logprobs.content]
        else:
            entries = reply.choices[0].logprobs.content
        expected = [(t, lp) for t, lp in reference if t not in eos][: len(entries)]
        assert entries and len(entries) == len(expected)
        for entry, (token, lp) in zip(entries, expected):
            assert entry.token == processor.tokenizer.decode([token])
            assert abs(entry.logprob - lp[token]) <= 1e-4
            top = np.argsort(-lp, kind="stable")[:3]
            assert [e.token for e in entry.top_logprobs] == [processor.tokenizer.decode([int(t)]) for t in top]
            np.testing.assert_allclose([e.logprob for e in entry.top_logprobs], lp[top], atol=1e-4)


def test_stop_strings_cut_the_answer(loaded, server):
    model, processor = loaded
    messages = [{"role": "user", "content": "Hello there"}]
    full = chat_generate(model, processor, messages, max_tokens=12).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if len(stop) < 2:
        pytest.skip("the random model's answer is too short")
    cut = full[: full.find(stop)]
    c = client(server)
    reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="stop"):
        c.chat.completions.create(model="tiny", messages=messages, stop=["a", "b", "c", "d", "e"])


def test_three_interleaved_conversations_keep_their_caches(loaded, server, monkeypatch):
    """Three conversations about three images, their turns interleaved: each
    second turn reads its own conversation's KV cache (all of the first turn's
    prompt and answer but the last token) and does not encode its image again;
    with room for two, the least recently used one is dropped."""
    model, processor = loaded
    encodes = []
    original = type(model).encode_vision_steps
    monkeypatch.setattr(type(model), "encode_vision_steps", lambda self, b: encodes.append(1) or original(self, b))
    service = server.service
    seen, reuse = [], service.conversations.reuse
    service.conversations.reuse = lambda key, ids: seen.append((len(ids), reuse(key, ids))) or seen[-1][1]
    c = client(server)
    images = [make_image(60 + 8 * i, 70, 10 + i) for i in range(3)]
    firsts = []
    for image in images:
        messages, _ = image_messages("What is it?", image)
        reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
        firsts.append((messages, reply.choices[0].message.content, reply.usage))
    assert len(encodes) == 3 and all(kept == 0 for _, kept in seen)
    seen.clear()
    for (messages, answer, usage), image in zip(firsts, images):
        follow = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
        reply = c.chat.completions.create(model="tiny", messages=follow, max_tokens=4, temperature=0)
        _, template = image_messages("What is it?", image)
        template += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And now?"}]
        assert reply.choices[0].message.content == chat_generate(model, processor, template, [image],
                                                                 max_tokens=4).text
    assert len(encodes) == 3  # no image encoded again
    for (_, _, usage), (_, kept) in zip(firsts, seen):
        assert kept >= usage.prompt_tokens  # the first turn's prompt at least came from the cache

    small = ConversationCaches(max_entries=2)
    for i in range(3):
        small.keep((bytes([i]),), [1, 2, 3, i], model.make_cache())
    assert small.reuse((b"\x00",), [1, 2, 3, 0, 5]) == 0  # the oldest was dropped
    assert small.reuse((b"\x02",), [1, 2, 3, 2, 5]) == 4
