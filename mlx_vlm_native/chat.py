"""`mlx-vlm-native chat --image photo.jpg`: talk about images in the terminal,
the conversation kept (docs/generation.md); stdin may be a pipe, one question
or command per line."""

import argparse
import itertools
import shlex
import sys
from typing import Iterable, Iterator, List, Optional

from .generate import (
    DEFAULT_MODEL_NAME, ConversationCache, PromptTooLongError, add_model_argument, add_runtime_arguments,
    add_sampling_arguments, check_cli_text, sampling_from_args, stream_chat,
)
from .processors.image import ImageError, load_image
from .utils import load

HELP = """commands:
  /image PATH [PATH...]  new image(s): start a new conversation about them
  /reset                 forget the conversation, keep the images
  /help                  this help
  /quit                  leave (end of input, Ctrl-D, does the same)
anything else is a question about the current image(s)"""


class Conversation:
    """The current images and the turns about them, which start at an image
    change or a /reset (so the images go into the first user turn). `cache`
    holds what the model has read of it: a new question costs only its own tokens."""

    def __init__(self, images: Iterable = (), system_prompt: Optional[str] = None):
        self.system_prompt = system_prompt
        self.images = list(images)
        self.turns: List[dict] = []  # {"role": "user" | "assistant", "content": str}
        self.cache = ConversationCache()

    def new_images(self, images: Iterable) -> None:
        self.images = list(images)
        self.turns = []
        self.cache = ConversationCache()  # the cached image tokens were of the old images

    def reset(self) -> None:
        self.turns = []

    def ask(self, question: str) -> None:
        self.turns.append({"role": "user", "content": question})

    def answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def withdraw_question(self) -> None:
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def messages(self) -> List[dict]:
        messages = [dict(turn) for turn in self.turns]
        if messages and self.images:
            parts = [{"type": "image"} for _ in self.images]
            messages[0]["content"] = parts + [{"type": "text", "text": messages[0]["content"]}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def drop_oldest_exchange(self) -> bool:
        """Forget the oldest question and answer, never the first exchange when it
        carries the images, nor the pending question. False when nothing is left to drop."""
        first = 2 if self.images else 0
        if len(self.turns) - first < 3:
            return False
        del self.turns[first : first + 2]
        return True


def start_answer(model, processor, conversation: Conversation, sampling: dict, err=sys.stderr) -> Iterator:
    """The answer's stream, primed so that bad input raises before any text
    shows; while the conversation is too long for the context, its oldest exchanges go."""
    while True:
        stream = stream_chat(model, processor, conversation.messages(), conversation.images,
                             conversation=conversation.cache, **sampling)
        try:
            return itertools.chain([next(stream)], stream)
        except PromptTooLongError:
            if not conversation.drop_oldest_exchange():
                raise
            print("(the conversation is too long for the model's context: "
                  "the oldest exchange is forgotten)", file=err)


def reply(model, processor, conversation: Conversation, question: str, sampling: dict,
          verbose: bool = False, out=sys.stdout, err=sys.stderr) -> None:
    """Stream the answer to `question` and keep both in the conversation."""
    conversation.ask(question)
    try:
        stream = start_answer(model, processor, conversation, sampling, err)
    except ValueError as e:
        conversation.withdraw_question()
        print(f"error: {e}", file=err)
        return
    text, last = "", None
    try:
        for last in stream:
            text += last.text
            print(last.text, end="", flush=True, file=out)
    except KeyboardInterrupt:
        print("\n(interrupted)", end="", file=out)
    print(file=out)
    conversation.answer(text)
    if verbose and last is not None:
        print(f"[prompt: {last.prompt_tokens} tokens ({last.cached_tokens} cached), {last.prompt_tps:.1f} tokens/s; "
              f"answer: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s]", file=out)


def run_command(line: str, conversation: Conversation, out=sys.stdout, err=sys.stderr) -> bool:
    """Carry out a /command; False when it is time to leave."""
    try:
        name, *args = shlex.split(line)
    except ValueError as e:
        print(f"error: {e}", file=err)
        return True
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        print(HELP, file=out)
    elif name == "/reset":
        conversation.reset()
        print("(conversation cleared; the images are kept)", file=out)
    elif name == "/image":
        if not args:
            print("usage: /image PATH [PATH...]", file=err)
            return True
        try:
            images = [load_image(path) for path in args]
        except ImageError as e:
            print(f"error: {e} (the current images and conversation are kept)", file=err)
            return True
        conversation.new_images(images)
        print(f"(new conversation about {', '.join(args)})", file=out)
    else:
        print(f"unknown command {name}; /help lists them", file=err)
    return True


def chat_loop(model, processor, conversation: Conversation, lines: Iterable[str], sampling: dict,
              verbose: bool = False, out=sys.stdout, err=sys.stderr) -> None:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            check_cli_text(line, "the line")
        except ValueError as e:
            print(f"error: {e}", file=err)
            continue
        if line.startswith("/"):
            if not run_command(line, conversation, out, err):
                return
            continue
        reply(model, processor, conversation, line, sampling, verbose, out, err)


def read_lines(prompt: str) -> Iterator[str]:
    # bytes that are not UTF-8 arrive as lone surrogates, which chat_loop refuses line by line
    sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            if prompt:  # leave the terminal on a fresh line
                print()
            return


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat about images in the terminal (/help for commands).")
    add_model_argument(p)
    p.add_argument("--image", nargs="+", default=[], help="image paths or URLs to talk about")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens per answer")
    add_sampling_arguments(p)
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each answer")
    add_runtime_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    try:
        sampling = sampling_from_args(args)
        conversation = Conversation([load_image(path) for path in args.image], args.system_prompt)
        print(f"loading {args.model or DEFAULT_MODEL_NAME} ...", file=sys.stderr, flush=True)
        model, processor = load(args.model, adapter_path=args.adapter_path)
    except (ImageError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.verbose:
        print(f"execution path: {model.execution_path}", file=sys.stderr, flush=True)
    print("ready: ask about the image(s); /help lists the commands", file=sys.stderr, flush=True)
    prompt = "> " if sys.stdin.isatty() else ""
    chat_loop(model, processor, conversation, read_lines(prompt), sampling, args.verbose)


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
