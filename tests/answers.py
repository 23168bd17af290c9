"""Properties of the default model's answers, instead of golden strings tied to
one set of weights: an answer about `examples/images/circle.png` (a green
circle) must name green; which words it wraps them in may change with training."""

import re


def names(text: str, *words: str) -> bool:
    """Whether `text` names every one of `words` (whole words, any case)."""
    return all(re.search(rf"\b{re.escape(w)}\b", text, re.I) for w in words)
