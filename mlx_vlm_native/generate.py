"""Generate text about images and videos: the Python API and the `generate`
command, on mlx-lm's `stream_generate` and `batch_generate` (docs/generation.md)."""

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import batch_generate as mlx_batch_generate
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .engine import PromptReader, attach_prompt
from .params import GenerationParameterError, check_cache_params, check_generation_params
from .weights.validation import invalid_unicode
from .processors.image import ImageError, load_video_frames
from .utils import load

DEFAULT_MODEL_NAME = "mlx-vlm-native-default"  # how the embedded model is named (server, logs)
OPTIONS = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty", "repetition_context_size",
           "kv_bits", "kv_group_size", "quantized_kv_start", "max_kv_size")  # `checked_options`' keywords


@dataclass
class GenerationResponse:
    """One streamed piece of an answer, or (from `generate`) the whole answer."""

    text: str
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


def format_chat(processor, messages: list) -> str:
    """A whole conversation through the chat template, ready for the answer."""
    return processor.format_messages(messages, add_generation_prompt=True)


def process_checked(model, processor, text: str, images=(), videos=()):
    """Rendered prompt + media -> processed inputs, checked against the model's context."""
    inputs = processor(text, images=list(images or []), videos=list(videos or []))
    check_prompt_length(model, len(inputs.input_ids))
    return inputs


def check_chat_length(model, processor, messages: list, image_sizes: Sequence) -> None:
    """Refuse a conversation too long for the context from its images' (width, height) alone."""
    check_prompt_length(model, processor.num_prompt_tokens(format_chat(processor, messages), list(image_sizes)))


def prepare_chat_inputs(model, processor, messages: list, images=(), videos=()):
    """OpenAI-like messages ({"role", "content"}: a string or parts {"type": "text"|"image"|"video"})
    + the media of their parts, in order -> processed, checked inputs."""
    return process_checked(model, processor, format_chat(processor, messages), images, videos)


def prepare_inputs(model, processor, prompt: str, images=(), videos=(), apply_chat_template=True,
                   system_prompt: Optional[str] = None):
    """Prompt + media -> processed, checked inputs; a `system_prompt` goes first, as a system message."""
    images, videos = list(images or []), list(videos or [])
    if system_prompt is None:
        text = processor.format_prompt(prompt, len(images), len(videos)) if apply_chat_template else prompt
        return process_checked(model, processor, text, images, videos)
    if not apply_chat_template:
        raise ValueError("a system prompt needs the chat template (drop --no-chat-template)")
    media = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
    messages = [{"role": "system", "content": system_prompt},
                {"role": "user", "content": media + [{"type": "text", "text": prompt}]}]
    return prepare_chat_inputs(model, processor, messages, images, videos)


def new_cache(model, max_kv_size: Optional[int] = None) -> list:
    """The model's KV cache, or with `max_kv_size` mlx-lm's rotating one (the first 4 tokens kept)."""
    if max_kv_size is None:
        return make_prompt_cache(model)
    return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]


@dataclass
class ConversationCache:
    """What one conversation has run through the language model (its token ids
    and KV cache) and its images' vision features: the next turn prefills only
    what follows the prefix it shares with them. Valid for one set of images."""

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


def checked_options(model=None, max_tokens=256, temperature=0.0, top_p=1.0, seed=None, repetition_penalty=None,
                    repetition_context_size=20, kv_bits=None, kv_group_size=64, quantized_kv_start=5000,
                    max_kv_size=None) -> dict:
    """The generation options, checked (`params`); with a `model`, also the KV
    quantization's group size against its attention head dim."""
    options = check_generation_params(max_tokens, temperature, top_p, seed, repetition_penalty,
                                      repetition_context_size)
    options.update(check_cache_params(kv_bits, kv_group_size, quantized_kv_start, max_kv_size))
    if model is not None and kv_bits is not None:
        t = model.args.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        if head_dim % kv_group_size:
            raise GenerationParameterError("kv_group_size", f"kv_group_size {kv_group_size} must divide the "
                                           f"model's attention head dim {head_dim} to quantize the KV cache")
    return options


def stream_generate(model, processor, prompt: str, images: Optional[Sequence] = None,
                    videos: Optional[Sequence[Sequence]] = None, apply_chat_template: bool = True,
                    system_prompt: Optional[str] = None, **options) -> Generator[GenerationResponse, None, None]:
    """Yield the answer piece by piece; the last response carries the stats.
    `options` are `checked_options`' (`OPTIONS`); a bad one raises
    `GenerationParameterError` (a ValueError) at the first `next()`, before any image is processed."""
    options = checked_options(model, **options)
    inputs = prepare_inputs(model, processor, prompt, images, videos, apply_chat_template, system_prompt)
    yield from stream_from_inputs(model, processor, inputs, **options)


def stream_chat(model, processor, messages: list, images: Sequence = (), conversation: Optional[ConversationCache] = None,
                **options) -> Generator[GenerationResponse, None, None]:
    """`stream_generate` for a conversation (`messages` as in `prepare_chat_inputs`).
    With a `conversation` kept across its turns, each turn prefills only its new tokens."""
    options = checked_options(model, **options)
    inputs = prepare_chat_inputs(model, processor, messages, images)
    yield from stream_from_inputs(model, processor, inputs, conversation=conversation, **options)


def stream_from_inputs(model, processor, inputs, tic=None, conversation: Optional[ConversationCache] = None,
                       max_kv_size=None, seed=None, max_tokens=256, temperature=0.0, top_p=1.0,
                       repetition_penalty=None, repetition_context_size=20, prefill_step_size: int = 2048,
                       **cache_options) -> Generator[GenerationResponse, None, None]:
    """The one-sequence decode after processed `inputs`: mlx-lm's `stream_generate`,
    each response carrying its token's log-probabilities. A `conversation` holds
    the KV cache (`max_kv_size` does not apply to it) and the images' features.
    `tic` is unused (the timings are mlx-lm's)."""
    if seed is not None:
        mx.random.seed(seed)
    ids = [int(i) for i in inputs.input_ids]
    if conversation is None:
        (embeddings, positions), cache, cached = model.get_input_embeddings(inputs), new_cache(model, max_kv_size), 0
    else:
        if conversation.vision_features is None:
            conversation.vision_features = model.encode_vision([inputs])[0]
        embeddings, positions = model.get_input_embeddings(inputs, vision_features=conversation.vision_features)
        cached = conversation.reuse(model, ids)
        cache = conversation.kv
    attach_prompt(cache, embeddings[0], positions)
    steps = mlx_stream_generate(
        PromptReader(model), processor.tokenizer, mx.array(ids[cached:]),
        max_tokens=min(max_tokens, context_length(model) - len(ids)), prompt_cache=cache,
        sampler=make_sampler(temp=temperature, top_p=top_p), prefill_step_size=prefill_step_size,
        logits_processors=make_logits_processors(None, repetition_penalty, repetition_context_size), **cache_options)
    for r in steps:
        stats = (len(ids), r.prompt_tps, r.generation_tokens, r.generation_tps, r.peak_memory)
        if conversation is not None and r.finish_reason != "stop":
            conversation.ids.append(r.token)
        if r.finish_reason is None or r.finish_reason == "length":
            yield GenerationResponse(r.text, r.token, *stats, None, cached, r.logprobs)
        if r.finish_reason is not None:
            yield GenerationResponse("" if r.finish_reason == "length" else r.text, None, *stats,
                                     r.finish_reason, cached)


def generate(model, processor, prompt: str, images=None, videos=None, verbose=False, **kwargs) -> GenerationResponse:
    """Generate a whole answer; with `verbose`, stream it and print the stats."""
    return collect(stream_generate(model, processor, prompt, images, videos, **kwargs), verbose)


def chat_generate(model, processor, messages: list, images: Sequence = (), verbose=False,
                  **kwargs) -> GenerationResponse:
    """The whole answer to a conversation (see `stream_chat`)."""
    return collect(stream_chat(model, processor, messages, images, **kwargs), verbose)


def collect(stream, verbose: bool = False) -> GenerationResponse:
    text, last = "", None
    for last in stream:
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose:
        print(f"\n{'=' * 10}\nPrompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec\n"
              f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec\n"
              f"Peak memory: {last.peak_memory:.3f} GB")
    return dataclasses.replace(last, text=text, logprobs=None)


def batch_generate(model, processor, prompts: Sequence[str], images: Optional[Sequence[Sequence]] = None,
                   apply_chat_template: bool = True, max_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: Optional[int] = None, completion_batch_size: int = 32,
                   prefill_step_size: int = 2048) -> List[GenerationResponse]:
    """Answer several prompts, each with its own images, as ONE batch: the images
    of all prompts encoded in one `encode_vision` call, then mlx-lm's
    `batch_generate` (batched chunked prefill, then up to `completion_batch_size`
    sequences decoded together). Greedy answers are `generate`'s, token for
    token. The tokens-per-second are the batch's, over all its prompts and answers."""
    options = check_generation_params(max_tokens, temperature, top_p, seed)
    images = list(images) if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if seed is not None:
        mx.random.seed(seed)
    batch = [prepare_inputs(model, processor, p, i, (), apply_chat_template) for p, i in zip(prompts, images)]
    ids, caches = [[int(i) for i in inputs.input_ids] for inputs in batch], []
    for inputs, features in zip(batch, model.encode_vision(batch)):
        embeddings, positions = model.get_input_embeddings(inputs, vision_features=features)
        caches.append(model.make_cache())
        attach_prompt(caches[-1], embeddings[0], positions)
    limits = [min(options["max_tokens"], context_length(model) - len(i)) for i in ids]
    out = mlx_batch_generate(
        PromptReader(model), processor.tokenizer, ids, caches, limits, return_token_ids=True,
        sampler=make_sampler(temp=options["temperature"], top_p=options["top_p"]),
        completion_batch_size=completion_batch_size, prefill_step_size=prefill_step_size,
        prefill_batch_size=min(len(batch), completion_batch_size) or 1)
    s = out.stats
    # a finished sequence's stop token is left out of its token ids
    return [GenerationResponse(detokenize(processor.tokenizer, t), None, len(i), s.prompt_tps, len(t) + (len(t) < n),
                               s.generation_tps, s.peak_memory, "length" if len(t) == n else "stop")
            for t, i, n in zip(out.token_ids, ids, limits)]


def detokenize(tokenizer, ids: List[int]) -> str:
    """The text `stream_generate` streams for `ids` (`tokenizer.decode` may differ at the first space)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local model folder (MLX or HF layout) or Hugging Face repo id "
                        "(default: the embedded model, see mlx_vlm_native/default_model/README.md)")


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The sampling and KV-cache flags every command shares, checked before any model loads."""
    return checked_options(None, **{name: getattr(args, name) for name in OPTIONS})


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """mlx-lm's sampling flags, as generate and chat take them."""
    p.add_argument("--temperature", "--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty for repeating tokens (> 0; 1 or unset: none)")
    p.add_argument("--repetition-context-size", type=int, default=20,
                   help="how many recent tokens the repetition penalty looks at")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """mlx-lm's flags for adapters, the system prompt and the KV cache, as generate, chat and serve take them."""
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
    p.add_argument("--video", default=None, help="a folder of frames or an animated GIF/WebP")
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
        options = sampling_from_args(args)
        check_cli_text(args.prompt, "--prompt")
        if args.system_prompt is not None:
            check_cli_text(args.system_prompt, "--system-prompt")
        model, processor = load(args.model, adapter_path=args.adapter_path)
        if args.video:
            check_video_frames(model, processor, args.video_frames)
        videos = [load_video_frames(args.video, args.video_frames)] if args.video else []
        generate(model, processor, args.prompt, images=args.image, videos=videos, verbose=True,
                 apply_chat_template=not args.no_chat_template, system_prompt=args.system_prompt, **options)
        print(f"Execution path: {model.execution_path}")
    except (ImageError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
