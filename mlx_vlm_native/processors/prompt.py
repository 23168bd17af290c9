"""Prompt helpers shared by the processors: chat templates and placeholder expansion."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import Processor


def expand_placeholders(ids: Sequence[int], expansions: Dict[int, Tuple[str, List[int]]]) -> np.ndarray:
    """Repeat each placeholder token by its item's token count.

    `expansions` maps a placeholder id to (kind, counts in prompt order); the
    number of placeholders must equal the number of items of that kind."""
    ids = list(ids)
    for token, (kind, counts) in expansions.items():
        found = ids.count(token)
        if found != len(counts):
            raise ValueError(
                f"the prompt has {found} {kind} placeholder(s) but {len(counts)} {kind}(s) were given"
            )
    out, next_index = [], {t: 0 for t in expansions}
    for t in ids:
        if t in expansions:
            out.extend([t] * expansions[t][1][next_index[t]])
            next_index[t] += 1
        else:
            out.append(t)
    return np.array(out, dtype=np.int32)


def load_chat_template(path: Path) -> Optional[str]:
    path = Path(path)
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    for name in ("processor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            template = json.loads(f.read_text()).get("chat_template")
            if template:
                return template
    return None


def render_messages(tokenizer, template: Optional[str], messages: list, add_generation_prompt: bool = True):
    """Messages through the chat template (None when the model has none)."""
    template = template or getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def user_turn(tokenizer, template: Optional[str], prompt: str, num_images: int, num_videos: int,
              fallback: str) -> str:
    """One user message (media first, then the text) through the chat template,
    ready for the answer; `fallback` when the model has no template."""
    content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    content = content + [{"type": "text", "text": prompt}]
    text = render_messages(tokenizer, template, [{"role": "user", "content": content}])
    return fallback if text is None else text


class ChatTemplateMessages(Processor):
    """`format_messages` for processors whose chat template places the media."""

    def format_messages(self, messages: list, add_generation_prompt: bool = True) -> str:
        text = render_messages(self.tokenizer, self.chat_template, messages, add_generation_prompt)
        if text is None:
            raise ValueError("this model folder has no chat template; multi-turn data needs one")
        return text
