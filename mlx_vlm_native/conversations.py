"""One parser of conversations, used by every training task and by the
server: the LLaVA form (`{"images": [...], "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`) and
the OpenAI form (`{"messages": [{"role": "user", "content": [{"type":
"image_url", "image_url": {"url": ...}}, {"type": "text", "text": ...}]}]}`),
with one map of speaker names to roles (`ROLES`). Problems are ValueErrors
naming the turn and part (`UnsupportedPart` for an unknown part type)."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "developer": "system"}


class UnsupportedPart(ValueError):
    """A content part of a type the parser does not know."""


@dataclass
class Conversation:
    messages: list  # [{"role", "content": str or [parts]}], media parts as {"type": "image"/"video"}
    images: List[str]
    videos: List[List[str]]


class RecordError(ValueError):
    """A JSONL record that cannot be trained on; the message names the file and line."""


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    return value


def llava_content(value: str) -> list:
    """'<image>\\nWhat is it?' -> [{"type": "image"}, {"type": "text", ...}]."""
    parts = []
    for piece in re.split(r"(<image>|<video>)", value):
        if piece in ("<image>", "<video>"):
            parts.append({"type": piece[1:-1]})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip("\n")})
    return parts


def openai_content(content, images: list, videos: list, where: str):
    """One OpenAI message's content -> a string or template parts; the image
    references and video frame lists it holds are appended to `images`, `videos`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        here = f"{where}.content[{i}]"
        if kind in ("image_url", "image"):
            ref = part.get("image_url", part.get("image"))
            images.append(_text(ref.get("url") if isinstance(ref, dict) else ref, f"{here} image"))
            parts.append({"type": "image"})
        elif kind == "video":
            frames = part.get("video")
            if not (isinstance(frames, list) and frames and all(isinstance(f, str) for f in frames)):
                raise ValueError(f"{here}.video must be a non-empty list of frame paths")
            videos.append(frames)
            parts.append({"type": "video"})
        elif kind == "text":
            parts.append({"type": "text", "text": _text(part.get("text"), f"{here}.text")})
        else:
            raise UnsupportedPart(f"unsupported content part type {kind!r} in {here}")
    return parts


def resolve(path: str, root: Path) -> str:
    if re.match(r"^(https?:|data:)", path) or Path(path).is_absolute():
        return path
    return str(root / path)


def check_role_order(roles: List[str]) -> None:
    """An optional system turn first, then user and assistant taking turns from a user."""
    body = roles[1:] if roles and roles[0] == "system" else roles
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i + len(roles) - len(body) + 1} is {role!r} where {expected!r} was due "
                             f"(roles: {', '.join(roles)}): a conversation is an optional system turn, then "
                             "user and assistant in turn")


def parse_record(record, root: Path) -> Conversation:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    images, videos = [], []
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list of {from, value}")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise ValueError(f"conversations[{i}] must be an object {{from, value}}")
            speaker = turn.get("from")
            role = ROLES.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise ValueError(f"conversations[{i}]: unknown speaker {speaker!r}; use one of {sorted(ROLES)}")
            value = _text(turn.get("value"), f"conversations[{i}].value")
            messages.append({"role": role, "content": llava_content(value) if role == "user" else value})
        images = record.get("images", [record["image"]] if "image" in record else [])
        if not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
            raise ValueError("'images' must be a list of paths (or 'image' one path)")
        videos = [record["video"]] if isinstance(record.get("video"), list) else []
    elif "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        messages = []
        for i, m in enumerate(record["messages"]):
            role = m.get("role") if isinstance(m, dict) else None
            if not isinstance(role, str) or role not in ROLES:
                raise ValueError(f"messages[{i}]: unknown role {role!r}; use one of {sorted(ROLES)}")
            content = openai_content(m.get("content"), images, videos, f"messages[{i}]")
            messages.append({"role": ROLES[role], "content": content})
    else:
        raise ValueError("a record needs 'conversations' (LLaVA form) or 'messages' (OpenAI form)")
    check_role_order([m["role"] for m in messages])
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a conversation needs at least one assistant turn to learn from")
    n_image_parts = sum(
        1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"
    )
    if n_image_parts != len(images):
        raise ValueError(f"{n_image_parts} image placeholder(s) but {len(images)} image(s)")
    images = [resolve(i, root) for i in images]
    videos = [[resolve(f, root) for f in v] for v in videos]
    for path in images + [f for v in videos for f in v]:
        if not re.match(r"^(https?:|data:)", path) and not Path(path).exists():
            raise FileNotFoundError(f"image not found: {path}")
    return Conversation(messages, images, videos)
