"""Generate text about images and videos: Python API and `generate` command."""

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .engine import PromptReader, attach_prompt
from .params import GenerationParameterError, check_cache_params, check_generation_params
from .weights.validation import invalid_unicode
from .processors.image import ImageError, load_video_frames
from .utils import load

DEFAULT_MODEL_NAME = "mlx-vlm-native-default"  # how the embedded model is named (server, logs)


@dataclass
class GenerationResponse:
    text: str  # the new text of this step
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens a ConversationCache already held
    logprobs: Optional[mx.array] = None  # (vocab,) log-probabilities this token was sampled from


def context_length(model) -> int:
    return model.args.text_config.max_position_embeddings


class PromptTooLongError(ValueError):
    """The prompt leaves no room for an answer in the model's context."""


def check_prompt_length(model, n_prompt: int) -> None:
    limit = context_length(model)
    if n_prompt + 1 > limit:
        raise PromptTooLongError(
            f"the prompt is {n_prompt} tokens (images and video included); the model's "
            f"context is {limit} tokens. Use fewer or smaller images, or fewer frames"
        )


def process_checked(model, processor, text: str, images=(), videos=()):
    """Rendered prompt + media -> processed inputs, checked against the model's context."""
    inputs = processor(text, images=list(images or []), videos=list(videos or []))
    check_prompt_length(model, len(inputs.input_ids))
    return inputs


def check_chat_length(model, processor, messages: list, image_sizes: Sequence) -> None:
    """Refuse a conversation too long for the context from its images' (width,
    height) alone, before they are decoded."""
    check_prompt_length(model, processor.num_prompt_tokens(format_chat(processor, messages), list(image_sizes)))


def prepare_inputs(model, processor, prompt: str, images=(), videos=(), apply_chat_template=True,
                   system_prompt: Optional[str] = None):
    """Prompt + media -> processed inputs, checked against the model's context.
    A `system_prompt` goes first, as the conversation's system message."""
    images, videos = list(images or []), list(videos or [])
    if system_prompt is not None:
        if not apply_chat_template:
            raise ValueError("a system prompt needs the chat template (drop --no-chat-template)")
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
        messages = [{"role": "system", "content": system_prompt},
                    {"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
        prompt = format_chat(processor, messages)
    elif apply_chat_template:
        prompt = processor.format_prompt(prompt, len(images), len(videos))
    return process_checked(model, processor, prompt, images, videos)


def check_kv_group_size(model, kv_bits: Optional[int], kv_group_size: int) -> None:
    """A quantized KV cache groups along the head dim, which the group size must divide."""
    t = model.args.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    if kv_bits is not None and head_dim % kv_group_size:
        raise GenerationParameterError(
            "kv_group_size", f"kv_group_size {kv_group_size} must divide the model's attention head "
            f"dim {head_dim} to quantize the KV cache")


def new_cache(model, max_kv_size: Optional[int] = None) -> list:
    """The model's KV cache, or with `max_kv_size` mlx-lm's rotating one (the
    first 4 tokens kept)."""
    if max_kv_size is None:
        return make_prompt_cache(model)
    return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]


def format_chat(processor, messages: list) -> str:
    """A whole conversation through the chat template, ready for the answer."""
    return processor.format_messages(messages, add_generation_prompt=True)


def prepare_chat_inputs(model, processor, messages: list, images=()):
    """OpenAI-like messages ({"role", "content"}: a string or parts {"type": "text"|"image"})
    + the images of their image parts, in order -> processed, checked inputs."""
    return process_checked(model, processor, format_chat(processor, messages), images)


@dataclass
class ConversationCache:
    """What one conversation has run through the language model: the token
    ids and their KV cache, and the vision features of its images. The next
    turn prefills only what follows the longest prefix it shares with them and
    does not encode the images again. Valid for one set of images: start a new
    one when they change."""

    ids: List[int] = field(default_factory=list)
    kv: Optional[list] = None
    vision_features: Optional[mx.array] = None

    def reuse(self, model, ids: Sequence[int]) -> int:
        """Trim the KV cache to the prefix it shares with `ids` (leaving at least
        one token to prefill); the number of tokens kept."""
        if self.kv is None or not can_trim_prompt_cache(self.kv):
            self.kv, self.ids = make_prompt_cache(model), []
        held = self.ids[: self.kv[0].offset]
        keep = 0
        for a, b in zip(held, ids[:-1]):
            if a != b:
                break
            keep += 1
        trim_prompt_cache(self.kv, self.kv[0].offset - keep)
        self.ids = list(ids)
        return keep


def cached_embeddings(model, inputs, cache: ConversationCache):
    """The prompt's embeddings and positions, with the images encoded once per ConversationCache."""
    if cache.vision_features is None:
        cache.vision_features = model.encode_vision([inputs])[0]
    return model.get_input_embeddings(inputs, vision_features=cache.vision_features)


def stream_generate(model, processor, prompt: str, images: Optional[Sequence] = None,
                    videos: Optional[Sequence[Sequence]] = None, apply_chat_template: bool = True,
                    system_prompt: Optional[str] = None, **options) -> Generator[GenerationResponse, None, None]:
    """Yield the answer piece by piece; the last response carries the stats.
    `options` are `check_generation_params`' (max_tokens, temperature, top_p,
    seed, repetition_penalty, repetition_context_size) and the KV-cache ones of
    `check_cache_params`; a bad one raises `GenerationParameterError` (a
    ValueError) at the first `next()`, before any image is processed."""
    sampling = checked_options(model, **options)
    inputs = prepare_inputs(model, processor, prompt, images, videos, apply_chat_template, system_prompt)
    yield from stream_from_inputs(model, processor, inputs, **sampling)


def stream_chat(model, processor, messages: list, images: Sequence = (), conversation: Optional[ConversationCache] = None,
                **options) -> Generator[GenerationResponse, None, None]:
    """`stream_generate` for a conversation: `messages` as in `prepare_chat_inputs`.
    With a `conversation` kept across the turns of one conversation, each turn
    prefills only its new tokens. Bad input (a sampling parameter out of range,
    a prompt too long for the context) raises on the first `next()`."""
    sampling = checked_options(model, **options)
    inputs = prepare_chat_inputs(model, processor, messages, images)
    if conversation is None:
        yield from stream_from_inputs(model, processor, inputs, **sampling)
        return
    embeddings, positions = cached_embeddings(model, inputs, conversation)
    ids = [int(i) for i in inputs.input_ids]
    keep = conversation.reuse(model, ids)
    sampling.pop("max_kv_size")  # the conversation's cache is the model's own
    for r in decode(model, processor.tokenizer, ids, embeddings[0], positions, conversation.kv, keep, **sampling):
        if r.token is not None:
            conversation.ids.append(r.token)
        yield r


def checked_options(model, max_tokens=256, temperature=0.0, top_p=1.0, seed=None, repetition_penalty=None,
                    repetition_context_size=20, kv_bits=None, kv_group_size=64, quantized_kv_start=5000,
                    max_kv_size=None) -> dict:
    sampling = check_generation_params(max_tokens, temperature, top_p, seed, repetition_penalty,
                                       repetition_context_size)
    sampling.update(check_cache_params(kv_bits, kv_group_size, quantized_kv_start, max_kv_size))
    check_kv_group_size(model, kv_bits, kv_group_size)
    return sampling


def stream_from_inputs(model, processor, inputs, tic=None, max_kv_size=None, **sampling):
    """Generate after processed `inputs` (`tic` is accepted for older callers)."""
    embeddings, positions = model.get_input_embeddings(inputs)
    yield from decode(model, processor.tokenizer, [int(i) for i in inputs.input_ids], embeddings[0], positions,
                      new_cache(model, max_kv_size), 0, **sampling)


def decode(model, tokenizer, ids: List[int], embeddings: mx.array, positions, cache: list, cached: int = 0,
           max_tokens=256, temperature=0.0, top_p=1.0, seed=None, repetition_penalty=None,
           repetition_context_size=20, kv_bits=None, kv_group_size=64, quantized_kv_start=5000,
           prefill_step_size: int = 2048) -> Generator[GenerationResponse, None, None]:
    """The one-sequence decode: mlx-lm's `stream_generate` over the prompt `ids`
    (with its (L, D) `embeddings` and `positions`), of which `cache` already
    holds the first `cached`. Each response carries its token's log-probabilities."""
    if seed is not None:
        mx.random.seed(seed)
    attach_prompt(cache, embeddings, positions)
    limit = min(max_tokens, context_length(model) - len(ids))
    steps = mlx_stream_generate(
        PromptReader(model), tokenizer, mx.array(ids[cached:]), max_tokens=limit,
        sampler=make_sampler(temp=temperature, top_p=top_p),
        logits_processors=make_logits_processors(None, repetition_penalty, repetition_context_size),
        prompt_cache=cache, prefill_step_size=prefill_step_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start)
    for r in steps:
        stats = (len(ids), r.prompt_tps, r.generation_tokens, r.generation_tps, r.peak_memory)
        if r.finish_reason is None or r.finish_reason == "length":
            yield GenerationResponse(r.text, r.token, *stats, None, cached, r.logprobs)
        if r.finish_reason is not None:
            yield GenerationResponse("" if r.finish_reason == "length" else r.text, None, *stats,
                                     r.finish_reason, cached)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float
    finish_reason: str
    cached_tokens: int = 0


def generate(model, processor, prompt: str, images=None, videos=None, verbose=False, **kwargs) -> GenerationResult:
    """Generate a whole answer; with `verbose`, stream it and print the stats."""
    return collect(stream_generate(model, processor, prompt, images, videos, **kwargs), verbose)


def chat_generate(model, processor, messages: list, images: Sequence = (), verbose=False,
                  **kwargs) -> GenerationResult:
    """The whole answer to a conversation (see `stream_chat`)."""
    return collect(stream_chat(model, processor, messages, images, **kwargs), verbose)


class Decoded:
    """One answer of a `BatchGenerator`: its tokens, text and timings, as
    `GenerationResponse`s (batch_generate and the server both use it)."""

    def __init__(self, tokenizer, prompt_tokens: int, cached: int = 0, tic: Optional[float] = None):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.eos = set(tokenizer.eos_token_ids)
        self.prompt_tokens, self.cached, self.tokens = prompt_tokens, cached, []
        self.tic = time.perf_counter() if tic is None else tic
        self.prompt_tps, self.gen_tic = 0.0, None

    def response(self, text: str, token: Optional[int], finish_reason=None, logprobs=None) -> GenerationResponse:
        elapsed = time.perf_counter() - self.gen_tic
        decoded = len(self.tokens) - 1  # the first token comes with the prefill
        return GenerationResponse(text, token, self.prompt_tokens, self.prompt_tps, len(self.tokens),
                                  decoded / elapsed if decoded > 0 and elapsed > 0 else 0.0,
                                  mx.get_peak_memory() / 1e9, finish_reason, self.cached, logprobs)

    def add(self, token: int, logprobs=None) -> Optional[GenerationResponse]:
        """Count `token`; its response, or None for an end-of-sequence token."""
        if not self.tokens:
            self.gen_tic = time.perf_counter()
            self.prompt_tps = (self.prompt_tokens - self.cached) / max(self.gen_tic - self.tic, 1e-9)
        self.tokens.append(token)
        if token in self.eos:
            return None
        self.detok.add_token(token)
        return self.response(self.detok.last_segment, token, logprobs=logprobs)

    def finish(self, reason: str) -> GenerationResponse:
        self.detok.finalize()
        self.final = self.response(self.detok.last_segment, None, reason)
        return self.final


def insert_prompt(gen: BatchGenerator, model, ids: List[int], embeddings: mx.array, positions, max_tokens: int,
                  cache: Optional[list] = None, cached: int = 0, **per_sequence) -> int:
    """Put one prompt into `gen` (its prefill then runs in `gen`'s chunks,
    batched with the prompts that arrive with it); its uid. `cache` holds the
    first `cached` tokens of `ids` already."""
    cache = cache if cache is not None else model.make_cache()
    attach_prompt(cache, embeddings, positions)
    limit = min(max_tokens, context_length(model) - len(ids))
    (uid,) = gen.insert([ids[cached:]], max_tokens=[limit], caches=[cache], all_tokens=[ids[:cached]],
                        **{k: [v] for k, v in per_sequence.items()})
    return uid


def batch_generate(model, processor, prompts: Sequence[str], images: Optional[Sequence[Sequence]] = None,
                   apply_chat_template: bool = True, max_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: Optional[int] = None, completion_batch_size: int = 32,
                   prefill_step_size: int = 2048) -> List["GenerationResult"]:
    """Answer several prompts, each with its own images, decoding them as ONE
    batch. `encode_vision` encodes the images of all prompts in one call (one
    packed tower call for the packed families); mlx-lm's `BatchGenerator` then
    prefills the prompts together in chunks and decodes up to
    `completion_batch_size` sequences together, each leaving the batch when it
    finishes. Greedy answers are the ones `generate` gives, token for token.

    `prompt_tps` of each result counts its prompt over the time to its first
    token; `generation_tps` its tokens over the batch's decode time until it finished."""
    checked = check_generation_params(max_tokens, temperature, top_p, seed)
    max_tokens, temperature, top_p, seed = (checked[k] for k in ("max_tokens", "temperature", "top_p", "seed"))
    images = list(images) if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if seed is not None:
        mx.random.seed(seed)
    tokenizer = processor.tokenizer
    tic = time.perf_counter()
    batch = [prepare_inputs(model, processor, p, i, (), apply_chat_template) for p, i in zip(prompts, images)]
    features = model.encode_vision(batch)
    gen = BatchGenerator(PromptReader(model), stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=make_sampler(temp=temperature, top_p=top_p),
                         completion_batch_size=completion_batch_size, prefill_step_size=prefill_step_size,
                         prefill_batch_size=min(len(batch), completion_batch_size) or 1)
    answers = {}
    try:
        for inputs, feats in zip(batch, features):
            embeddings, positions = model.get_input_embeddings(inputs, vision_features=feats)
            ids = [int(i) for i in inputs.input_ids]
            uid = insert_prompt(gen, model, ids, embeddings[0], positions, max_tokens)
            answers[uid] = Decoded(tokenizer, len(ids), tic=tic)
        pending = set(answers)
        while pending:
            for r in gen.next_generated():
                answers[r.uid].add(r.token)
                if r.finish_reason is not None:
                    answers[r.uid].finish(r.finish_reason)
                    pending.discard(r.uid)
    finally:
        gen.close()
    return [GenerationResult(a.detok.text, a.prompt_tokens, len(a.tokens), a.prompt_tps, a.final.generation_tps,
                             a.final.peak_memory, a.final.finish_reason) for a in answers.values()]


def collect(stream, verbose: bool = False) -> "GenerationResult":
    text, last = "", None
    for r in stream:
        text += r.text
        last = r
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
        print_stats(last)
    return GenerationResult(
        text, last.prompt_tokens, last.generation_tokens, last.prompt_tps,
        last.generation_tps, last.peak_memory, last.finish_reason, last.cached_tokens,
    )


def print_stats(r: GenerationResponse, file=sys.stdout) -> None:
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """`--model`, as every command that runs a model takes it."""
    p.add_argument("--model", default=None,
                   help="local model folder (MLX or HF layout) or Hugging Face repo id "
                        "(default: the embedded model, see mlx_vlm_native/default_model/README.md)")


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The sampling and KV-cache flags every command shares, checked before any model loads."""
    checked = check_generation_params(args.max_tokens, args.temperature, args.top_p, args.seed,
                                      args.repetition_penalty, args.repetition_context_size)
    checked.update(check_cache_params(args.kv_bits, args.kv_group_size, args.quantized_kv_start,
                                      args.max_kv_size))
    return checked


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """mlx-lm's sampling flags, as generate and chat take them (`sampling_from_args` checks them)."""
    p.add_argument("--temperature", "--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty for repeating tokens (> 0; 1 or unset: none)")
    p.add_argument("--repetition-context-size", type=int, default=20,
                   help="how many recent tokens the repetition penalty looks at")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """mlx-lm's flags for adapters, the system prompt and the KV cache, as
    generate, chat and serve take them."""
    p.add_argument("--adapter-path", default=None,
                   help="a folder of LoRA/DoRA adapters (adapters.safetensors + adapter_config.json)")
    p.add_argument("--system-prompt", default=None, help="a system message before the conversation")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="quantize the KV cache to this many bits (default: no quantization)")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the KV-cache quantization")
    p.add_argument("--quantized-kv-start", type=int, default=5000,
                   help="quantize the KV cache once it holds this many tokens (with --kv-bits)")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="most tokens the KV cache holds (a rotating cache; default: unbounded)")


def check_cli_text(text: str, flag: str) -> None:
    """Command-line text that is not UTF-8 arrives with its bad bytes as lone surrogates."""
    at = invalid_unicode(text)
    if at is not None:
        byte = ord(text[at]) - 0xDC00 if 0xDC80 <= ord(text[at]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"\\u{ord(text[at]):04x}"
        raise ValueError(f"{flag} is not valid UTF-8 ({what} at character {at}); check the terminal's encoding")


def check_video_frames(model, processor, num_frames: int) -> None:
    """--video-frames against the context, before any frame is decoded."""
    if num_frames < 1:
        raise ValueError(f"--video-frames must be at least 1, got {num_frames}")
    count = getattr(processor, "num_video_tokens", None)
    tokens = count(num_frames) if count is not None else num_frames
    if tokens > context_length(model):
        raise ValueError(f"--video-frames {num_frames} makes {tokens} video tokens, over the model's context of "
                         f"{context_length(model)} tokens")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer a prompt about images or a video.")
    add_model_argument(p)
    p.add_argument("--image", nargs="+", default=[], help="image paths or URLs")
    p.add_argument("--video", default=None,
                   help="a folder of frames or an animated GIF/WebP")
    p.add_argument("--video-frames", type=int, default=8, help="frames sampled from --video")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    add_sampling_arguments(p)
    p.add_argument("--no-chat-template", action="store_true",
                   help="use --prompt as the full prompt (it must contain the placeholders)")
    add_runtime_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        sampling = sampling_from_args(args)
        check_cli_text(args.prompt, "--prompt")
        if args.system_prompt is not None:
            check_cli_text(args.system_prompt, "--system-prompt")
        model, processor = load(args.model, adapter_path=args.adapter_path)
        if args.video:
            check_video_frames(model, processor, args.video_frames)
        videos = [load_video_frames(args.video, args.video_frames)] if args.video else []
        generate(
            model, processor, args.prompt, images=args.image, videos=videos,
            apply_chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
            verbose=True, **sampling,
        )
        print(f"Execution path: {model.execution_path}")
    except (ImageError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
