"""batch_generate decodes all prompts as one batch (mlx-lm's BatchGenerator on
merged KV caches): greedy answers equal one-by-one `generate` token for token,
the decoder runs on the whole batch at once, and finished sequences leave it."""

import mlx.core as mx
import pytest

from conftest import make_image
from decoding_probes import decode_batch_sizes
from mlx_vlm_native import batch_generate, generate, load
from mlx_vlm_native.models.qwen2_vl import BatchMRoPECache, MRoPECache
from convert.write_hf_release import write_checkpoint

PROMPTS = ["One image.", "Two images, and a longer question about both of them.", "No image.", "A tall image."]
IMAGES = [[make_image(120, 200, 1)], [make_image(60, 60, 2), make_image(300, 90, 3)], [],
          [make_image(400, 50, 4)]]


@pytest.fixture(scope="module", params=["tiny", "qwen2-vl-tiny", "qwen2.5-vl-tiny", "default"])
def loaded(request, tmp_path_factory):
    if request.param == "default":
        return load(None)
    return load(str(write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)))


def test_batched_greedy_answers_equal_unbatched(loaded, monkeypatch):
    model, processor = loaded
    singles = [generate(model, processor, p, images=i, max_tokens=10) for p, i in zip(PROMPTS, IMAGES)]
    sizes = decode_batch_sizes(model, monkeypatch)
    batched = batch_generate(model, processor, PROMPTS, images=IMAGES, max_tokens=10)
    for one, many in zip(singles, batched):
        assert many.text == one.text
        assert (many.generation_tokens, many.finish_reason) == (one.generation_tokens, one.finish_reason)
        assert many.prompt_tokens == one.prompt_tokens
    # one decode step for the whole batch, not one per prompt
    assert max(sizes) == len(PROMPTS)
    assert len(sizes) <= max(r.generation_tokens for r in batched)
    assert sizes == sorted(sizes, reverse=True)  # finished sequences leave, none come back


def test_finished_sequences_leave_the_batch(monkeypatch):
    """The default model answers in few tokens and stops: the batch shrinks."""
    model, processor = load(None)
    images = [[make_image(128, 128, s)] for s in range(3)]
    prompts = ["How many shapes are there?", "What colour is the largest shape?", "Describe the image."]
    singles = [generate(model, processor, p, images=i, max_tokens=40) for p, i in zip(prompts, images)]
    sizes = decode_batch_sizes(model, monkeypatch)
    batched = batch_generate(model, processor, prompts, images=images, max_tokens=40)
    assert [r.text for r in batched] == [r.text for r in singles]
    assert all(r.finish_reason == "stop" for r in batched)
    if len({r.generation_tokens for r in batched}) > 1:
        assert sizes[-1] < len(prompts)


def test_stats_are_per_prompt(loaded):
    model, processor = loaded
    batched = batch_generate(model, processor, PROMPTS[:2], images=IMAGES[:2], max_tokens=4)
    for r in batched:
        assert r.prompt_tps > 0 and r.generation_tps > 0
        assert r.generation_tokens == 4 or r.finish_reason == "stop"


def test_one_token_and_empty_batches(loaded):
    model, processor = loaded
    one = generate(model, processor, PROMPTS[0], images=IMAGES[0], max_tokens=1)
    (batched,) = batch_generate(model, processor, PROMPTS[:1], images=IMAGES[:1], max_tokens=1)
    assert (batched.text, batched.generation_tokens) == (one.text, one.generation_tokens)
    assert batch_generate(model, processor, [], images=[]) == []
    with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
        batch_generate(model, processor, PROMPTS[:2], images=IMAGES[:1])


def test_mrope_batch_cache_keeps_each_sequence_delta():
    """The per-sequence M-RoPE deltas follow the sequences through merge,
    extend, filter and extract, as the KV rows do."""
    def cache(length, delta):
        c = MRoPECache()
        c.update_and_fetch(mx.ones((1, 2, length, 4)) * delta, mx.ones((1, 2, length, 4)))
        c.rope_delta = delta
        return c

    batch = MRoPECache.merge([cache(3, -5), cache(5, 7)])
    assert isinstance(batch, BatchMRoPECache)
    batch.extend(MRoPECache.merge([cache(2, 11)]))
    assert batch.rope_deltas.tolist() == [-5, 7, 11]
    assert batch.offset.tolist() == [3, 5, 2]
    batch.filter([0, 2])
    assert batch.rope_deltas.tolist() == [-5, 11]
    out = batch.extract(1)
    assert isinstance(out, MRoPECache) and out.rope_delta == 11 and out.offset == 2
    assert float(out.keys.max()) == 11
