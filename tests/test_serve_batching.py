"""Continuous batching in `serve`, over real HTTP on localhost: concurrent
requests are decoded as one batch (a request joins while others decode, a
finished or abandoned one leaves), each streamed on its own, and every answer
is the greedy answer of unbatched generation token for token."""

import base64
import http.client
import io
import json
import threading
import time

import pytest

from conftest import make_image
from decoding_probes import decode_batch_sizes, slowed_decoding
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native import chat_generate, load
from mlx_vlm_native.server import Limits, make_server


@pytest.fixture(scope="module", params=["tiny-56", "qwen2-vl-tiny"])
def loaded(request, tmp_path_factory):
    return load(str(write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)))


def serve(loaded, **limits):
    model, processor = loaded
    httpd = make_server(model, processor, "tiny", "127.0.0.1", 0, Limits(**limits))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(httpd, messages, max_tokens: int, stream: bool = False):
    """POST one chat completion: (text, finish_reason, completion_tokens) from the
    whole reply, or from the streamed deltas and the usage chunk."""
    host, port = httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    assert response.status == 200, data
    if not stream:
        reply = json.loads(data)
        choice = reply["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], reply["usage"]["completion_tokens"]
    events = [line[len("data: "):] for line in data.splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1  # one request's stream, nobody else's
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    return text, finish, chunks[-1]["usage"]["completion_tokens"]


def in_thread(results: dict, name: str, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.__setitem__(name, ask(*args, **kwargs)))
    thread.start()
    return thread


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


REQUESTS = [  # (messages, images, max_tokens, stream)
    ("Describe the picture in detail.", [make_image(90, 60, 1)], 14, False),
    ("What colour is it?", [make_image(40, 120, 2)], 9, True),
    ("Hello there", [], 12, True),
    ("Two pictures: which is larger?", [make_image(64, 64, 3), make_image(100, 50, 4)], 6, False),
]


def user(text, images) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(i)}} for i in images]
             + [{"type": "text", "text": text}]}]


def test_concurrent_requests_decode_as_one_batch_with_unbatched_answers(loaded, monkeypatch):
    model, processor = loaded
    expected = []
    for text, images, max_tokens, _ in REQUESTS:
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
        r = chat_generate(model, processor, messages, images, max_tokens=max_tokens)
        expected.append((r.text, r.finish_reason, r.generation_tokens))
    httpd = serve(loaded, max_batch=8)
    try:
        counts = slowed_decoding(monkeypatch, 0.03)
        sizes = decode_batch_sizes(model, monkeypatch)
        results, threads = {}, []
        text, images, max_tokens, stream = REQUESTS[0]
        threads.append(in_thread(results, 0, httpd, user(text, images), max_tokens, stream))
        wait_for(lambda: counts and counts[0] >= 3)  # the first is decoding: the others join it
        for i, (text, images, max_tokens, stream) in enumerate(REQUESTS[1:], start=1):
            threads.append(in_thread(results, i, httpd, user(text, images), max_tokens, stream))
        for t in threads:
            t.join(120)
        assert [results[i] for i in range(len(REQUESTS))] == expected
        assert sizes[0] == 1 and max(sizes) >= 3  # joined while the first decoded
        peak = sizes.index(max(sizes))
        assert sizes[-1] < max(sizes) and sizes[peak:] == sorted(sizes[peak:], reverse=True)  # and left
        wait_for(lambda: httpd.service.idle.is_set())
        assert not httpd.service.decoding
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_client_that_leaves_frees_its_place_in_the_batch(loaded, monkeypatch):
    model, processor = loaded
    long_text, short_text = "Tell me a long story", "Hello"
    expected = chat_generate(model, processor, [{"role": "user", "content": long_text}], max_tokens=60)
    httpd = serve(loaded, max_batch=2)
    try:
        counts = slowed_decoding(monkeypatch, 0.03)
        host, port = httpd.server_address[:2]
        leaving = http.client.HTTPConnection(host, port, timeout=60)
        leaving.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": long_text}], "max_tokens": 400, "stream": True}))
        assert leaving.getresponse().readline().startswith(b"data: ")
        results = {}
        staying = in_thread(results, "staying", httpd, [{"role": "user", "content": long_text}], 60, True)
        wait_for(lambda: len(httpd.service.decoding) == 2)  # the batch is full
        leaving.close()
        wait_for(lambda: len(httpd.service.decoding) == 1, 10)
        left_at = counts[0]
        short = in_thread(results, "short", httpd, [{"role": "user", "content": short_text}], 2)
        short.join(60)
        assert "short" in results and staying.is_alive()  # it took the freed place while the other decoded
        staying.join(120)
        assert counts[0] == left_at < 400  # nothing more was made for the client that left
        assert results["staying"] == (expected.text, expected.finish_reason, expected.generation_tokens)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_prompt_cache_survives_batching(loaded):
    """The same image asked again after a batched answer: its KV prefix is reused
    and the answer equals the unbatched one."""
    model, processor = loaded
    image = make_image(80, 80, 5)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    expected = chat_generate(model, processor, messages, [image], max_tokens=5)
    httpd = serve(loaded)
    try:
        first = ask(httpd, user("What is it?", [image]), 5)
        seen, service = [], httpd.service
        original = service.conversations.reuse
        service.conversations.reuse = lambda model, ids: seen.append(original(model, ids)) or seen[-1]
        second = ask(httpd, user("What is it?", [image]), 5)
        assert first == second == (expected.text, expected.finish_reason, expected.generation_tokens)
        assert seen == [expected.prompt_tokens - 1]  # all but the last prompt token came from the cache
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_that_cannot_share_the_batch_are_answered_alone(loaded, monkeypatch):
    """A rotating (or rotating) KV cache is not batched here, and a seeded sample
    needs the random stream to itself: such answers run one at a time, and
    equal unbatched generation with the same options."""
    from mlx_vlm_native.params import check_cache_params

    model, processor = loaded
    cache_options = check_cache_params(None, 64, 5000, 64)
    messages = [{"role": "user", "content": "Hello"}]
    rotating = chat_generate(model, processor, messages, max_tokens=6, **cache_options)
    seeded = chat_generate(model, processor, messages, max_tokens=6, temperature=1.0, seed=7)
    httpd = make_server(model, processor, "tiny", "127.0.0.1", 0, Limits(), cache_options=cache_options)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    plain = serve(loaded)
    try:
        sizes = decode_batch_sizes(model, monkeypatch)
        results = {}
        threads = [in_thread(results, i, httpd, messages, 6) for i in range(3)]
        for t in threads:
            t.join(120)
        assert [results[i] for i in range(3)] == [(rotating.text, rotating.finish_reason, 6)] * 3
        assert set(sizes) == {1}
        host, port = plain.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": messages, "max_tokens": 6, "temperature": 1.0, "seed": 7}))
        reply = json.loads(conn.getresponse().read())
        assert reply["choices"][0]["message"]["content"] == seeded.text
    finally:
        for server in (httpd, plain):
            server.shutdown()
            server.server_close()
