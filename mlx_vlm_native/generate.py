"""Generate text about images and videos: Python API and `generate` command."""

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .params import GenerationParameterError, check_cache_params, check_generation_params
from .validation import invalid_unicode
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
    cached_tokens: int = 0  # prompt tokens a PromptCache already held


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
class PromptCache:
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


def cached_embeddings(model, inputs, cache: PromptCache):
    """The prompt's embeddings and positions, with the images encoded once per PromptCache."""
    if cache.vision_features is None:
        cache.vision_features = model.encode_vision([inputs])[0]
    return model.get_input_embeddings(inputs, vision_features=cache.vision_features)


def stream_generate(
    model,
    processor,
    prompt: str,
    images: Optional[Sequence] = None,
    videos: Optional[Sequence[Sequence]] = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    apply_chat_template: bool = True,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    system_prompt: Optional[str] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    max_kv_size: Optional[int] = None,
) -> Generator[GenerationResponse, None, None]:
    """Yield the answer piece by piece; the last response carries the stats.
    A bad sampling parameter raises `GenerationParameterError` (a ValueError)
    at the first `next()`, before any image is processed. The KV-cache
    options are mlx-lm's (`check_cache_params`)."""
    tic = time.perf_counter()
    sampling = check_generation_params(max_tokens, temperature, top_p, seed, repetition_penalty,
                                       repetition_context_size)
    sampling.update(check_cache_params(kv_bits, kv_group_size, quantized_kv_start, max_kv_size))
    check_kv_group_size(model, kv_bits, kv_group_size)
    inputs = prepare_inputs(model, processor, prompt, images, videos, apply_chat_template, system_prompt)
    yield from stream_from_inputs(model, processor, inputs, tic, **sampling)


def stream_chat(
    model,
    processor,
    messages: list,
    images: Sequence = (),
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    max_kv_size: Optional[int] = None,
) -> Generator[GenerationResponse, None, None]:
    """`stream_generate` for a conversation: `messages` as in `prepare_chat_inputs`.
    With a `prompt_cache` kept across the turns of one conversation, each turn
    prefills only its new tokens. Bad input (a sampling parameter out of range,
    a prompt too long for the context) raises on the first `next()`."""
    tic = time.perf_counter()
    sampling = check_generation_params(max_tokens, temperature, top_p, seed, repetition_penalty,
                                       repetition_context_size)
    sampling.update(check_cache_params(kv_bits, kv_group_size, quantized_kv_start, max_kv_size))
    check_kv_group_size(model, kv_bits, kv_group_size)
    inputs = prepare_chat_inputs(model, processor, messages, images)
    if prompt_cache is None:
        yield from stream_from_inputs(model, processor, inputs, tic, **sampling)
        return
    embeddings, positions = cached_embeddings(model, inputs, prompt_cache)
    ids = [int(i) for i in inputs.input_ids]
    keep = prompt_cache.reuse(model, ids)
    for r in stream_from_embeddings(model, processor.tokenizer, inputs.input_ids, embeddings[0], positions, tic,
                                    kv_cache=prompt_cache.kv, cached=keep, **sampling):
        if r.token is not None:
            prompt_cache.ids.append(r.token)
        yield r


def stream_from_inputs(model, processor, inputs, tic, **sampling):
    embeddings, positions = model.get_input_embeddings(inputs)
    yield from stream_from_embeddings(model, processor.tokenizer, inputs.input_ids, embeddings[0], positions, tic,
                                      **sampling)


class PromptForward:
    """`model` as mlx-lm's `generate_step` calls it (tokens, cache,
    input_embeddings), with the prompt's positions passed to every forward."""

    def __init__(self, model, positions):
        self.model, self.positions = model, positions

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.model(inputs, cache=cache, input_embeddings=input_embeddings, positions=self.positions)


def stream_from_embeddings(model, tokenizer, input_ids, embeddings, positions, tic, max_tokens=256,
                           temperature=0.0, top_p=1.0, seed=None, kv_cache=None, cached=0,
                           repetition_penalty=None, repetition_context_size=20, kv_bits=None,
                           kv_group_size=64, quantized_kv_start=5000, max_kv_size=None):
    """Generate after the prompt `input_ids` / `embeddings` / `positions` (as
    `get_input_embeddings` gives them), of which the first `cached` tokens are
    already in `kv_cache`. The sampling parameters are those
    `check_generation_params` passed."""
    n_prompt = len(input_ids)
    max_tokens = min(max_tokens, context_length(model) - n_prompt)
    if seed is not None:
        mx.random.seed(seed)
    detok = tokenizer.detokenizer
    detok.reset()
    sampler = make_sampler(temp=temperature, top_p=top_p)
    steps = generate_step(
        mx.array(input_ids[cached:]),
        PromptForward(model, positions),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=make_logits_processors(None, repetition_penalty, repetition_context_size),
        prompt_cache=kv_cache if kv_cache is not None else new_cache(model, max_kv_size),
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        input_embeddings=embeddings[cached:],
    )
    n, token = 0, None
    prompt_tps = gen_tic = None
    for n, (token, _) in enumerate(steps, start=1):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = (n_prompt - cached) / prompt_time
            gen_tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detok.add_token(token)
        yield GenerationResponse(
            detok.last_segment, token, n_prompt, prompt_tps, n,
            n / max(time.perf_counter() - gen_tic, 1e-9), mx.get_peak_memory() / 1e9, None, cached,
        )
    detok.finalize()
    finish = "stop" if token in tokenizer.eos_token_ids else "length"
    gen_time = time.perf_counter() - gen_tic if gen_tic else 0.0
    yield GenerationResponse(
        detok.last_segment, None, n_prompt, prompt_tps or 0.0, n,
        n / gen_time if gen_time else 0.0, mx.get_peak_memory() / 1e9, finish, cached,
    )


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


def prefill(model, input_ids, embeddings: mx.array, positions, cache: list, sampler, logits_processors=(),
            step: int = 2048) -> int:
    """Run a prompt ((L,) ids, (L, D) embeddings, its positions as
    `get_input_embeddings` gives them) into `cache` in chunks as mlx-lm's
    `generate_step` does (all but the last token, then the last one alone) and
    sample the first answer token, after the `logits_processors` (which see the
    prompt's ids, as in `generate_step`)."""
    n = len(input_ids)
    for a in range(0, n - 1, step):
        b = min(a + step, n - 1)
        model(mx.array(input_ids[a:b])[None], cache=cache, input_embeddings=embeddings[None, a:b], positions=positions)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(input_ids[n - 1 :])[None], cache=cache, input_embeddings=embeddings[None, n - 1 :],
                   positions=positions)
    logits = logits[:, -1, :]
    if logits_processors:
        context = mx.array(input_ids)
        for processor in logits_processors:
            logits = processor(context, logits)
    return sampler(logits - mx.logsumexp(logits, keepdims=True)).item()


def batch_generate(model, processor, prompts: Sequence[str], images: Optional[Sequence[Sequence]] = None,
                   apply_chat_template: bool = True, max_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: Optional[int] = None,
                   completion_batch_size: int = 32) -> List["GenerationResult"]:
    """Answer several prompts, each with its own images, decoding them as ONE
    batch. `encode_vision` encodes the images of all prompts in one call (one
    packed tower call for the packed families); each prompt is then prefilled
    alone into its own KV cache, and mlx-lm's `BatchGenerator` merges the
    caches into a batch cache and decodes up to `completion_batch_size`
    sequences together, each leaving the batch when it finishes. Greedy answers are the ones
    `generate` gives, token for token.

    `prompt_tps` of each result counts its own prefill plus its share of the
    packed encoding (by vision tokens); `generation_tps` its tokens over the
    batch's decode time until it finished."""
    checked = check_generation_params(max_tokens, temperature, top_p, seed)
    max_tokens, temperature, top_p, seed = (checked[k] for k in ("max_tokens", "temperature", "top_p", "seed"))
    images = list(images) if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if seed is not None:
        mx.random.seed(seed)
    tokenizer = processor.tokenizer
    eos = set(tokenizer.eos_token_ids)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    tic = time.perf_counter()
    batch = [prepare_inputs(model, processor, p, i, (), apply_chat_template) for p, i in zip(prompts, images)]
    features = model.encode_vision(batch)
    mx.eval([f for f in features if f is not None])
    vision_rows = [0 if f is None else f.shape[0] for f in features]
    encode_shares = [(time.perf_counter() - tic) * r / max(sum(vision_rows), 1) for r in vision_rows]

    answers = [Answer(tokenizer, len(inputs.input_ids)) for inputs in batch]
    pending = {}  # BatchGenerator uid -> index of the prompt
    gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], sampler=sampler,
                         completion_batch_size=completion_batch_size,
                         prefill_batch_size=min(len(batch), completion_batch_size) or 1)
    try:
        for i, (inputs, feats) in enumerate(zip(batch, features)):
            t0 = time.perf_counter()
            embeddings, positions = model.get_input_embeddings(inputs, vision_features=feats)
            cache = make_prompt_cache(model)
            first = prefill(model, inputs.input_ids, embeddings[0], positions, cache, sampler)
            answer = answers[i]
            answer.prompt_tps = answer.prompt_tokens / (time.perf_counter() - t0 + encode_shares[i])
            limit = min(max_tokens, context_length(model) - answer.prompt_tokens)
            if answer.add(first, eos) and limit > 1:
                (uid,) = gen.insert([[first]], max_tokens=[limit - 1], caches=[cache])
                pending[uid] = i
            else:
                answer.finish("stop" if first in eos else "length")
        decode_tic = time.perf_counter()
        for a in answers:
            a.decode_tic = decode_tic
        while pending:
            for r in gen.next_generated():
                answer = answers[pending[r.uid]]
                answer.add(r.token, eos)
                if r.finish_reason is not None:
                    answer.finish(r.finish_reason)
                    del pending[r.uid]
    finally:
        gen.close()
    return [a.result() for a in answers]


class Answer:
    """One sequence of a batch: its tokens, text and timings."""

    def __init__(self, tokenizer, prompt_tokens: int):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.prompt_tokens, self.prompt_tps = prompt_tokens, 0.0
        self.tokens, self.finish_reason = 0, None
        self.decode_tic = self.decode_time = None

    def add(self, token: int, eos) -> bool:
        """Count `token`; False at an end-of-sequence token."""
        self.tokens += 1
        if token in eos:
            return False
        self.detok.add_token(token)
        return True

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.decode_time = time.perf_counter() - self.decode_tic if self.decode_tic else 0.0

    def result(self) -> "GenerationResult":
        self.detok.finalize()
        decoded = self.tokens - 1  # the first token comes with the prefill
        tps = decoded / self.decode_time if self.decode_time and decoded > 0 else 0.0
        return GenerationResult(self.detok.text, self.prompt_tokens, self.tokens, self.prompt_tps,
                                tps, mx.get_peak_memory() / 1e9, self.finish_reason)


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
    except (ImageError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
