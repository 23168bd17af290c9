"""`mlx-vlm-native serve` over real HTTP on localhost: OpenAI shapes, streaming,
image URLs, every refused request, and the command line."""

import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from conftest import make_image
from decoding_probes import slowed_decoding
from mlx_vlm_native.generate import generate
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native.server import Limits, make_server

CONTEXT = 512
LIMITS = Limits(max_request_bytes=1_000_000, max_image_bytes=200_000, max_image_pixels=1_000_000,
                image_timeout=5.0, default_max_tokens=8, max_images=12, max_request_pixels=2_000_000)
SERVERS = {}  # the module's server, for tests that look at its service
QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("serve_model"), "tiny-56")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT  # short prompts overflow it
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    from mlx_vlm_native import load

    return load(str(model_dir))


def start_in_thread(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def server(loaded):
    model, processor = loaded
    httpd = make_server(model, processor, "tiny-llava", "127.0.0.1", 0, LIMITS)
    SERVERS["main"] = httpd
    yield start_in_thread(httpd)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def image_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "a.png"
    make_image(60, 90).save(path)
    return path


class ImageHost(BaseHTTPRequestHandler):
    """A second local server: an image, a text file and an endless download."""

    files: dict = {}
    hits = 0

    def do_GET(self):
        ImageHost.hits += 1
        if self.path == "/trickle":  # one byte at a time: every read is short, the whole is not
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                return
        if self.path == "/endless":  # no Content-Length: the reader must stop by itself
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                return
        body, kind = self.files.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host(image_png):
    ImageHost.files = {"/a.png": (image_png.read_bytes(), "image/png"),
                       "/notes.txt": (b"not an image", "text/plain")}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    yield start_in_thread(httpd)
    httpd.shutdown()
    httpd.server_close()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(url: str, text: str = QUESTION) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def request(base: str, path: str, payload=None, method=None, raw: bytes = None):
    """(status, parsed JSON or raw text) of one HTTP request."""
    data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            status, body = e.code, e.read().decode()
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def complete(base: str, **payload):
    return request(base, "/v1/chat/completions", payload)


def assert_error(status, body, expected_status: int, words: str):
    assert status == expected_status, body
    error = body["error"]
    assert set(error) >= {"message", "type", "code"}
    assert words in error["message"], error["message"]


def test_models_and_health(server):
    assert request(server, "/health") == (200, {"status": "ok"})
    status, body = request(server, "/v1/models")
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "tiny-llava"


def test_completion_matches_generate_greedy(server, loaded, image_png):
    model, processor = loaded
    status, body = complete(server, messages=image_message(data_url(image_png.read_bytes())),
                            max_tokens=6, temperature=0)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-llava" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    expected = generate(model, processor, QUESTION, images=[str(image_png)], max_tokens=6, temperature=0)
    assert choice["message"]["content"] == expected.text
    usage = body["usage"]
    assert usage["prompt_tokens"] == expected.prompt_tokens and usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_streaming_deltas_equal_the_whole_answer(server, image_png):
    messages = image_message(data_url(image_png.read_bytes()))
    _, whole = complete(server, messages=messages, max_completion_tokens=7)
    req = urllib.request.Request(
        server + "/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"messages": messages, "max_completion_tokens": 7, "stream": True,
                         "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [line[len("data: "):] for line in r.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]


def test_client_leaving_a_stream_stops_it(server):
    host, port = server.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 400, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()
    tic = time.monotonic()
    status, _ = complete(server, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    assert status == 200 and time.monotonic() - tic < 10


def test_text_only_and_multi_turn(server):
    status, body = complete(server, max_tokens=3, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "What next?"}]},
    ])
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


def test_http_image_url(server, image_host, image_png):
    by_url = complete(server, messages=image_message(image_host + "/a.png"), max_tokens=4)
    inline = complete(server, messages=image_message(data_url(image_png.read_bytes())), max_tokens=4)
    assert by_url[0] == 200 and by_url[1]["choices"] == inline[1]["choices"]
    assert_error(*complete(server, messages=image_message(image_host + "/missing.png")), 400, "404")
    assert_error(*complete(server, messages=image_message(image_host + "/notes.txt")), 400, "not a readable image")


def test_oversized_images_are_refused(server, image_host):
    status, body = complete(server, messages=image_message(image_host + "/endless"))
    assert_error(status, body, 413, "over the limit of 200000 bytes")
    noise = make_image(300, 400)  # noisy pixels compress badly: > 200 kB as PNG
    assert_error(*complete(server, messages=image_message(data_url(png_bytes(noise)))), 413, "over the limit")
    flat = Image.new("RGB", (2000, 1000), "white")  # small file, 2 MP
    assert_error(*complete(server, messages=image_message(data_url(png_bytes(flat)))), 413,
                 "2000x1000 = 2000000 pixels")


def test_request_body_limit_is_checked_before_reading(server):
    host, port = server.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(5_000_000_000))  # nothing follows the headers
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]["message"]
    conn.close()
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 1_500_000}]}).encode()
    assert_error(*request(server, "/v1/chat/completions", raw=big), 413, "over the limit of 1000000 bytes")


@pytest.mark.parametrize("payload, words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "'messages' is required"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}).encode(),
     "unsupported content part type 'input_audio'"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "role must be one of"),
    (json.dumps({"messages": image_message("file:///etc/passwd")}).encode(), "http://, https:// or data:"),
    (json.dumps({"messages": image_message("ftp://example.com/a.png")}).encode(), "http://, https:// or data:"),
    (json.dumps({"messages": image_message("data:text/plain;base64,aGk=")}).encode(), "data:image/"),
    (json.dumps({"messages": image_message(data_url(b"\x89PNG garbage"))}).encode(), "not a readable image"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
     "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "What " * 600}]}).encode(), "context is 512 tokens"),
])
def test_bad_requests_get_400(server, payload, words):
    assert_error(*request(server, "/v1/chat/completions", raw=payload), 400, words)


def test_unknown_path_and_wrong_method(server):
    assert_error(*request(server, "/v1/completions", {"prompt": "hi"}), 404, "no endpoint /v1/completions")
    assert_error(*request(server, "/v1/chat/completions"), 405, "takes POST, not GET")
    assert_error(*request(server, "/v1/models", {}), 405, "takes GET, not POST")
    assert_error(*request(server, "/health", method="DELETE"), 405, "takes GET, not DELETE")


def test_still_serving_after_bad_requests(server):
    for raw in (b"{", b"[]", json.dumps({"messages": image_message("file:///x")}).encode()):
        request(server, "/v1/chat/completions", raw=raw)
    status, body = complete(server, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    assert status == 200 and body["usage"]["completion_tokens"] <= 2


def test_concurrent_equal_requests_get_equal_answers(server):
    results = []

    def ask():
        results.append(complete(server, messages=[{"role": "user", "content": "Hello"}], max_tokens=3))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [status for status, _ in results] == [200, 200, 200]
    assert len({body["choices"][0]["message"]["content"] for _, body in results}) == 1


def test_serve_command(model_dir):
    """The CLI path: start, answer, stop cleanly on Ctrl-C."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # as in a terminal: a test run started in the background (`cmd &` in a script)
    # ignores SIGINT, and a child that inherits that never sees Ctrl-C
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "mlx_vlm_native.cli", "serve", "--model", str(model_dir),
         "--port", "0", "--max-tokens", "3"], stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, base = time.monotonic() + 120, None
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited during start-up"
            match = re.search(r"serving .* at (http://[\d.]+:\d+)/v1", line)
            base = match and match.group(1)
        assert base, "the server did not say where it listens"
        assert request(base, "/health") == (200, {"status": "ok"})
        status, body = complete(base, messages=[{"role": "user", "content": "Hello"}])
        assert status == 200 and body["usage"]["completion_tokens"] <= 3 and body["model"] == str(model_dir)
        log = ""
        while '"POST /v1/chat/completions HTTP/1.1" 200' not in log:  # one line per request
            line = proc.stderr.readline()
            assert line, log
            log += line
        proc.send_signal(signal.SIGINT)
        try:  # communicate drains stderr while waiting: a full pipe must not look like a hang
            _, rest = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # -X faulthandler: every thread's stack goes to stderr
            _, rest = proc.communicate(timeout=30)
            pytest.fail(f"the server did not stop within 60 s of Ctrl-C:\n{log}{rest}")
        log += rest
        assert proc.returncode == 0 and "stopped" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------- hostile input


def raw_exchange(base: str, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes and read the whole reply (the server closes after it)."""
    import socket

    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def hello(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize("payload, words", [
    (hello(temperature=-0.5), "temperature must be a finite number >= 0 and <= 2"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
     "temperature must be a finite number"),  # parses as inf
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN is not a JSON number"),
    (hello(top_p=5), "top_p must be a finite number >= 0 and <= 1"),
    (hello(max_tokens=-1), "max_tokens must be an integer >= 1"),
    (hello(max_completion_tokens=-1), "max_completion_tokens must be an integer >= 1"),
    (hello(max_tokens=2.5), "max_tokens must be an integer"),
    (hello(seed=-1), "seed must be an integer >= 0"),
    (hello(seed=2**70), "seed must be an integer >= 0 and <= 18446744073709551615"),
    (hello(seed=True), "seed must be an integer"),
    (hello(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (hello(stream="no"), "stream must be true or false, got 'no'"),
    (hello(stream=True, stream_options="x"), "stream_options must be an object"),
    (hello(stream=True, stream_options={"include_usage": "yes"}), "include_usage must be true or false"),
    (hello(stream_options={"include_usage": True}), "only allowed with stream: true"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"messages": "\xff\xfe"}', "not UTF-8"),
    (json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}).encode(), "role must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}).encode(),
     "unsupported content part type"),
])
def test_bad_values_get_400_naming_the_field(server, payload, words):
    assert_error(*request(server, "/v1/chat/completions", raw=payload), 400, words)


def test_a_huge_integer_in_range_is_still_checked(server):
    # 4000 digits parse as JSON (Python's limit is 4300); the range check must not choke on it
    payload = b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 4000 + b"}"
    assert_error(*request(server, "/v1/chat/completions", raw=payload), 400, "seed must be an integer")


@pytest.mark.parametrize("length", ["\xb2", "-1", "1e3", "0x10", " ", "9" * 30])
def test_bad_content_length_gets_400(server, length):
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    reply = raw_exchange(server, head.encode("latin-1") + b"{}")
    assert reply.startswith(b"HTTP/1.0 400"), reply[:200]
    assert b"bad Content-Length" in reply and b"Traceback" not in reply


def test_short_body_and_chunked_body_are_refused(server):
    import socket

    host, port = server.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400") and b"ended after 2 of 100 bytes" in reply, reply
    reply = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 411") and b"chunked" in reply


def test_too_many_images_are_refused_before_any_fetch(server, image_host):
    hits_before = ImageHost.hits
    parts = [{"type": "image_url", "image_url": {"url": image_host + "/a.png"}}] * (LIMITS.max_images + 1)
    status, body = complete(server, messages=[{"role": "user", "content": parts + [{"type": "text", "text": "?"}]}])
    assert_error(status, body, 400, f"at most {LIMITS.max_images} are allowed")
    assert ImageHost.hits == hits_before


def test_request_pixel_budget_is_checked_from_headers(server, monkeypatch):
    from mlx_vlm_native import server as server_module

    decoded = []
    monkeypatch.setattr(server_module.RequestImage, "decode", lambda self, limits: decoded.append(self))
    big = data_url(png_bytes(Image.new("RGB", (900, 1000), "white")))  # 0.9 MP each, small files
    parts = [{"type": "image_url", "image_url": {"url": big}}] * 3  # 2.7 MP > the 2 MP budget
    status, body = complete(server, messages=[{"role": "user", "content": parts}])
    assert_error(status, body, 413, "over 2000000 pixels in all")
    assert decoded == []


def test_prompt_budget_is_checked_before_decoding(server, monkeypatch):
    from mlx_vlm_native import server as server_module

    decoded = []
    original = server_module.RequestImage.decode
    monkeypatch.setattr(server_module.RequestImage, "decode",
                        lambda self, limits: decoded.append(self) or original(self, limits))
    small = data_url(png_bytes(make_image(60, 90)))
    parts = [{"type": "image_url", "image_url": {"url": small}}] * 12  # 12 x 17 tokens + the text > 512
    text = {"type": "text", "text": "What " * 300}
    status, body = complete(server, messages=[{"role": "user", "content": parts + [text]}])
    assert_error(status, body, 400, "context is 512 tokens")
    assert body["error"]["code"] == "context_length_exceeded" and decoded == []


def test_prompt_length_is_counted_off_the_generation_thread(server, monkeypatch):
    """An over-long prompt is counted on its request's thread, with the counting copy of the
    tokenizer; the generation thread never tokenizes it (it keeps decoding the others)."""
    service = SERVERS["main"].service
    threads = []
    for processor in (service.processor, service.counting_processor):
        original = processor.num_prompt_tokens
        monkeypatch.setattr(processor, "num_prompt_tokens", lambda *a, original=original, p=processor:
                            threads.append((p is service.processor, threading.current_thread().name)) or original(*a))
    status, body = complete(server, messages=[{"role": "user", "content": "What " * 600}])
    assert_error(status, body, 400, "context is 512 tokens")
    assert threads and all(not shared and name != "generation" for shared, name in threads), threads


def test_the_estimate_equals_the_processed_prompt(loaded, image_png):
    from mlx_vlm_native.generate import format_chat

    model, processor = loaded
    for n in (1, 3):
        messages = [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": QUESTION}]}]
        image = Image.open(image_png)
        text = format_chat(processor, messages)
        assert processor.num_prompt_tokens(text, [image.size] * n) == len(processor(text, [image] * n).input_ids)


def test_a_trickling_image_host_is_cut_at_the_deadline(server, image_host):
    tic = time.monotonic()
    status, body = complete(server, messages=image_message(image_host + "/trickle"))
    elapsed = time.monotonic() - tic
    assert_error(status, body, 400, f"not downloaded within {LIMITS.image_timeout:g} s")
    assert elapsed < LIMITS.image_timeout + 3, elapsed


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_generation(server, monkeypatch, stream):
    counts = slowed_decoding(monkeypatch)
    host, port = server.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 480, "stream": stream}))
    deadline = time.monotonic() + 30
    while (not counts or counts[-1] < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.close()  # mid-answer
    time.sleep(1.0)
    made = counts[-1]
    time.sleep(1.0)
    assert counts[-1] == made < 480  # nothing more is generated after it left
    status, _ = complete(server, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    assert status == 200


def test_memory_is_released_after_a_request(server, loaded):
    import mlx.core as mx

    image = data_url(png_bytes(make_image(200, 200)))
    assert complete(server, messages=image_message(image), max_tokens=2)[0] == 200
    assert SERVERS["main"].service.idle.wait(30)
    assert mx.get_cache_memory() == 0


def test_many_concurrent_clients_are_all_answered(server):
    results = []

    def ask():
        try:
            results.append(complete(server, messages=[{"role": "user", "content": "Hello"}], max_tokens=1)[0])
        except OSError as e:  # a reset would show here
            results.append(repr(e))

    threads = [threading.Thread(target=ask) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 24


def test_a_full_queue_answers_503(loaded, monkeypatch):
    slowed_decoding(monkeypatch)
    model, processor = loaded
    httpd = make_server(model, processor, "tiny", "127.0.0.1", 0,
                        Limits(**{**LIMITS.__dict__, "max_queued": 1, "max_batch": 1}))
    base = start_in_thread(httpd)
    host, port = base.split("//")[1].split(":")
    try:
        running = http.client.HTTPConnection(host, int(port), timeout=60)
        running.request("POST", "/v1/chat/completions", hello(max_tokens=480, stream=True))
        streamed = running.getresponse()
        assert streamed.readline().startswith(b"data: ")  # the batch (of one) is full
        waiting = http.client.HTTPConnection(host, int(port), timeout=60)
        waiting.request("POST", "/v1/chat/completions", hello(max_tokens=1))
        deadline = time.monotonic() + 10
        while httpd.service.jobs.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = request(base, "/v1/chat/completions", raw=hello(max_tokens=1))
        assert_error(status, body, 503, "requests are waiting")
        streamed.close()  # the stream stops, the waiting request is served
        running.close()
        assert waiting.getresponse().status == 200
        waiting.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_listen_backlog_fits_the_use():
    from mlx_vlm_native.server import ChatServer

    assert ChatServer.request_queue_size >= 64


def test_same_image_twice_reuses_the_prompt_cache(server, image_png):
    """The second request with the same image reads the first one's KV cache:
    only the tokens after the shared prefix are prefilled, and the answer is the same."""
    service = SERVERS["main"].service
    messages = image_message(data_url(image_png.read_bytes()))
    _, first = complete(server, messages=messages, max_tokens=4, temperature=0)
    seen = []
    original = service.conversations.reuse

    def reuse(model, ids):
        seen.append(original(model, ids))
        return seen[-1]

    service.conversations.reuse = reuse
    _, second = complete(server, messages=messages, max_tokens=4, temperature=0)
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert seen and seen[0] == second["usage"]["prompt_tokens"] - 1  # all but the last prompt token
