"""Prompt helpers shared by the processors: chat templates and placeholder expansion."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


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


def user_turn(tokenizer, template: Optional[str], content: list, fallback: str) -> str:
    """One user message through the chat template, ready for the answer."""
    template = template or getattr(tokenizer, "chat_template", None)
    if template is None:
        return fallback
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
