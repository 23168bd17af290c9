"""Hostile input, round two (issue 34): slow sockets cannot lock the server
out, request size and structure are bounded before they cost anything,
invalid Unicode and meaningless values get clear errors, and config files are
checked before anything is allocated. Server cases run over real sockets."""

import http.client
import json
import socket
import threading
import time

import pytest

from convert.random_checkpoint import write_checkpoint
from mlx_vlm_native.server import Limits, make_server

LIMITS = Limits(max_request_bytes=25_000_000, default_max_tokens=4, header_timeout=2.0, body_timeout=3.0,
                max_connections=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("hostile_model"), "tiny-56")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from mlx_vlm_native import load

    return load(str(model_dir))


def serve(loaded, limits=LIMITS):
    model, processor = loaded
    httpd = make_server(model, processor, "tiny", "127.0.0.1", 0, limits)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[:2]


@pytest.fixture(scope="module")
def server(loaded):
    httpd, address = serve(loaded)
    yield address
    httpd.shutdown()
    httpd.server_close()


def call(address, method, path, body=None, timeout=10):
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def hello(text="hi", **fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], **fields}).encode()


def open_sockets(address, n, data: bytes):
    sockets = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=10)
        s.sendall(data)
        sockets.append(s)
    return sockets


# ------------------------------------------------------------ 1. lockout


def test_health_answers_while_300_slow_header_sockets_are_open(server):
    sockets = open_sockets(server, 300, b"POST /v1/chat/compl")
    try:
        tic = time.monotonic()
        status, body = call(server, "GET", "/health", timeout=5)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = call(server, "POST", "/v1/chat/completions", hello(max_tokens=2), timeout=30)
        assert status == 200, body
        assert time.monotonic() - tic < 10
        for s in sockets[-5:]:  # one more byte does not buy more time: the deadline is from the first byte
            s.sendall(b"e")
    finally:
        for s in sockets:
            s.close()


def test_a_slow_header_is_cut_at_the_deadline(server):
    with socket.create_connection(server, timeout=10) as s:
        tic = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        try:
            for _ in range(20):
                s.sendall(b"X-A: b\r\n")
                time.sleep(0.25)
        except OSError:
            pass
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        assert time.monotonic() - tic < LIMITS.header_timeout + 3


def test_six_bytes_of_a_1000_byte_body_do_not_lock_anyone_out(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"mess")
    sockets = open_sockets(server, 300, head)
    try:
        status, _ = call(server, "GET", "/health", timeout=5)
        assert status == 200
        status, body = call(server, "POST", "/v1/chat/completions", hello(max_tokens=2), timeout=30)
        assert status == 200, body
        # a stalled body that was not closed to make room gets a 408 at the deadline
        last = sockets[-1]
        last.settimeout(LIMITS.body_timeout + 5)
        reply = last.recv(65536)
        assert reply.startswith(b"HTTP/1.0 408") and b"not received within" in reply, reply[:300]
    finally:
        for s in sockets:
            s.close()


def test_over_the_cap_the_request_is_read_before_the_503(loaded, monkeypatch):
    from mlx_vlm_native import server as server_module

    release = threading.Event()
    original = server_module.ChatService.answer

    def held(self, *args, **kwargs):  # every answer waits: its connection is busy, not reading
        release.wait(30)
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(server_module.ChatService, "answer", held)
    httpd, address = serve(loaded, Limits(**{**LIMITS.__dict__, "max_connections": 2, "overflow_connections": 2}))
    busy = []
    try:
        for _ in range(2):
            c = http.client.HTTPConnection(*address, timeout=30)
            c.request("POST", "/v1/chat/completions", hello(max_tokens=1))
            busy.append(c)
        time.sleep(0.5)
        body = hello("x" * 200_000)  # the whole body is read, so the client sees the 503, not a broken pipe
        status, reply = call(address, "POST", "/v1/chat/completions", body)
        assert status == 503 and b"too many open connections" in reply
        assert call(address, "GET", "/health")[0] == 200  # served even over the cap
    finally:
        release.set()
        for c in busy:
            assert c.getresponse().status == 200
            c.close()
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------- 2. size and structure


def test_a_19_mb_message_is_refused_before_tokenizing(server):
    tic = time.monotonic()
    status, body = call(server, "POST", "/v1/chat/completions", hello("a " * 9_500_000), timeout=30)
    assert status == 400 and b"over the model's context" in body, body[:300]
    assert time.monotonic() - tic < 5


def test_millions_of_empty_objects_are_refused_before_parsing(server):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "junk": [' + b"{}," * 6_000_000 + b"{}]}"
    status, reply = call(server, "POST", "/v1/chat/completions", body, timeout=30)
    assert status == 400 and b"JSON values" in reply, reply[:300]


def test_brackets_inside_strings_do_not_count():
    from mlx_vlm_native.http_limits import json_values

    assert json_values(json.dumps({"a": "[{," * 1000}).encode(), 100) == 2  # the object and its one member
    assert json_values(b"[" + b"{}," * 200 + b"{}]", 100) > 100


def test_the_pixel_budget_is_shared_by_all_requests():
    from mlx_vlm_native.http_limits import PixelBudget

    budget = PixelBudget(100, wait=0.2)
    assert budget.take(60)
    assert not budget.take(60)  # waits 0.2 s, then gives up (the server answers 503)
    threading.Timer(0.1, budget.give, (60,)).start()
    budget.wait = 5
    assert budget.take(60)  # queued until the first request ended


# ------------------------------------------------------------- 3. Unicode


def test_a_lone_surrogate_is_a_400(server):
    body = b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}'
    status, reply = call(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and b"lone surrogate" in reply, reply
