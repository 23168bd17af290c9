"""The one adapter between a vision-language model and mlx-lm's generation
machinery (`generate_step`, `stream_generate`, `BatchGenerator`).

mlx-lm calls a model as `model(tokens, cache=cache)`: token ids only, in
chunks of `prefill_step_size` and then one token per step, for one sequence
or a batch. A VLM prompt is more than its ids: the image placeholders take
the vision features, and Qwen2-VL's tokens take (3, L) M-RoPE positions. So
each sequence's KV cache carries its prompt (`Prompt`: embeddings, positions,
how many tokens the cache holds), and `PromptReader` turns each call mlx-lm
makes into the model's full call, reading from every sequence's prompt the
rows of the tokens it is given. The prompt travels with its sequence through
mlx-lm's batch merge, extend, filter and extract (`BatchPromptKVCache`), so
mlx-lm's continuous batching, chunked and batched prefill work unchanged.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache


@dataclass
class Prompt:
    """One sequence's prompt as its cache carries it."""

    embeddings: Optional[mx.array] = None  # (L, D), vision features in place
    positions: Optional[np.ndarray] = None  # (3, L) M-RoPE positions, or None for 1-D ones
    delta: int = 0  # generated token t (t >= L) sits at position t + delta
    consumed: int = 0  # tokens of this sequence the KV cache holds

    @property
    def length(self) -> int:
        return 0 if self.embeddings is None else self.embeddings.shape[0]

    def rows(self, n: int) -> mx.array:
        """The embeddings of the next `n` tokens, zero rows past the prompt (padding)."""
        out = self.embeddings[self.consumed : self.consumed + n]
        if out.shape[0] < n:
            out = mx.concatenate([out, mx.zeros((n - out.shape[0], out.shape[1]), out.dtype)])
        return out

    def next_positions(self, n: int) -> np.ndarray:
        """(3, n) positions of the next `n` tokens."""
        index = np.arange(self.consumed, self.consumed + n)
        pos = np.broadcast_to(index + self.delta, (3, n)).copy()
        if self.positions is not None:
            inside = index < self.positions.shape[1]
            pos[:, inside] = self.positions[:, index[inside]]
        return pos


class PromptKVCache(KVCache):
    """mlx-lm's KVCache plus the `Prompt` of its sequence (on the first layer's cache)."""

    def __init__(self):
        super().__init__()
        self.prompt: Optional[Prompt] = None

    @classmethod
    def merge(cls, caches):
        return BatchPromptKVCache.merge(caches)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        quantized = super().to_quantized(group_size, bits)
        quantized.prompt = self.prompt
        return quantized


class BatchPromptKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache plus each sequence's `Prompt`, kept in step with the
    rows as sequences join (merge, extend) and leave (filter, extract)."""

    single = PromptKVCache

    def __init__(self, left_padding: List[int]):
        super().__init__(left_padding)
        self.prompts: List[Optional[Prompt]] = [None] * len(left_padding)
        self.chunk_lengths: Optional[List[int]] = None

    @classmethod
    def merge(cls, caches):
        batch = cls([0] * len(caches)) if max(c.size() for c in caches) == 0 else super().merge(caches)
        batch.prompts = [getattr(c, "prompt", None) for c in caches]
        return batch

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        super().prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        self.chunk_lengths = lengths  # the real tokens of each row in the next, right-padded call

    def filter(self, batch_indices):
        super().filter(batch_indices)
        keep = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        self.prompts = [self.prompts[i] for i in keep]

    def extend(self, other):
        super().extend(other)
        self.prompts = self.prompts + list(getattr(other, "prompts", [None] * other.offset.shape[0]))

    def extract(self, idx):
        plain = super().extract(idx)
        cache = self.single()
        cache.keys, cache.values, cache.offset = plain.keys, plain.values, plain.offset
        cache.prompt = self.prompts[idx]
        return cache


def prompts_of(cache) -> List[Optional[Prompt]]:
    """The prompts a cache list carries, one per sequence."""
    first = cache[0] if cache else None
    if hasattr(first, "prompts"):
        return first.prompts
    return [getattr(first, "prompt", None)]


def attach_prompt(cache: list, embeddings: mx.array, positions: Optional[np.ndarray]) -> Prompt:
    """Give a sequence's cache its prompt: (L, D) embeddings and (3, L) positions
    (or None). The cache may already hold a prefix of it."""
    delta = 0 if positions is None or not positions.size else int(positions.max()) + 1 - positions.shape[-1]
    prompt = Prompt(embeddings, positions, delta, cache[0].offset)
    cache[0].prompt = prompt
    return prompt


class PromptReader(nn.Module):
    """`model` as mlx-lm calls it, `model(tokens, cache=cache)`, each sequence's
    embeddings and positions read from the `Prompt` its cache carries."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        prompts = prompts_of(cache)
        if input_embeddings is not None or all(p is None for p in prompts):
            return self.model(inputs, cache=cache, input_embeddings=input_embeddings)
        B, n = inputs.shape
        lengths = getattr(cache[0], "chunk_lengths", None) or [n] * B
        embeds = positions = None
        reading = [p is not None and p.consumed < p.length for p in prompts]
        if any(reading):
            if not all(reading):
                raise RuntimeError("a call mixes prompt and decode rows, which mlx-lm's batches never do")
            embeds = mx.stack([p.rows(n) for p in prompts])
        if any(p is not None and p.positions is not None and p.consumed < p.positions.shape[1] for p in prompts):
            positions = np.stack([p.next_positions(n) for p in prompts])  # else: offset + delta, the model's own
        for p, k in zip(prompts, lengths):
            if p is not None:
                p.consumed += k
                if p.consumed >= p.length:
                    p.embeddings = None  # read: free it
        if hasattr(cache[0], "chunk_lengths"):
            cache[0].chunk_lengths = None
        return self.model(inputs, cache=cache, input_embeddings=embeds, positions=positions)
