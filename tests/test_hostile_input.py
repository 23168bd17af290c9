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

from mlx_vlm_native.server import Limits, make_server

LIMITS = Limits(max_request_bytes=25_000_000, default_max_tokens=4, header_timeout=2.0, body_timeout=3.0,
                max_connections=256)


def serve(tiny_56_model, limits=LIMITS):
    model, processor = tiny_56_model
    httpd = make_server(model, processor, "tiny", "127.0.0.1", 0, limits)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[:2]


@pytest.fixture(scope="module")
def server(tiny_56_model):
    httpd, address = serve(tiny_56_model)
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
        reply = b""
        while chunk := last.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 408") and b"not received within" in reply, reply[:300]
    finally:
        for s in sockets:
            s.close()


def test_over_the_cap_the_request_is_read_before_the_503(tiny_56_model, monkeypatch):
    from mlx_vlm_native import server as server_module

    release = threading.Event()
    original = server_module.ChatService.answer

    def held(self, *args, **kwargs):  # every answer waits: its connection is busy, not reading
        release.wait(30)
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(server_module.ChatService, "answer", held)
    httpd, address = serve(tiny_56_model, Limits(**{**LIMITS.__dict__, "max_connections": 2, "overflow_connections": 2}))
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


def test_a_non_utf8_prompt_is_a_clear_cli_error(tiny_56_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mlx_vlm_native.generate", "--model", str(tiny_56_dir),
                             "--prompt", b"what \xff colour?", "--max-tokens", "1"],
                            capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1 and "--prompt is not valid UTF-8 (byte 0xff at character 5)" in err, err
    assert "Traceback" not in err


def test_a_non_utf8_chat_line_is_refused_and_the_chat_goes_on(tiny_56_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mlx_vlm_native.chat", "--model", str(tiny_56_dir), "--max-tokens", "2"],
                            input=b"what \xff colour?\nWhat colour?\n", capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "the line is not valid UTF-8 (byte 0xff at character 5)" in err, err
    assert "Traceback" not in err and result.stdout.strip(), (result.stdout, err)  # the next line is answered


# ------------------------------------------------------ 4. meaningless values


def test_a_temperature_that_overflows_is_greedy(server):
    from mlx_vlm_native.params import check_generation_params

    assert check_generation_params(temperature=1e-300)["temperature"] == 0.0
    assert check_generation_params(temperature=0.5)["temperature"] == 0.5
    answers = [json.loads(call(server, "POST", "/v1/chat/completions", hello(max_tokens=4, temperature=t))[1])
               for t in (1e-300, 0)]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]


def test_video_frames_are_bounded_by_the_context_before_decoding(tiny_56_dir, tmp_path, monkeypatch):
    import importlib

    from PIL import Image

    from mlx_vlm_native.processors.image import load_video_frames

    generate_module = importlib.import_module("mlx_vlm_native.generate")

    frames = [Image.new("RGB", (8, 8), (i * 8, 0, 0)) for i in range(30)]
    gif = tmp_path / "x.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=10)
    picked = load_video_frames(gif, 3)  # only the sampled frames are decoded
    assert [round(f.getpixel((0, 0))[0] / 8) for f in picked] == [0, 14, 29]

    def never(*args, **kwargs):
        raise AssertionError("frames decoded before the context check")

    monkeypatch.setattr(generate_module, "load_video_frames", never)
    with pytest.raises(SystemExit) as e:
        generate_module.main(["--model", str(tiny_56_dir), "--video", str(gif), "--video-frames", "100000"])
    assert "--video-frames 100000" in str(e.value) and "context" in str(e.value)


# ------------------------------------------------------------ 5. adapters


def make_adapter(tiny_56_dir, folder, scale=1.0):
    from mlx_vlm_native import load
    from mlx_vlm_native.adapters import adapt_linears, save_adapters

    model, _ = load(str(tiny_56_dir))
    model.freeze()
    adapt_linears(model, ["q_proj"], 4, scale)
    save_adapters(folder, model, {"method": "lora", "targets": ["q_proj"], "rank": 4, "scale": scale})
    return folder


def test_damaged_adapters_are_clear_errors(tiny_56_dir, tmp_path):
    import mlx.core as mx

    from mlx_vlm_native import load

    good = make_adapter(tiny_56_dir, tmp_path / "good")
    weights_file = good / "adapters.safetensors"
    data = weights_file.read_bytes()

    def damaged(name, content=None, config=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(config or (good / "adapter_config.json").read_text())
        if content is not None:
            (folder / "adapters.safetensors").write_bytes(content)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load(str(tiny_56_dir), adapter_path=str(folder))
        return str(e.value)

    assert "truncated" in damaged("truncated", data[: len(data) // 2])
    assert "is missing" in damaged("missing")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [1_000_000, 1_000_000]
    text = json.dumps(header).encode()
    assert key in damaged("huge", len(text).to_bytes(8, "little") + text + data[8 + n:])
    weights = mx.load(str(weights_file))
    weights[key] = mx.full(weights[key].shape, float("nan"), weights[key].dtype)
    mx.save_safetensors(str(tmp_path / "nan.safetensors"), weights)
    message = damaged("nan", (tmp_path / "nan.safetensors").read_bytes())
    assert "NaN" in message and key in message
    config = json.loads((good / "adapter_config.json").read_text())
    assert "scale is nan" in damaged("nan_scale", data, json.dumps({**config, "scale": float("nan")}))


# ------------------------------------------------------------ 6. config.json


@pytest.mark.parametrize("key, value, words", [
    ("text_config.vocab_size", 10**10, "text_config.vocab_size is 10000000000; it must be an integer >= 1"),
    ("text_config.num_hidden_layers", 10**6, "text_config.num_hidden_layers is 1000000"),
    ("vision_config.image_size", 10**6, "vision_config.image_size is 1000000"),
    ("text_config.num_attention_heads", 0, "text_config.num_attention_heads is 0"),
    ("vision_config.patch_size", 0, "vision_config.patch_size is 0"),
    ("text_config", [1, 2], "text_config must be an object, got list"),
    ("text_config.rms_norm_eps", "x", "text_config.rms_norm_eps is 'x'; it must be a number > 0"),
    ("text_config.num_key_value_heads", 3, "must be a multiple of num_key_value_heads (3)"),
    ("text_config.hidden_size", 60000, "more than this machine's"),
])
def test_config_values_are_checked_before_anything_is_built(tiny_56_dir, tmp_path, key, value, words):
    from mlx_vlm_native.utils import load_model
    from mlx_vlm_native.weights.validation import ConfigError

    for f in tiny_56_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    config = json.loads((tiny_56_dir / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    node, *path = [config] + key.split(".")
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load_model(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and words in str(e.value), str(e.value)


def test_the_memory_estimate():
    from mlx_vlm_native.weights.validation import ConfigError, check_memory, implied_parameters

    assert implied_parameters({"hidden_size": 10, "num_hidden_layers": 2, "intermediate_size": 20,
                               "vocab_size": 100}) == 2 * (400 + 400) + 1000
    check_memory(10**9, 2, "config.json", memory=4 * 2**30)
    with pytest.raises(ConfigError, match="10.0B parameters"):
        check_memory(10**10, 2, "config.json", memory=4 * 2**30)


# ------------------------------------------------------- 7. NaN loss stops


def tiny_training(tmp_path, loss_at):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_vlm_native.training.loop import TrainConfig, train

    model = nn.Linear(2, 1)

    def loss_fn(model, batch, key):
        loss = (model(batch) ** 2).mean()
        return loss * loss_at(batch), mx.array(1.0)

    def batches():
        step = 0
        while True:
            step += 1
            yield mx.full((1, 2), float(step)), step

    config = TrainConfig(steps=6, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1, progress=False)
    return model, lambda: train(model, loss_fn, optim.SGD(1e-3), batches(), config)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    import mlx.core as mx

    from mlx_vlm_native.training.checkpoint import latest_checkpoint
    from mlx_vlm_native.training.loop import NonFiniteLossError

    _, run = tiny_training(tmp_path, lambda batch: float("nan") if batch[0, 0].item() == 4 else 1.0)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 4"):
        run()
    last = latest_checkpoint(tmp_path / "ckpt")
    assert last.name == "step_00000003"
    assert all(mx.all(mx.isfinite(v)).item() for v in mx.load(str(last / "weights.safetensors")).values())


# ------------------------------------------------------ 8. damaged resume


@pytest.mark.parametrize("damage, words", [
    ("truncate weights.safetensors", "truncated"),
    ("truncate optimizer.safetensors", "truncated"),
    ("delete weights.safetensors", "is missing"),
    ("oversize weights.safetensors", "header claims"),
    ("step -5", "step is -5; it must be an integer >= 0 and <= 6"),
    ("step 1000000000", "step is 1000000000"),
])
def test_resuming_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage, words):
    import mlx.optimizers as optim

    from mlx_vlm_native.training.checkpoint import resume_state

    model, run = tiny_training(tmp_path, lambda batch: 1.0)
    run()
    last = tmp_path / "ckpt" / "step_00000006"
    verb, what = damage.split(" ")
    if verb == "truncate":
        data = (last / what).read_bytes()
        (last / what).write_bytes(data[: len(data) - 5])
    elif verb == "delete":
        (last / what).unlink()
    elif verb == "oversize":
        data = (last / what).read_bytes()
        (last / what).write_bytes((10**12).to_bytes(8, "little") + data[8:])
    else:
        state = json.loads((last / "state.json").read_text())
        (last / "state.json").write_text(json.dumps({**state, "step": int(what)}))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        resume_state("auto", tmp_path / "ckpt", model, optim.SGD(1e-3), steps=6)
    assert words in str(e.value), str(e.value)


def test_the_size_of_a_png_is_read_without_decoding_it():
    import io

    from PIL import Image

    from mlx_vlm_native.processors.image import load_image, open_image, oriented_size

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buffer, format="PNG")
    header = open_image(buffer.getvalue())
    assert oriented_size(header) == (3000, 2000) and header._im is None  # Pillow's getexif would decode it
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the sides swap, from the header as after decoding
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buffer, format="PNG", exif=exif)
    assert oriented_size(open_image(buffer.getvalue())) == load_image(buffer.getvalue()).size == (20, 40)
