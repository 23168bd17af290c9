"""OpenAI's chat completions API as the server speaks it: a request body
parsed and checked into the chat template's messages, image URLs (fetched
within limits) and sampling options, and the reply, stream-chunk and
logprobs objects. Every bad field is an `APIError` naming it."""

import dataclasses
import json
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import mlx.core as mx
import numpy as np

from .conversations import ROLES, UnsupportedPart, openai_content
from .http_limits import APIError, json_values
from .params import GenerationParameterError, check_generation_params
from .processors.image import (
    ImageError, ImageTooLargeError, check_pixels, fetch_url, load_image, open_image, oriented_size, read_data_url, short,
)
from .weights.validation import invalid_unicode

MAX_JSON_VALUES = 100_000  # objects, arrays, members and items in a request body (serve's Limits default)

# ----------------------------------------------------------------- request parsing


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(body: bytes, max_values: int = MAX_JSON_VALUES) -> dict:
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

    def decode(self, limits):
        try:
            return load_image(self.data, max_pixels=limits.max_image_pixels)
        except ImageError as e:
            raise image_error(e)


def fetch_request_image(url: str, limits) -> RequestImage:
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


def request_images(urls: List[str], limits) -> List[RequestImage]:
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


def logprob_entry(tokenizer, token: int, logprobs: mx.array, top: int) -> dict:
    """OpenAI's logprobs entry of one sampled token: its log-probability and the `top` likeliest."""
    values = np.array(logprobs.astype(mx.float32))

    def entry(t: int) -> dict:
        text = tokenizer.decode([t])
        return {"token": text, "logprob": float(values[t]), "bytes": list(text.encode("utf-8"))}

    best = np.argsort(-values, kind="stable")[:top] if top else []
    return {**entry(token), "top_logprobs": [entry(int(t)) for t in best]}
