"""Test probes on decoding: slow each answer's tokens down and count them, or
record the batch size of every decode call (used by the batching and server tests)."""

import time

from mlx_vlm_native import server as server_module


def slowed_decoding(monkeypatch, seconds_per_token: float = 0.02) -> list:
    """Slow every answer's tokens down (so that requests overlap, or an answer
    outlasts its client) and count them: one count per answer, in the order the
    answers start."""
    counts, original = [], server_module.Decoding.add

    def add(self, token):
        if not self.tokens:
            self.count_index = len(counts)
            counts.append(0)
        counts[self.count_index] += 1
        time.sleep(seconds_per_token)
        original(self, token)

    monkeypatch.setattr(server_module.Decoding, "add", add)
    return counts


def decode_batch_sizes(model, monkeypatch) -> list:
    """The batch size of every token-only (decode) call of the model."""
    sizes, original = [], type(model).__call__

    def recording(self, inputs, cache=None, input_embeddings=None, positions=None):
        if input_embeddings is None:
            sizes.append(inputs.shape[0])
        return original(self, inputs, cache=cache, input_embeddings=input_embeddings, positions=positions)

    monkeypatch.setattr(type(model), "__call__", recording)
    return sizes
