"""`mlx-vlm-native serve`: an OpenAI-compatible chat completions server
(docs/generation.md). Handler threads parse and check requests
(`openai_api`) and fetch their images; one generation thread decodes the
concurrent answers together on mlx-lm's `BatchGenerator`. The HTTP transport
and its limits are `http_limits`'; every bad request gets an error in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the
server goes on."""

import argparse
import contextlib
import copy
import ctypes
import functools
import hashlib
import itertools
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .engine import PromptReader, attach_prompt
from .generate import (
    DEFAULT_MODEL_NAME, GenerationResponse, PromptTooLongError, add_model_argument, add_runtime_arguments,
    check_chat_length, context_length, prepare_chat_inputs, stream_chat,
)
from .http_limits import APIError, ClientGone, LimitedHandler, LimitedHTTPServer, PixelBudget, longest_token_bytes, text_of
from .openai_api import (
    MAX_JSON_VALUES, RequestImage, chat_messages, completion, completion_chunk, logprob_entry, parse_json_body, request_images,
    sampling_options, stream_settings, until_stop, usage_of,
)
from .params import check_cache_params
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
    max_json_values: int = MAX_JSON_VALUES  # objects, arrays, members and items in a request body
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


class ChatServer(LimitedHTTPServer):
    """The chat service behind the hardened transport, with the server-wide
    pixel budget and the text bound (context x the longest token) the handlers use."""

    def __init__(self, address, service: ChatService):
        self.service = service
        limits = service.limits
        self.pixels = PixelBudget(max(limits.max_server_pixels, limits.max_request_pixels), limits.pixel_wait)
        # a text of n characters is at least n / longest-token tokens: longer than this never fits
        self.longest_token = longest_token_bytes(service.processor.tokenizer)
        self.max_prompt_chars = context_length(service.model) * self.longest_token
        super().__init__(address, Handler, limits)

    def server_close(self) -> None:
        super().server_close()
        self.service.close()


class Handler(LimitedHandler):
    ROUTES = {"/v1/models": ("GET", "models"), "/health": ("GET", "health"),
              "/v1/chat/completions": ("POST", "chat_completions")}

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
