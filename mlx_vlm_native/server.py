"""`mlx-vlm-native serve`: an OpenAI-compatible chat completions server
(standard library HTTP, docs/generation.md). Handler threads parse and check
requests and fetch their images; one generation thread decodes the concurrent
answers together on mlx-lm's `BatchGenerator`. Every bad request gets an error
in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the
server goes on."""

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import io
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
from collections import OrderedDict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .conversations import ROLES, UnsupportedPart, openai_content
from .engine import PromptReader, attach_prompt
from .http_limits import ConnectionTable, DeadlineReader, PixelBudget, json_values, longest_token_bytes, text_of
from .weights.validation import invalid_unicode
from .generate import (
    DEFAULT_MODEL_NAME, GenerationResponse, PromptTooLongError, add_model_argument, add_runtime_arguments,
    check_chat_length, context_length, prepare_chat_inputs, stream_chat,
)
from .params import GenerationParameterError, check_cache_params, check_generation_params
from .processors.image import (
    ImageError, ImageTooLargeError, check_pixels, fetch_url, load_image, open_image, oriented_size, read_data_url, short,
)
from .utils import load


@dataclass(frozen=True)
class Limits:
    # the first nine are `serve` flags (FLAGS: their help)
    max_request_bytes: int = 20_000_000
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 40_000_000
    image_timeout: float = 10.0
    default_max_tokens: int = 512
    max_images: int = 16
    max_request_pixels: int = 64_000_000
    max_queued: int = 64
    max_batch: int = 16
    max_connections: int = 256  # open connections; at the cap the longest-waiting reader is closed
    overflow_connections: int = 32  # over the cap with none to close: read the request, answer 503
    header_timeout: float = 10.0  # seconds from a request's first byte to the end of its headers
    body_timeout: float = 60.0  # seconds from a request's first byte to the end of its body
    max_json_values: int = 100_000  # objects, arrays, members and items in a request body
    max_server_pixels: int = 128_000_000  # image pixels held by all requests in flight together
    pixel_wait: float = 30.0  # seconds a request may wait for max_server_pixels; then 503


FLAGS = {  # Limits field -> `serve` flag help
    "max_request_bytes": "largest request body",
    "max_image_bytes": "largest image, as decoded from a data URL or downloaded",
    "max_image_pixels": "most pixels of one image",
    "image_timeout": "seconds allowed to download an image URL (a deadline for the whole download)",
    "default_max_tokens": "answer length when a request sets no max_tokens (flag: --max-tokens)",
    "max_images": "most images in one request",
    "max_request_pixels": "most pixels of all the images of one request together",
    "max_queued": "requests that may wait for a place in the batch; more are answered 503",
    "max_batch": "most answers decoded together as one batch",
}


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


def parse_json_body(body: bytes, max_values: int = Limits.max_json_values) -> dict:
    """The request's JSON object; a body that would parse into more than
    `max_values` values is refused before it is parsed."""
    values = json_values(body, max_values)
    if values > max_values:
        raise APIError(400, f"the request body has over {max_values} JSON values (objects, arrays, members and "
                       "items); the limit bounds what a request may make the server hold", "invalid_json")
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

    given = {k: request.get(k) for k in ("temperature", "top_p", "seed", "repetition_penalty",
                                         "repetition_context_size")}
    given["max_tokens"] = default_max_tokens if request.get(name) is None else request.get(name)
    try:
        options = check_generation_params(**{k: v for k, v in given.items() if v is not None})
    except GenerationParameterError as e:
        param = name if e.param == "max_tokens" else e.param
        raise APIError(400, str(e).replace("max_tokens", param, 1), "invalid_value", param)
    top = request.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise APIError(400, f"top_logprobs must be an integer from 0 to 20, got {short(repr(top))}",
                       "invalid_value", "top_logprobs")
    if top is not None and not flag(request, "logprobs"):
        raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    options["top_logprobs"] = (top or 0) if flag(request, "logprobs") else None
    stop = request.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(x, str) and x for x in stop)):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", "invalid_value", "stop")
    options["stop"] = stop or []
    return options


def until_stop(responses: Iterator, stops: List[str]) -> Iterator:
    """The responses with the answer cut before the first of the `stop` strings
    (finish_reason "stop"); text that may begin one is held back until it cannot."""
    held, hold = "", max(map(len, stops), default=1) - 1
    for r in responses:
        held += r.text
        cuts = [i for i in (held.find(x) for x in stops) if i >= 0]
        if cuts:
            yield dataclasses.replace(r, text=held[: min(cuts)], finish_reason="stop")
            return
        if r.finish_reason is not None:
            yield dataclasses.replace(r, text=held)
            return
        out, held = held[: max(len(held) - hold, 0)], held[max(len(held) - hold, 0) :]
        yield dataclasses.replace(r, text=out)


def checked_text(text: str, where: str) -> str:
    """`text` if it can be written as UTF-8 (JSON's \\ud800 escapes can make lone surrogates)."""
    at = invalid_unicode(text)
    if at is not None:
        raise APIError(400, f"{where} is not valid Unicode: a lone surrogate \\u{ord(text[at]):04x} at character "
                       f"{at}; send UTF-8 text", "invalid_value", "messages")
    return text


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
    parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
    for i, part in enumerate(parts):
        if part["type"] == "text":
            checked_text(part["text"], f"{where}.content" if len(parts) == 1 else f"{where}.content[{i}].text")
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


def completion(request_id: str, created: int, model_id: str, text: str, finish_reason: str, usage: dict,
               logprobs: Optional[list] = None) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None if logprobs is None else {"content": logprobs}}],
        "usage": usage,
    }


def completion_chunk(request_id: str, created: int, model_id: str, delta: dict,
                     finish_reason: Optional[str] = None, logprobs: Optional[list] = None) -> dict:
    return {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                     "logprobs": None if logprobs is None else {"content": logprobs}}],
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


def logprob_entry(tokenizer, token: int, logprobs: mx.array, top: int) -> dict:
    """OpenAI's logprobs entry of one sampled token: its log-probability and the `top` likeliest."""
    values = np.array(logprobs.astype(mx.float32))

    def entry(t: int) -> dict:
        text = tokenizer.decode([t])
        return {"token": text, "logprob": float(values[t]), "bytes": list(text.encode("utf-8"))}

    best = np.argsort(-values, kind="stable")[:top] if top else []
    return {**entry(token), "top_logprobs": [entry(int(t)) for t in best]}


@functools.lru_cache(maxsize=64)
def shared_sampler(temperature: float, top_p: float):
    """One sampler per setting: mlx-lm's batch samples the rows that share one in a
    single call, and calls each row's own sampler apart. (Seeded sampling is served alone.)"""
    return make_sampler(temp=temperature, top_p=top_p)


class Decoding:
    """One answer in the batch: its job, text and timings; its responses go to its request's thread."""

    def __init__(self, job: Job, tokenizer, ids: List[int], cached: int, images_key, tic: float):
        self.job, self.tokenizer, self.images_key = job, tokenizer, images_key
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_tokens, self.cached, self.tokens, self.tic = len(ids), cached, [], tic
        self.prompt_tps, self.gen_tic = 0.0, None
        self.logprobs = None  # of the token `add` is given next

    def response(self, text: str, token: Optional[int], finish_reason=None) -> GenerationResponse:
        elapsed = time.perf_counter() - self.gen_tic
        decoded = len(self.tokens) - 1  # the first token comes with the prefill
        return GenerationResponse(text, token, self.prompt_tokens, self.prompt_tps, len(self.tokens),
                                  decoded / elapsed if decoded > 0 and elapsed > 0 else 0.0,
                                  mx.get_peak_memory() / 1e9, finish_reason, self.cached)

    def add(self, token: int) -> None:
        """Stream `token` to the client (an end-of-sequence token only counts)."""
        if not self.tokens:
            self.gen_tic = time.perf_counter()
            self.prompt_tps = (self.prompt_tokens - self.cached) / max(self.gen_tic - self.tic, 1e-9)
        self.tokens.append(token)
        if token in self.eos:
            return
        self.detok.add_token(token)
        response = self.response(self.detok.last_segment, token)
        top = self.job.options.get("top_logprobs")
        if top is not None and self.logprobs is not None:
            response.logprobs = logprob_entry(self.tokenizer, token, self.logprobs, top)
        self.job.responses.put(response)

    def finish(self, reason: str) -> None:
        self.detok.finalize()
        self.job.responses.put(self.response(self.detok.last_segment, None, reason))
        self.job.responses.put(Job.END)


class ConversationCaches:
    """Conversations' KV caches (mlx-lm's `LRUPromptCache`, keyed by their images'
    digests and tokens) and vision features, bounded by entries and bytes: a
    request continuing one prefills only what follows the prefix it shares."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30):
        self.kv = LRUPromptCache(max_entries, max_bytes)
        self.features: "OrderedDict[tuple, mx.array]" = OrderedDict()
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.taken = None

    def reuse(self, key: tuple, ids: List[int]) -> int:
        """Take the kept KV cache nearest to `ids` with these images into `taken`
        (None: none); the tokens of `ids` it holds, at most all but the last."""
        cache, rest = self.kv.fetch_nearest_cache(key, ids)
        if cache is not None and not rest:
            trim_prompt_cache(cache, 1)
            rest = ids[-1:]
        self.taken = cache
        return len(ids) - len(rest) if cache is not None else 0

    def keep(self, key: tuple, tokens: List[int], cache: list) -> None:
        self.kv.insert_cache(key, tokens, cache)

    def vision_features(self, key: tuple):
        if key in self.features:
            self.features.move_to_end(key)
        return self.features.get(key)

    def keep_features(self, key: tuple, features) -> None:
        if features is None:
            return
        self.features[key] = features
        while len(self.features) > self.max_entries or (
                len(self.features) > 1 and sum(f.nbytes for f in self.features.values()) > self.max_bytes):
            self.features.popitem(last=False)


class ChatService:
    """The model, a bounded queue of jobs and the one thread that answers them
    on mlx-lm's `BatchGenerator`. Each loop turn runs about `admission_slice`
    seconds of the newcomers' admission steps (an image decoded, a prompt
    prepared, a block of a vision encoder), then one `BatchGenerator.next()`: a
    decode step of the running answers batched with one prefill chunk of the
    newcomers. At most `max_batch` answers are admitted or decoding; the rest
    wait in the queue. Seeded sampled requests and KV-cache options (caches
    that do not merge into a batch) are answered alone once the batch drains.

    One long-lived thread rather than a lock: MLX keeps streams per thread, and
    each short-lived request thread that ran the model would leave its MLX
    worker threads behind."""

    def __init__(self, model, processor, model_id: str, limits: Limits = Limits(),
                 system_prompt: Optional[str] = None, cache_options: Optional[dict] = None,
                 prefill_step_size: int = 512, conversations: Optional[ConversationCaches] = None):
        self.model, self.processor, self.model_id, self.limits = model, processor, model_id, limits
        self.system_prompt = system_prompt  # for requests that bring no system message
        self.cache_options = cache_options or {}  # KV-cache options (check_cache_params) for every answer
        self.prefill_step_size = prefill_step_size
        self.admission_slice = 0.02  # seconds of admission work between two decode steps (at least one step)
        self.conversations = conversations or ConversationCaches()
        # request threads count prompt tokens with their own copy of the tokenizer, so that the
        # generation thread never tokenizes a prompt that does not fit, nor waits for one that is counted
        self.counting_processor, self.counting_lock = copy.deepcopy(processor), threading.Lock()
        self.created = int(time.time())
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.max_queued)
        self.decoding = {}  # BatchGenerator uid -> Decoding
        self.admitting: deque = deque()  # (job, its admission's steps)
        self.stopping = False
        self.idle = threading.Event()
        threading.Thread(target=self.work, name="generation", daemon=True).start()

    def work(self) -> None:
        self.batch = self.new_batch()
        held = None  # a job taken from the queue that must wait for the batch to drain
        while True:
            if not self.decoding and not self.admitting and held is None:
                release_memory()
                self.idle.set()
                held = self.jobs.get()
                self.idle.clear()
            while held is not None or (len(self.decoding) + len(self.admitting) < self.limits.max_batch
                                       and not self.jobs.empty()):
                job = held if held is not None else self.jobs.get_nowait()
                held = None
                if self.alone(job) and (self.decoding or self.admitting):
                    held = job
                    break
                self.start(job)
            if self.admitting:
                self.admit_steps()
            if self.decoding:
                self.step()

    def new_batch(self):
        eos = self.processor.tokenizer.eos_token_ids
        # the batch runs on this thread's stream, as the encodes do
        return BatchGenerator(PromptReader(self.model), stop_tokens=[[t] for t in eos],
                              prefill_batch_size=self.limits.max_batch, completion_batch_size=self.limits.max_batch,
                              prefill_step_size=self.prefill_step_size, stream=mx.default_stream(mx.default_device()))

    def alone(self, job: Job) -> bool:
        """Whether `job` cannot share the batch: KV-cache options, or a seed for sampling."""
        options = job.options
        return (any(self.cache_options.get(k) is not None for k in ("kv_bits", "max_kv_size"))
                or (options.get("seed") is not None and options.get("temperature", 0.0) > 0))

    def start(self, job: Job) -> None:
        """Answer `job` alone, or queue its admission to the batch; errors go to its client."""
        if job.cancelled:  # its client left while it waited
            return
        if self.stopping:
            job.responses.put(APIError(503, "the server is stopping", "server_stopping"))
            return
        if not self.alone(job):
            self.admitting.append((job, self.admit(job)))
            return
        try:
            self.run(job)
            job.responses.put(Job.END)
        except Exception as e:  # handed to the request's thread
            job.responses.put(e)
        finally:
            job.images = []

    def with_system_prompt(self, messages: list) -> list:
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def check_length(self, messages: list, images: List[RequestImage]) -> None:
        """On the request's thread: the conversation against the context, from its
        images' sizes alone; a 400 when it does not fit."""
        from jinja2 import TemplateError

        try:
            with self.counting_lock:
                check_chat_length(self.model, self.counting_processor, messages, [i.size for i in images])
        except PromptTooLongError as e:
            raise APIError(400, str(e), "context_length_exceeded", "messages")
        except (ValueError, TemplateError) as e:  # e.g. placeholder/image count, roles
            raise APIError(400, str(e), "invalid_value", "messages")

    def admit_steps(self) -> None:
        """Admission steps, the newcomers in turn, until `admission_slice` seconds
        are used (at least one step); a failure goes to its client."""
        deadline = time.perf_counter() + self.admission_slice
        while self.admitting:
            job, steps = self.admitting.popleft()
            try:
                if job.cancelled or self.stopping or next(steps, StopIteration) is StopIteration:
                    if self.stopping and not job.cancelled:
                        job.responses.put(APIError(503, "the server is stopping", "server_stopping"))
                else:
                    self.admitting.append((job, steps))
            except Exception as e:
                job.responses.put(e)
            if time.perf_counter() >= deadline:
                return

    def admit(self, job: Job) -> Iterator[None]:
        """`job`'s admission in steps: images decoded, prompt prepared, vision
        features encoded a block at a time (or kept ones), then into the batch."""
        tic = time.perf_counter()
        messages = job.messages
        images = []
        for image in job.images:
            images.append(image.decode(self.limits))
            yield
        job.images, key = [], tuple(hashlib.sha256(image.data).digest() for image in job.images)
        inputs = prepare_chat_inputs(self.model, self.processor, messages, images)
        yield
        features = self.conversations.vision_features(key)
        if features is None:
            for features in self.model.encode_vision_steps([inputs]):
                yield
            features = features[0]
            self.conversations.keep_features(key, features)
        embeddings, positions = self.model.get_input_embeddings(inputs, vision_features=features)
        ids = [int(i) for i in inputs.input_ids]
        cached = self.conversations.reuse(key, ids)
        cache = self.conversations.taken or self.model.make_cache()
        attach_prompt(cache, embeddings[0], positions)
        o = job.options
        (uid,) = self.batch.insert(
            [ids[cached:]], [min(o["max_tokens"], context_length(self.model) - len(ids))], [cache], [ids[:cached]],
            [shared_sampler(o["temperature"], o["top_p"])],
            [make_logits_processors(None, o["repetition_penalty"], o["repetition_context_size"])])
        self.decoding[uid] = Decoding(job, self.processor.tokenizer, ids, cached, key, tic)

    def step(self) -> None:
        """One `BatchGenerator.next()`: a decode step of the running answers and a
        chunk of the newcomers' prefill; answers whose clients left are dropped first."""
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
            _, responses = self.batch.next()
        except Exception as e:  # every answer in the batch fails with it
            self.batch = self.new_batch()
            for answer in self.decoding.values():
                answer.job.responses.put(e)
            self.decoding.clear()
            return
        for r in responses:
            answer = self.decoding[r.uid]
            answer.logprobs = r.logprobs
            answer.add(r.token)
            if r.finish_reason is not None:
                del self.decoding[r.uid]
                answer.finish(r.finish_reason)
                self.conversations.keep(answer.images_key, r.all_tokens, r.prompt_cache)

    def run(self, job: Job) -> None:
        """Answer `job` alone through `stream_chat`, with the KV-cache options."""
        messages = job.messages
        images = [image.decode(self.limits) for image in job.images]
        top = job.options.get("top_logprobs")
        options = {k: v for k, v in job.options.items() if k not in ("top_logprobs", "stop")}
        for response in stream_chat(self.model, self.processor, messages, images, **options, **self.cache_options):
            if self.stopping:
                raise APIError(503, "the server stopped during the answer", "server_stopping")
            if job.cancelled:
                return
            if response.token is not None and top is not None:
                response.logprobs = logprob_entry(self.processor.tokenizer, response.token, response.logprobs, top)
            job.responses.put(response)

    def answer(self, messages: list, images: List[RequestImage], options: dict,
               client_gone: Callable[[], bool] = lambda: False) -> Iterator:
        """The answer's responses as the generation thread makes them; bad input
        raises APIError at the first `next()`, a full queue a 503. While waiting,
        `client_gone` is polled: a client that left raises ClientGone and its job
        is dropped. Closing the iterator stops the generation."""
        from jinja2 import TemplateError

        messages = self.with_system_prompt(messages)
        self.check_length(messages, images)
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
    """One thread per connection and a listen backlog deep enough that a burst
    of clients waits instead of being reset. The connection table keeps at
    most `max_connections`: a new client gets in by closing the connection
    that has waited longest for its request (slow or idle), so slow sockets
    cannot lock anyone out. The server-wide pixel budget and the text bound
    (context x the longest token) are kept here for the handlers."""

    request_queue_size = 128

    def __init__(self, address, service: ChatService):
        self.service = service
        limits = service.limits
        self.table = ConnectionTable(limits.max_connections, limits.overflow_connections)
        self.pixels = PixelBudget(max(limits.max_server_pixels, limits.max_request_pixels), limits.pixel_wait)
        # a text of n characters is at least n / longest-token tokens: longer than this never fits
        self.longest_token = longest_token_bytes(service.processor.tokenizer)
        self.max_prompt_chars = context_length(service.model) * self.longest_token
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        if self.table.admit(request) is None:
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
            self.table.remove(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.table.remove(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # a client that left or was closed to make room
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.service.close()


class Handler(BaseHTTPRequestHandler):
    server_version = "mlx-vlm-native"
    timeout = 60  # seconds a client may stall while sending
    ROUTES = {"/v1/models": ("GET", "models"), "/health": ("GET", "health"),
              "/v1/chat/completions": ("POST", "chat_completions")}

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """Wait (at most `timeout`) for a request's first byte, then read its
        request line and headers within `header_timeout` of it."""
        self.request_start = None
        if not self.server.table.reading(self.connection, True):
            self.close_connection = True
            return
        self.reader.deadline = None
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle past the timeout, or closed to make room
            self.close_connection = True
            return
        self.request_start = time.monotonic()
        self.reader.deadline = self.request_start + self.server.service.limits.header_timeout
        super().handle_one_request()

    do_GET, do_POST, do_PUT, do_DELETE, do_PATCH = (
        lambda self, m=method: self.dispatch(m) for method in ("GET", "POST", "PUT", "DELETE", "PATCH"))

    def dispatch(self, method: str) -> None:
        self.tic, self.logged = time.perf_counter(), False
        self.status, self.note, self.replied = None, "", False
        self.unread_body = ((self.headers.get("Content-Length") or "0").strip() != "0"  # until read_body reads it
                            or self.headers.get("Transfer-Encoding") is not None)
        path = urlsplit(self.path).path.rstrip("/") or "/"
        table = self.server.table
        connection = table.get(self.connection)
        if connection is None or connection.evicted:  # closed to make room while sending its headers
            self.close_connection, self.unread_body = True, False
            return
        self.reader.deadline = self.request_start + self.server.service.limits.body_timeout
        if not self.unread_body:
            table.reading(self.connection, False)
        try:
            if connection.overflow and path != "/health":  # over the cap: read (or refuse) the body, then 503
                self.close_connection = True
                if self.unread_body:
                    self.read_body(keep=False)
                raise APIError(503, "the server has too many open connections; retry later", "server_busy",
                               headers={"Retry-After": "1"})
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

    def read_body(self, keep: bool = True) -> bytes:
        """The request body, refused from its Content-Length before any of it is
        read, and received within `body_timeout` seconds of the request's first
        byte (`keep=False`: read and dropped)."""
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
        chunks, received = [], 0
        try:
            while received < size:
                chunk = self.rfile.read1(min(65536, size - received))
                if not chunk:
                    self.unread_body = False
                    self.close_connection = True
                    raise APIError(400, f"the request body ended after {received} of {size} bytes",
                                   "invalid_request")
                if keep:
                    chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise APIError(408, f"the request was not received within {limits.body_timeout:g} s "
                           f"({received} of {size} body bytes)", "request_timeout")
        self.unread_body = False
        self.server.table.reading(self.connection, False)
        return b"".join(chunks)

    def discard_unread_body(self, seconds: float = 2.0) -> None:
        """Close after a refused body without resetting the connection, so that the
        client still reads the error: stop sending, then drain for a while."""
        self.reader.deadline = time.monotonic() + seconds
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while self.rfile.read1(65536):
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
        request = parse_json_body(self.read_body(), s.limits.max_json_values)
        messages, urls = chat_messages(request)
        options = sampling_options(request, s.limits.default_max_tokens)
        stream, include_usage = stream_settings(request)
        chars = sum(len(text) for text in text_of(messages))
        if chars > self.server.max_prompt_chars:  # refused here, before any tokenizing
            raise APIError(400, f"the messages are {chars} characters, so at least "
                           f"{-(-chars // self.server.longest_token)} tokens (a token is at most "
                           f"{self.server.longest_token} characters): over the model's context of "
                           f"{context_length(s.model)} tokens", "context_length_exceeded", "messages")
        images = request_images(urls, s.limits)
        pixels = sum(w * h for w, h in (image.size for image in images))
        if not self.server.pixels.take(pixels):
            raise APIError(503, f"the server is busy with other requests' images ({self.server.pixels.total} pixels "
                           "in flight); retry later", "server_busy", headers={"Retry-After": "1"})
        try:
            self.respond(s, messages, images, options, stream, include_usage)
        finally:
            self.server.pixels.give(pixels)

    def respond(self, s, messages, images, options, stream: bool, include_usage: bool) -> None:
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        answer = s.answer(messages, images, options, self.client_gone)
        with contextlib.closing(answer):  # a reply cut short stops the generation
            first = next(answer)  # bad input raises here, before any reply is sent
            responses = until_stop(itertools.chain([first], answer), options["stop"])
            if stream:
                self.stream_reply(responses, request_id, created, include_usage)
                return
            text, entries = "", []
            for last in responses:
                text += last.text
                entries += [last.logprobs] if isinstance(last.logprobs, dict) else []
        self.note = f" {last.prompt_tokens}+{last.generation_tokens} tokens"
        self.send_json(200, completion(request_id, created, s.model_id, text, last.finish_reason, usage_of(last),
                                       entries if options["top_logprobs"] is not None else None))

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
                entry = last.logprobs if isinstance(last.logprobs, dict) else None
                if last.text or entry:
                    self.send_event(completion_chunk(request_id, created, model_id, {"content": last.text},
                                                     logprobs=None if entry is None else [entry]))
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
                cache_options: Optional[dict] = None, prefill_step_size: int = 512) -> ChatServer:
    """A server ready for `serve_forever()`; port 0 picks a free port (`server.server_address`)."""
    service = ChatService(model, processor, model_id, limits, system_prompt, cache_options, prefill_step_size)
    return ChatServer((host, port), service)


def flag_name(field: str) -> str:
    return "--max-tokens" if field == "default_max_tokens" else "--" + field.replace("_", "-")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible chat completions server (/v1/chat/completions).")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port)")
    for field, help in FLAGS.items():
        default = getattr(Limits, field)
        p.add_argument(flag_name(field), dest=field, type=type(default), default=default, help=help)
    p.add_argument("--prefill-step-size", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps of the running answers")
    add_runtime_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    for field in [f for f in FLAGS if f != "image_timeout"] + ["prefill_step_size"]:
        if getattr(args, field) < 1:
            sys.exit(f"error: {flag_name(field)} must be at least 1, got {getattr(args, field)}")
    if not args.image_timeout > 0 or args.image_timeout == float("inf"):
        sys.exit(f"error: --image-timeout must be a positive number of seconds, got {args.image_timeout}")
    limits = Limits(**{field: getattr(args, field) for field in FLAGS})
    model_id = args.model or DEFAULT_MODEL_NAME
    try:
        cache_options = check_cache_params(args.kv_bits, args.kv_group_size, args.quantized_kv_start,
                                           args.max_kv_size)
        print(f"loading {model_id} ...", file=sys.stderr, flush=True)
        model, processor = load(args.model, adapter_path=args.adapter_path)
        server = make_server(model, processor, model_id, args.host, args.port, limits,
                             args.system_prompt, cache_options, args.prefill_step_size)
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
