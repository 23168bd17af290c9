"""`mlx-vlm-native serve`: an OpenAI-compatible chat completions server.

    mlx-vlm-native serve --model <folder or Hub id> --port 8080
    curl localhost:8080/v1/chat/completions -H "Content-Type: application/json" -d '{"messages":
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'

Standard library only. A ThreadingHTTPServer's handlers share one model, run
by a single generation thread, so generation is serialized. Images come as data
URLs or http(s) URLs (fetched with a timeout and a size cap). Every bad request
gets an error in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
and the server goes on.
"""

import argparse
import base64
import binascii
import contextlib
import http.client
import io
import itertools
import json
import queue
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 20_000_000
    max_image_bytes: int = 10_000_000  # decoded data URL or downloaded file
    max_image_pixels: int = 40_000_000
    image_timeout: float = 10.0  # seconds for a whole image download
    default_max_tokens: int = 512


class APIError(Exception):
    """A request that gets an error reply; the message says what to change."""

    TYPES = {404: "not_found_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        error_type = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------- request parsing


def parse_json_body(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json")
    if not isinstance(request, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    return request


def number_option(request: dict, name: str, kind, default, low, high=None):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
        what = "an integer" if kind is int else "a number"
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise APIError(400, f"{name} must be {what} {bounds}, got {value!r}", "invalid_value", name)
    return value


def sampling_options(request: dict, default_max_tokens: int) -> dict:
    """OpenAI's sampling fields -> keyword arguments of `stream_chat`."""
    name = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
    if request.get("n") not in (None, 1):
        raise APIError(400, "only n = 1 is supported", "invalid_value", "n")
    return dict(
        max_tokens=number_option(request, name, int, default_max_tokens, 1),
        temperature=float(number_option(request, "temperature", (int, float), 0.0, 0, 2)),
        top_p=float(number_option(request, "top_p", (int, float), 1.0, 0, 1)),
        seed=number_option(request, "seed", int, None, 0),
    )


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def content_parts(content, where: str) -> Tuple[list, List[str]]:
    """One message's content -> template parts ({"type": "text"|"image"}) and its image URLs."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts", "invalid_value", where)
    parts, urls = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise APIError(400, f"{where}.content[{i}].image_url.url must be a string", "invalid_value")
            parts.append({"type": "image"})
            urls.append(url)
        else:
            raise APIError(
                400, f"unsupported content part type {kind!r} in {where}.content[{i}]: "
                "use 'text' (with a string 'text') or 'image_url'", "unsupported_content_type",
            )
    return parts, urls


def chat_messages(request: dict) -> Tuple[list, List[str]]:
    """OpenAI messages -> the chat template's messages and the image URLs in order."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content}", "invalid_value", "messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}, got {role!r}", "invalid_value")
        parts, message_urls = content_parts(message.get("content"), where)
        if all(p["type"] == "text" for p in parts):
            parts = "".join(p["text"] for p in parts)
        out.append({"role": ROLES[role], "content": parts})
        urls += message_urls
    return out, urls


# -------------------------------------------------------------------------- images


def short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


def too_big(what: str, size: int, limit: int) -> APIError:
    return APIError(413, f"{what} is {size} bytes, over the limit of {limit} bytes", "image_too_large")


def read_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    media_type = header[len("data:"):].split(";")[0]
    if not comma or not media_type.startswith("image/") or ";base64" not in header:
        raise APIError(400, f"data URLs must be data:image/...;base64,<data>; got {short(url)!r}", "invalid_image")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise too_big("the data URL image", len(payload) * 3 // 4, max_bytes)
    try:
        data = base64.b64decode(payload)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"the data URL image is not valid base64: {e}", "invalid_image")
    if len(data) > max_bytes:
        raise too_big("the data URL image", len(data), max_bytes)
    return data


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise APIError(400, f"image URL redirected to a non-http(s) URL: {short(newurl)}", "invalid_image_url")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(HttpOnlyRedirects)


def download(url: str, max_bytes: int, timeout: float) -> bytes:
    """The body of `url`; stops reading once over `max_bytes` or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mlx-vlm-native"})
        with OPENER.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_big(f"the image at {short(url)}", int(declared), max_bytes)
            while chunk := response.read(min(65536, max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"the image at {short(url)} is over the limit of {max_bytes} bytes",
                                   "image_too_large")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not downloaded within {timeout:g} s")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise APIError(400, f"cannot fetch the image at {short(url)}: {e}", "invalid_image_url")
    return b"".join(chunks)


def open_image(data: bytes, name: str, limits: Limits) -> Image.Image:
    """Decoded RGB image; its size is checked from the header before decoding."""
    from .processors.image import ImageError, load_image

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise APIError(413, f"{name}: {e}", "image_too_large")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{name} is not a readable image: {e}", "invalid_image")
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise APIError(413, f"{name} is {w}x{h} = {w * h} pixels, over the limit of "
                       f"{limits.max_image_pixels} pixels", "image_too_large")
    try:
        return load_image(image, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise APIError(400, f"{name}: {e}", "invalid_image")


def load_request_image(url: str, limits: Limits) -> Image.Image:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return open_image(read_data_url(url, limits.max_image_bytes), "the data URL image", limits)
    if scheme in ("http", "https"):
        data = download(url, limits.max_image_bytes, limits.image_timeout)
        return open_image(data, f"the image at {short(url)}", limits)
    raise APIError(400, f"image URLs must be http://, https:// or data: URLs; got {short(url)!r}",
                   "invalid_image_url")


# ------------------------------------------------------------------------- replies


def completion(request_id: str, created: int, model_id: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def completion_chunk(request_id: str, created: int, model_id: str, delta: dict,
                     finish_reason: Optional[str] = None) -> dict:
    return {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_of(response) -> dict:
    return {"prompt_tokens": response.prompt_tokens, "completion_tokens": response.generation_tokens,
            "total_tokens": response.prompt_tokens + response.generation_tokens}


# -------------------------------------------------------------------------- server


class Job:
    """One answer to compute: the generation thread puts its responses, then
    an exception or `Job.END`, on `responses`."""

    END = object()

    def __init__(self, messages: list, images: list, options: dict):
        self.messages, self.images, self.options = messages, images, options
        self.responses: queue.Queue = queue.Queue()
        self.cancelled = False


class ChatService:
    """The model and the one thread that runs it, so generation is serialized.

    One long-lived thread rather than a lock: MLX keeps streams per thread, and
    each short-lived request thread that ran the model would leave its MLX
    worker threads behind."""

    def __init__(self, model, processor, model_id: str, limits: Limits = Limits()):
        self.model, self.processor, self.model_id, self.limits = model, processor, model_id, limits
        self.created = int(time.time())
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = False
        self.idle = threading.Event()
        threading.Thread(target=self.work, name="generation", daemon=True).start()

    def work(self) -> None:
        from .generate import stream_chat

        while True:
            self.idle.set()
            job = self.jobs.get()
            self.idle.clear()
            if self.stopping:
                job.responses.put(APIError(503, "the server is stopping", "server_stopping"))
                continue
            try:
                for response in stream_chat(self.model, self.processor, job.messages, job.images, **job.options):
                    if self.stopping:
                        raise APIError(503, "the server stopped during the answer", "server_stopping")
                    job.responses.put(response)
                    if job.cancelled:
                        break
                job.responses.put(Job.END)
            except Exception as e:  # handed to the request's thread
                job.responses.put(e)

    def answer(self, messages: list, images: list, options: dict) -> Iterator:
        """The answer's responses as the generation thread makes them; bad input
        raises APIError at the first `next()`. Closing the iterator stops the generation."""
        from jinja2 import TemplateError

        from .generate import PromptTooLongError

        job = Job(messages, images, options)
        self.jobs.put(job)
        try:
            while (item := job.responses.get()) is not Job.END:
                if isinstance(item, PromptTooLongError):
                    raise APIError(400, str(item), "context_length_exceeded", "messages")
                if isinstance(item, (ValueError, TemplateError)):  # e.g. placeholder/image count, roles
                    raise APIError(400, str(item), "invalid_value", "messages")
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled = True

    def close(self, timeout: float = 10.0) -> None:
        """Stop the answer in progress and refuse new ones. The generation thread
        itself stays, idle, until the process exits: a thread that ran MLX
        compiled code cleans up on exit through the interpreter, which aborts the
        process if that happens while the interpreter shuts down."""
        self.stopping = True
        self.idle.wait(timeout)


class ChatServer(ThreadingHTTPServer):
    def __init__(self, address, service: ChatService):
        self.service = service
        super().__init__(address, Handler)

    def server_close(self) -> None:
        super().server_close()
        self.service.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "mlx-vlm-native"
    timeout = 60  # seconds a client may stall while sending
    ROUTES = {"/v1/models": ("GET", "models"), "/health": ("GET", "health"),
              "/v1/chat/completions": ("POST", "chat_completions")}

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def dispatch(self, method: str) -> None:
        self.tic, self.logged = time.perf_counter(), False
        self.status, self.note, self.replied, self.unread_body = None, "", False, False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path not in self.ROUTES:
                raise APIError(404, f"no endpoint {path}; try {', '.join(self.ROUTES)}", "not_found")
            allowed, action = self.ROUTES[path]
            if method != allowed:
                raise APIError(405, f"{path} takes {allowed}, not {method}", "method_not_allowed")
            getattr(self, action)()
        except APIError as e:
            self.fail(e)
        except Exception as e:  # a bug must not take the server down
            traceback.print_exc()
            self.fail(APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))
        finally:
            self.log_done()
            if self.unread_body:
                self.discard_unread_body()

    def log_done(self) -> None:
        """The request's one log line, written before the last bytes of the reply
        so that it is there once the client has its answer."""
        if not self.logged:
            self.logged = True
            elapsed = time.perf_counter() - self.tic
            self.log_message('"%s" %s %.2fs%s', self.requestline, self.status, elapsed, self.note)

    def log_request(self, code="-", size="-"):
        pass  # written by `log_done`

    def fail(self, error: APIError) -> None:
        self.note = f" {error.message}"
        allow = {"Allow": self.ROUTES[urlsplit(self.path).path.rstrip("/")][0]} if error.status == 405 else {}
        try:
            if not self.replied:
                self.send_json(error.status, error.body(), allow)
            else:  # mid-stream: the status line is gone, tell the client in the stream
                self.send_event(error.body())
        except OSError:
            self.note += " (client gone)"

    def send_json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.status, self.replied = status, True
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.log_done()
        self.wfile.write(body)

    def send_event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def read_body(self) -> bytes:
        """The request body, refused from its Content-Length before any of it is read."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required", "length_required")
        if not length.isdigit():
            raise APIError(400, f"bad Content-Length {length!r}", "invalid_request")
        limit = self.server.service.limits.max_request_bytes
        if int(length) > limit:
            self.unread_body = self.close_connection = True
            raise APIError(413, f"the request body is {length} bytes, over the limit of {limit} bytes",
                           "request_too_large")
        return self.rfile.read(int(length))

    def discard_unread_body(self, seconds: float = 2.0) -> None:
        """Close after a refused body without resetting the connection, so that the
        client still reads the error: stop sending, then drain for a while."""
        deadline = time.monotonic() + seconds
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            while time.monotonic() < deadline and self.rfile.read1(65536):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------------ endpoints

    def health(self) -> None:
        self.send_json(200, {"status": "ok"})

    def models(self) -> None:
        s = self.server.service
        self.send_json(200, {"object": "list", "data": [
            {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "mlx-vlm-native"}]})

    def chat_completions(self) -> None:
        s = self.server.service
        request = parse_json_body(self.read_body())
        messages, urls = chat_messages(request)
        options = sampling_options(request, s.limits.default_max_tokens)
        images = [load_request_image(url, s.limits) for url in urls]
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = s.answer(messages, images, options)
        with contextlib.closing(stream):  # a reply cut short stops the generation
            first = next(stream)  # bad input raises here, before any reply is sent
            if request.get("stream"):
                include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                self.stream_reply(itertools.chain([first], stream), request_id, created, include_usage)
                return
            text, last = first.text, first
            for last in stream:
                text += last.text
        self.note = f" {last.prompt_tokens}+{last.generation_tokens} tokens"
        self.send_json(200, completion(request_id, created, s.model_id, text, last.finish_reason, usage_of(last)))

    def stream_reply(self, stream, request_id: str, created: int, include_usage: bool) -> None:
        model_id = self.server.service.model_id
        self.send_response(200)
        self.status, self.replied, self.close_connection = 200, True, True
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self.send_event(completion_chunk(request_id, created, model_id, {"role": "assistant", "content": ""}))
            last = None
            for last in stream:
                if last.text:
                    self.send_event(completion_chunk(request_id, created, model_id, {"content": last.text}))
            self.send_event(completion_chunk(request_id, created, model_id, {}, last.finish_reason))
            if include_usage:
                self.send_event({**completion_chunk(request_id, created, model_id, {}), "choices": [],
                                 "usage": usage_of(last)})
            self.note = f" {last.prompt_tokens}+{last.generation_tokens} tokens, streamed"
            self.log_done()
            self.send_event("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            self.note = " client went away; generation stopped"


def make_server(model, processor, model_id: str, host: str = "127.0.0.1", port: int = 8080,
                limits: Limits = Limits()) -> ChatServer:
    """A server ready for `serve_forever()`; port 0 picks a free port (`server.server_address`)."""
    return ChatServer((host, port), ChatService(model, processor, model_id, limits))


def setup_arg_parser() -> argparse.ArgumentParser:
    from .generate import add_model_argument

    d = Limits()
    p = argparse.ArgumentParser(description="OpenAI-compatible chat completions server (/v1/chat/completions).")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port)")
    p.add_argument("--max-tokens", type=int, default=d.default_max_tokens,
                   help="answer length when a request sets no max_tokens")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes,
                   help="largest image, as decoded from a data URL or downloaded")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--image-timeout", type=float, default=d.image_timeout,
                   help="seconds allowed to download an image URL")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    from .generate import DEFAULT_MODEL_NAME
    from .utils import load

    args = setup_arg_parser().parse_args(argv)
    limits = Limits(args.max_request_bytes, args.max_image_bytes, args.max_image_pixels,
                    args.image_timeout, args.max_tokens)
    model_id = args.model or DEFAULT_MODEL_NAME
    try:
        print(f"loading {model_id} ...", file=sys.stderr, flush=True)
        model, processor = load(args.model)
        server = make_server(model, processor, model_id, args.host, args.port, limits)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    host, port = server.server_address[:2]
    print(f"serving {model_id} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
