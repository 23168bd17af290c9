"""`mlx-vlm-native serve`: an OpenAI-compatible chat completions server.

    mlx-vlm-native serve --model <folder or Hub id> --port 8080
    curl localhost:8080/v1/chat/completions -H "Content-Type: application/json" -d '{"messages":
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'

Standard library only. A ThreadingHTTPServer's handlers share one model, run
by a single generation thread that takes requests from a bounded queue and
decodes the concurrent ones together as one batch (mlx-lm's BatchGenerator:
continuous batching). Images come as data URLs or http(s) URLs (fetched under a byte cap and a
wall-clock deadline); their sizes are checked from the headers against the
per-image and per-request budgets, and against the context, before the
generation thread decodes them. A client that disconnects has its answer
stopped. Every bad request gets an error in OpenAI's shape, {"error":
{"message", "type", "param", "code"}}, and the server goes on.
"""

import argparse
import contextlib
import ctypes
import hashlib
import itertools
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .conversations import ROLES, UnsupportedPart, openai_content
from .generate import (
    DEFAULT_MODEL_NAME, GenerationResponse, PromptCache, PromptTooLongError, add_model_argument, add_runtime_arguments,
    cached_embeddings, check_chat_length, context_length, prefill, prepare_chat_inputs, stream_chat,
)
from .params import GenerationParameterError, check_cache_params, check_generation_params
from .processors.image import (
    ImageError, ImageTooLargeError, check_pixels, fetch_url, load_image, open_image, oriented_size, read_data_url, short,
)
from .utils import load


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 20_000_000
    max_image_bytes: int = 10_000_000  # decoded data URL or downloaded file
    max_image_pixels: int = 40_000_000
    image_timeout: float = 10.0  # seconds for a whole image download (a wall-clock deadline)
    default_max_tokens: int = 512
    max_images: int = 16  # per request
    max_request_pixels: int = 64_000_000  # all of a request's images together
    max_queued: int = 64  # requests waiting for a place in the batch; more get 503
    max_batch: int = 16  # answers decoded together
    max_connections: int = 256  # open connections; more get 503
    body_timeout: float = 60.0  # seconds to receive a request body


class APIError(Exception):
    """A request that gets an error reply; the message says what to change."""

    TYPES = {404: "not_found_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection while its answer was being made."""


# ----------------------------------------------------------------- request parsing


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(body: bytes) -> dict:
    try:
        request = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8: {e}", "invalid_json")
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json")
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of thousands of digits
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json")
    if not isinstance(request, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    return request


def flag(request: dict, name: str, default: bool = False) -> bool:
    value = request.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {short(repr(value))}", "invalid_value", name)
    return value


def stream_settings(request: dict) -> Tuple[bool, bool]:
    """(stream, include_usage) from `stream` and `stream_options`."""
    stream = flag(request, "stream")
    options = request.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, f"stream_options must be an object, got {short(repr(options))}", "invalid_value",
                       "stream_options")
    if not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "invalid_value", "stream_options")
    return stream, flag(options, "include_usage")


def sampling_options(request: dict, default_max_tokens: int) -> dict:
    """OpenAI's sampling fields -> the checked keyword arguments of `stream_chat`."""
    name = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
    if request.get("n") not in (None, 1):
        raise APIError(400, "only n = 1 is supported", "invalid_value", "n")

    def get(key, default):
        value = request.get(key)
        return default if value is None else value

    try:
        options = check_generation_params(
            max_tokens=get(name, default_max_tokens), temperature=get("temperature", 0.0),
            top_p=get("top_p", 1.0), seed=request.get("seed"),
            repetition_penalty=request.get("repetition_penalty"),
            repetition_context_size=get("repetition_context_size", 20),
        )
    except GenerationParameterError as e:
        param = name if e.param == "max_tokens" else e.param
        raise APIError(400, str(e).replace("max_tokens", param, 1), "invalid_value", param)
    return options


def content_parts(content, where: str) -> Tuple[list, List[str]]:
    """One message's content -> template parts ({"type": "text"|"image"}) and its image URLs
    (the shared parser, `conversations.openai_content`)."""
    urls, videos = [], []
    try:
        parts = openai_content(content, urls, videos, where)
    except UnsupportedPart as e:
        raise APIError(400, f"{e}: use 'text' (with a string 'text') or 'image_url'",
                       "unsupported_content_type") from None
    except ValueError as e:
        raise APIError(400, str(e), "invalid_value", where) from None
    if videos:
        raise APIError(400, f"video parts are not served ({where}): use 'text' or 'image_url'",
                       "unsupported_content_type")
    return ([{"type": "text", "text": parts}] if isinstance(parts, str) else parts), urls


def chat_messages(request: dict) -> Tuple[list, List[str]]:
    """OpenAI messages -> the chat template's messages and the image URLs in order."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' is required: a non-empty list of {role, content}", "invalid_value", "messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}, got {short(repr(role))}",
                           "invalid_value")
        parts, message_urls = content_parts(message.get("content"), where)
        if all(p["type"] == "text" for p in parts):
            parts = "".join(p["text"] for p in parts)
        out.append({"role": ROLES[role], "content": parts})
        urls += message_urls
    return out, urls


# -------------------------------------------------------------------------- images


def image_error(e: Exception) -> APIError:
    if isinstance(e, ImageTooLargeError):
        return APIError(413, str(e), "image_too_large")
    return APIError(400, str(e), "invalid_image")


@dataclass
class RequestImage:
    """An image of a request as fetched: its encoded bytes and header size; it
    is decoded only when its request's turn comes."""

    data: bytes
    name: str
    size: Tuple[int, int]  # (width, height) as displayed

    def decode(self, limits: "Limits"):
        try:
            return load_image(self.data, max_pixels=limits.max_image_pixels)
        except ImageError as e:
            raise image_error(e)


def fetch_request_image(url: str, limits: Limits) -> RequestImage:
    """An image URL's bytes (bounded in bytes and time) and its size from the header."""
    scheme = urlsplit(url).scheme.lower()
    try:
        if scheme == "data":
            name, data = "the data URL image", read_data_url(url, limits.max_image_bytes)
        elif scheme in ("http", "https"):
            name, data = f"the image at {short(url)}", fetch_url(url, limits.max_image_bytes, limits.image_timeout)
        else:
            raise APIError(400, f"image URLs must be http://, https:// or data: URLs; got {short(url)!r}",
                           "invalid_image_url")
        header = open_image(data, name)
        check_pixels(header, name, limits.max_image_pixels)
        return RequestImage(data, name, oriented_size(header))
    except ImageError as e:
        raise image_error(e)


def request_images(urls: List[str], limits: Limits) -> List[RequestImage]:
    """The request's images, with its budgets checked from the headers: at most
    `max_images`, and `max_request_pixels` in all."""
    if len(urls) > limits.max_images:
        raise APIError(400, f"the request has {len(urls)} images; at most {limits.max_images} are allowed",
                       "too_many_images", "messages")
    images, pixels = [], 0
    for url in urls:
        image = fetch_request_image(url, limits)
        pixels += image.size[0] * image.size[1]
        if pixels > limits.max_request_pixels:
            raise APIError(413, f"the request's images are over {limits.max_request_pixels} pixels in all "
                           f"(at {image.name}, {len(images) + 1} of {len(urls)})", "image_too_large", "messages")
        images.append(image)
    return images


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

    def __init__(self, messages: list, images: List[RequestImage], options: dict):
        self.messages, self.images, self.options = messages, images, options
        self.responses: queue.Queue = queue.Queue()
        self.cancelled = False


def release_memory() -> None:
    """Give back what one answer allocated: MLX's buffer cache and the C heap's free pages."""
    mx.clear_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class Decoding:
    """One answer in the decode batch: its job, detokenizer, prompt cache and timings."""

    def __init__(self, job: Job, tokenizer, ids: List[int], cached: int, prompt_cache, images_key, tic: float):
        self.job, self.ids, self.cached = job, ids, cached
        self.prompt_cache, self.images_key = prompt_cache, images_key
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.eos = set(tokenizer.eos_token_ids)
        self.tokens: List[int] = []
        self.tic, self.prompt_tps, self.gen_tic = tic, 0.0, None

    def response(self, text: str, token: Optional[int], finish_reason: Optional[str] = None):
        elapsed = time.perf_counter() - self.gen_tic
        return GenerationResponse(text, token, len(self.ids), self.prompt_tps, len(self.tokens),
                                  len(self.tokens) / max(elapsed, 1e-9), mx.get_peak_memory() / 1e9,
                                  finish_reason, self.cached)

    def add(self, token: int) -> None:
        """Stream `token` to the client (an end-of-sequence token only counts)."""
        if not self.tokens:
            self.gen_tic = time.perf_counter()
            self.prompt_tps = (len(self.ids) - self.cached) / (self.gen_tic - self.tic)
        self.tokens.append(token)
        if token not in self.eos:
            self.detok.add_token(token)
            self.job.responses.put(self.response(self.detok.last_segment, token))

    def finish(self, reason: str) -> None:
        self.detok.finalize()
        self.job.responses.put(self.response(self.detok.last_segment, None, reason))
        self.job.responses.put(Job.END)


class ChatService:
    """The model, a bounded queue of jobs and the one thread that answers
    them. Concurrent answers are decoded together as one batch on mlx-lm's
    `BatchGenerator` (continuous batching): a job is prefilled alone into its
    own KV cache, joins the batch at the next step, and leaves it when it
    finishes or its client goes; at most `max_batch` decode at once, the rest
    wait in the queue. A seeded sampled request, and every request under
    KV-cache options (quantized or rotating caches do not merge into a batch),
    is answered alone once the batch has drained.

    One long-lived thread rather than a lock: MLX keeps streams per thread, and
    each short-lived request thread that ran the model would leave its MLX
    worker threads behind. Images are decoded by this thread when their job's
    turn comes, so a waiting request holds only its encoded bytes."""

    def __init__(self, model, processor, model_id: str, limits: Limits = Limits(),
                 system_prompt: Optional[str] = None, cache_options: Optional[dict] = None):
        self.model, self.processor, self.model_id, self.limits = model, processor, model_id, limits
        self.system_prompt = system_prompt  # for requests that bring no system message
        self.cache_options = cache_options or {}  # KV-cache options (check_cache_params) for every answer
        # the last finished answer's KV cache and image features, reused by a request with the same
        # images: its images are not encoded again and the prefix it shares is not prefilled again
        self.prompt_cache, self.prompt_cache_images = None, None
        self.created = int(time.time())
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.max_queued)
        self.decoding = {}  # BatchGenerator uid -> Decoding
        self.stopping = False
        self.idle = threading.Event()
        threading.Thread(target=self.work, name="generation", daemon=True).start()

    def work(self) -> None:
        self.batch = self.new_batch()
        held = None  # a job taken from the queue that must wait for the batch to drain
        while True:
            if not self.decoding and held is None:
                release_memory()
                self.idle.set()
                held = self.jobs.get()
                self.idle.clear()
            while held is not None or (len(self.decoding) < self.limits.max_batch and not self.jobs.empty()):
                job = held if held is not None else self.jobs.get_nowait()
                held = None
                if self.alone(job) and self.decoding:
                    held = job
                    break
                self.start(job)
            if self.decoding:
                self.step()

    def new_batch(self):
        eos = self.processor.tokenizer.eos_token_ids
        # the batch runs on this thread's stream, as the prefills do
        return BatchGenerator(self.model, stop_tokens=[[t] for t in eos], prefill_batch_size=1,
                              completion_batch_size=self.limits.max_batch,
                              stream=mx.default_stream(mx.default_device()))

    def alone(self, job: Job) -> bool:
        """Whether `job` cannot share the batch: KV-cache options, or a seed for sampling."""
        options = job.options
        return (any(self.cache_options.get(k) is not None for k in ("kv_bits", "max_kv_size"))
                or (options.get("seed") is not None and options.get("temperature", 0.0) > 0))

    def start(self, job: Job) -> None:
        """Answer `job` alone, or prefill it and put it in the batch; errors go to its client."""
        if job.cancelled:  # its client left while it waited
            return
        if self.stopping:
            job.responses.put(APIError(503, "the server is stopping", "server_stopping"))
            return
        try:
            if self.alone(job):
                self.run(job)
                job.responses.put(Job.END)
            else:
                self.join_batch(job)
        except Exception as e:  # handed to the request's thread
            job.responses.put(e)
        finally:
            job.images = []

    def messages_of(self, job: Job) -> list:
        messages = job.messages
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        check_chat_length(self.model, self.processor, messages, [i.size for i in job.images])
        return messages

    def take_prompt_cache(self, key: list):
        """The kept PromptCache if it is for these images, else a new one. Its
        KV cache goes to this answer (a concurrent one with the same images
        gets the image features only)."""
        if self.prompt_cache is None or key != self.prompt_cache_images:
            self.prompt_cache, self.prompt_cache_images = PromptCache(), key
        cache = self.prompt_cache
        self.prompt_cache = PromptCache(vision_features=cache.vision_features)
        return cache

    def join_batch(self, job: Job) -> None:
        tic = time.perf_counter()
        messages = self.messages_of(job)
        images = [image.decode(self.limits) for image in job.images]
        inputs = prepare_chat_inputs(self.model, self.processor, messages, images)
        key = [hashlib.sha256(image.data).digest() for image in job.images]
        cache = self.take_prompt_cache(key)
        embeddings, positions = cached_embeddings(self.model, inputs, cache)
        if self.prompt_cache_images == key:  # for a concurrent request with the same images
            self.prompt_cache.vision_features = cache.vision_features
        ids = [int(i) for i in inputs.input_ids]
        keep = cache.reuse(self.model, ids)
        o = job.options
        sampler = make_sampler(temp=o["temperature"], top_p=o["top_p"])
        processors = make_logits_processors(None, o["repetition_penalty"], o["repetition_context_size"])
        first = prefill(self.model, ids[keep:], embeddings[0, keep:], positions, cache.kv, sampler, processors)
        answer = Decoding(job, self.processor.tokenizer, ids, keep, cache, key, tic)
        answer.add(first)
        limit = min(o["max_tokens"], context_length(self.model) - len(ids))
        if first in answer.eos or limit <= 1:
            self.leave(answer, "stop" if first in answer.eos else "length", cache.kv)
            return
        (uid,) = self.batch.insert([[first]], max_tokens=[limit - 1], caches=[cache.kv],
                                   all_tokens=[ids[keep:]], samplers=[sampler],
                                   logits_processors=[processors])
        self.decoding[uid] = answer

    def step(self) -> None:
        """One decode step of the whole batch; answers whose clients left are dropped first."""
        gone = [uid for uid, a in self.decoding.items() if a.job.cancelled or self.stopping]
        if gone:
            self.batch.remove(gone)
            for uid in gone:
                answer = self.decoding.pop(uid)
                if self.stopping:
                    answer.job.responses.put(APIError(503, "the server stopped during the answer",
                                                      "server_stopping"))
        if not self.decoding:
            return
        try:
            responses = self.batch.next_generated()
        except Exception as e:  # every answer in the batch fails with it
            self.batch = self.new_batch()
            for answer in self.decoding.values():
                answer.job.responses.put(e)
            self.decoding.clear()
            return
        for r in responses:
            answer = self.decoding[r.uid]
            answer.add(r.token)
            if r.finish_reason is not None:
                del self.decoding[r.uid]
                self.leave(answer, r.finish_reason, r.prompt_cache)

    def leave(self, answer: Decoding, reason: str, kv: list) -> None:
        """Finish `answer`; its KV cache becomes the kept prompt cache."""
        answer.finish(reason)
        self.prompt_cache = PromptCache(answer.ids + answer.tokens, kv, answer.prompt_cache.vision_features)
        self.prompt_cache_images = answer.images_key

    def run(self, job: Job) -> None:
        """Answer `job` alone through `stream_chat`, with the KV-cache options."""
        messages = self.messages_of(job)
        images = [image.decode(self.limits) for image in job.images]
        options = {**job.options, **self.cache_options}
        key = [hashlib.sha256(image.data).digest() for image in job.images]
        if self.prompt_cache is None or key != self.prompt_cache_images:
            self.prompt_cache = PromptCache()
        self.prompt_cache_images = None  # until this answer ends well (a failure may leave it half-written)
        cache = None if options.get("max_kv_size") else self.prompt_cache  # a rotating cache is not reused
        for response in stream_chat(self.model, self.processor, messages, images, prompt_cache=cache, **options):
            if self.stopping:
                raise APIError(503, "the server stopped during the answer", "server_stopping")
            if job.cancelled:
                self.prompt_cache_images = key  # stopped between tokens: the cache is consistent
                return
            job.responses.put(response)
        self.prompt_cache_images = key

    def answer(self, messages: list, images: List[RequestImage], options: dict,
               client_gone: Callable[[], bool] = lambda: False) -> Iterator:
        """The answer's responses as the generation thread makes them; bad input
        raises APIError at the first `next()`, a full queue a 503. While waiting,
        `client_gone` is polled: a client that left raises ClientGone and its job
        is dropped. Closing the iterator stops the generation."""
        from jinja2 import TemplateError


        job = Job(messages, images, options)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.limits.max_queued} requests are waiting; "
                           "retry later", "server_busy", headers={"Retry-After": "1"})
        try:
            checked = time.monotonic()
            while True:
                try:
                    item = job.responses.get(timeout=0.2)
                except queue.Empty:
                    item = None
                if time.monotonic() - checked >= 0.2:
                    if client_gone():
                        raise ClientGone()
                    checked = time.monotonic()
                if item is None:
                    continue
                if item is Job.END:
                    return
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


BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class ChatServer(ThreadingHTTPServer):
    """One thread per connection (at most `max_connections`) and a listen
    backlog deep enough that a burst of clients waits instead of being reset."""

    request_queue_size = 128

    def __init__(self, address, service: ChatService):
        self.service = service
        self.connections = threading.BoundedSemaphore(service.limits.max_connections)
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            body = json.dumps(APIError(503, "the server has too many open connections; retry later",
                                       "server_busy").body()).encode()
            try:
                request.sendall(BUSY_REPLY % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

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
        self.status, self.note, self.replied = None, "", False
        self.unread_body = ((self.headers.get("Content-Length") or "0").strip() != "0"  # until read_body reads it
                            or self.headers.get("Transfer-Encoding") is not None)
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path not in self.ROUTES:
                raise APIError(404, f"no endpoint {short(path)}; try {', '.join(self.ROUTES)}", "not_found")
            allowed, action = self.ROUTES[path]
            if method != allowed:
                raise APIError(405, f"{path} takes {allowed}, not {method}", "method_not_allowed",
                               headers={"Allow": allowed})
            getattr(self, action)()
        except APIError as e:
            self.fail(e)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.note, self.close_connection = " client went away; generation stopped", True
        except Exception as e:  # a bug must not take the server down; the trace stays in the log
            traceback.print_exc()
            self.fail(APIError(500, f"internal error ({type(e).__name__}); the server log has the details",
                               "internal_error"))
        finally:
            self.log_done()
            if self.unread_body:
                self.close_connection = True
                self.discard_unread_body()

    def log_done(self) -> None:
        """The request's one log line, written before the last bytes of the reply
        so that it is there once the client has its answer."""
        if not self.logged:
            self.logged = True
            elapsed = time.perf_counter() - self.tic
            self.log_message('"%s" %s %.2fs%s', short(self.requestline), self.status, elapsed, self.note)

    def log_request(self, code="-", size="-"):
        pass  # written by `log_done`

    def fail(self, error: APIError) -> None:
        self.note = f" {error.message}"
        try:
            if not self.replied:
                self.send_json(error.status, error.body(), error.headers)
            else:  # mid-stream: the status line is gone, tell the client in the stream
                self.send_event(error.body())
        except OSError:
            self.note += " (client gone)"
            self.close_connection = True

    def send_json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.status, self.replied = status, True
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.unread_body or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.log_done()
        self.wfile.write(body)

    def send_event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def read_body(self) -> bytes:
        """The request body, refused from its Content-Length before any of it is
        read, and received within `body_timeout` seconds."""
        limits = self.server.service.limits
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported; send a Content-Length",
                           "length_required")
        if length is None:
            raise APIError(411, "a Content-Length header is required", "length_required")
        length = length.strip()
        if not (length.isascii() and length.isdigit()) or len(length) > 20:
            self.close_connection = True
            raise APIError(400, f"bad Content-Length {short(length)!r}: it must be a decimal byte count",
                           "invalid_request")
        size = int(length)
        if size > limits.max_request_bytes:
            self.unread_body = self.close_connection = True
            raise APIError(413, f"the request body is {size} bytes, over the limit of "
                           f"{limits.max_request_bytes} bytes", "request_too_large")
        deadline = time.monotonic() + limits.body_timeout
        chunks, received = [], 0
        try:
            while received < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError()
                self.connection.settimeout(min(remaining, self.timeout))
                chunk = self.rfile.read1(min(65536, size - received))
                if not chunk:
                    self.close_connection = True
                    raise APIError(400, f"the request body ended after {received} of {size} bytes",
                                   "invalid_request")
                chunks.append(chunk)
                received += len(chunk)
        except (TimeoutError, socket.timeout):
            self.close_connection = True
            raise APIError(408, f"the request body was not received within {limits.body_timeout:g} s "
                           f"({received} of {size} bytes)", "request_timeout")
        finally:
            self.connection.settimeout(self.timeout)
        self.unread_body = False
        return b"".join(chunks)

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
        stream, include_usage = stream_settings(request)
        images = request_images(urls, s.limits)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        answer = s.answer(messages, images, options, self.client_gone)
        with contextlib.closing(answer):  # a reply cut short stops the generation
            first = next(answer)  # bad input raises here, before any reply is sent
            if stream:
                self.stream_reply(itertools.chain([first], answer), request_id, created, include_usage)
                return
            text, last = first.text, first
            for last in answer:
                text += last.text
        self.note = f" {last.prompt_tokens}+{last.generation_tokens} tokens"
        self.send_json(200, completion(request_id, created, s.model_id, text, last.finish_reason, usage_of(last)))

    def stream_reply(self, stream, request_id: str, created: int, include_usage: bool) -> None:
        model_id = self.server.service.model_id
        self.send_response(200)
        self.status, self.replied, self.close_connection = 200, True, True
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
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
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.note = " client went away; generation stopped"


def make_server(model, processor, model_id: str, host: str = "127.0.0.1", port: int = 8080,
                limits: Limits = Limits(), system_prompt: Optional[str] = None,
                cache_options: Optional[dict] = None) -> ChatServer:
    """A server ready for `serve_forever()`; port 0 picks a free port (`server.server_address`)."""
    service = ChatService(model, processor, model_id, limits, system_prompt, cache_options)
    return ChatServer((host, port), service)


def setup_arg_parser() -> argparse.ArgumentParser:
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
                   help="seconds allowed to download an image URL (a deadline for the whole download)")
    p.add_argument("--max-images", type=int, default=d.max_images, help="most images in one request")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="most pixels of all the images of one request together")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="most answers decoded together as one batch")
    p.add_argument("--max-queued", type=int, default=d.max_queued,
                   help="requests that may wait for a place in the batch; more are answered 503")
    add_runtime_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, image_timeout=args.image_timeout,
                    default_max_tokens=args.max_tokens, max_images=args.max_images,
                    max_request_pixels=args.max_request_pixels, max_queued=args.max_queued,
                    max_batch=args.max_batch)
    for name in ("max_tokens", "max_request_bytes", "max_image_bytes", "max_image_pixels", "max_images",
                 "max_request_pixels", "max_queued", "max_batch"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.image_timeout > 0 or args.image_timeout == float("inf"):
        sys.exit(f"error: --image-timeout must be a positive number of seconds, got {args.image_timeout}")
    model_id = args.model or DEFAULT_MODEL_NAME
    try:
        cache_options = check_cache_params(args.kv_bits, args.kv_group_size, args.quantized_kv_start,
                                           args.max_kv_size)
        print(f"loading {model_id} ...", file=sys.stderr, flush=True)
        model, processor = load(args.model, adapter_path=args.adapter_path)
        server = make_server(model, processor, model_id, args.host, args.port, limits,
                             args.system_prompt, cache_options)
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
