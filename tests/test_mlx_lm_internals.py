"""The mlx-lm internals this package relies on exist with the signatures it
uses, so that an mlx-lm upgrade fails here, not at a user's first request
(pyproject bounds mlx-lm to the tested minor version)."""

import inspect
import sys

import mlx.core as mx
import mlx_lm.generate  # noqa: F401
import mlx_lm.utils
from mlx_lm.models import base, cache, qwen2

g = sys.modules["mlx_lm.generate"]  # the module (mlx_lm exports a function of that name)


def params(f) -> set:
    return set(inspect.signature(f).parameters)


def test_generation_entry_points():
    assert {"prompt", "model", "max_tokens", "sampler", "logits_processors", "prompt_cache",
            "prefill_step_size", "kv_bits", "kv_group_size", "quantized_kv_start"} <= params(g.generate_step)
    assert {"model", "tokenizer", "prompt", "max_tokens"} <= params(g.stream_generate)
    assert {"model", "stop_tokens", "sampler", "completion_batch_size", "prefill_batch_size",
            "prefill_step_size", "stream"} <= params(g.BatchGenerator.__init__)
    assert {"prompts", "max_tokens", "caches", "all_tokens", "samplers", "logits_processors"} <= params(
        g.BatchGenerator.insert)
    for name in ("next", "next_generated", "remove", "close"):
        assert callable(getattr(g.BatchGenerator, name))
    response = {f for f in g.GenerationBatch.Response.__dataclass_fields__}
    assert {"uid", "token", "logprobs", "finish_reason", "prompt_cache", "all_tokens"} <= response
    assert {"text", "token", "logprobs", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory",
            "finish_reason"} <= set(g.GenerationResponse.__dataclass_fields__)


def test_batch_cache_hooks_the_engine_extends():
    """`engine.BatchPromptKVCache` follows its sequences through these: the prompt
    batch merges caches with `merge`, pads with `prepare(lengths=, right_padding=)`,
    moves rows with `filter`/`extend`/`extract`; `offset` is per sequence."""
    assert {"left_padding", "lengths", "right_padding"} <= params(cache.BatchKVCache.prepare)
    for name in ("merge", "filter", "extend", "extract", "finalize", "make_mask"):
        assert callable(getattr(cache.BatchKVCache, name))
    batch = cache.BatchKVCache.merge([cache.KVCache(), cache.KVCache()])
    assert isinstance(batch.offset, mx.array) and batch.offset.shape == (2,)
    assert callable(cache.KVCache.merge) and callable(cache.KVCache.to_quantized)
    assert {"max_size", "max_bytes"} <= params(cache.LRUPromptCache.__init__)
    for name in ("fetch_nearest_cache", "insert_cache"):
        assert callable(getattr(cache.LRUPromptCache, name))
    assert callable(cache.trim_prompt_cache) and callable(cache.can_trim_prompt_cache)


def test_qwen2_attention_takes_its_positions_from_the_cache():
    """Qwen2-VL's M-RoPE reaches mlx-lm's attention as `cache.offset`
    (`qwen2_vl.PositionedCache`); the mask comes from `cache.make_mask`."""
    source = inspect.getsource(qwen2.Attention.__call__)
    assert "self.rope(queries, offset=cache.offset)" in source
    assert "cache.update_and_fetch(keys, values)" in source
    assert "make_mask" in inspect.getsource(base.create_attention_mask)
    assert {"h", "cache", "window_size", "return_array"} <= params(base.create_attention_mask)
    assert "input_embeddings" in params(qwen2.Model.__call__)


def test_load_model_takes_the_hooks_the_loader_uses():
    """`utils.load_with_mlx_lm` calls `load_model(path, lazy=, strict=False,
    model_config=, get_model_classes=)` and relies on its order: it reads only
    `model*.safetensors` (the rest is read before it), asks the hook for the
    classes by `config=`, sanitizes, quantizes, then calls
    `model.load_weights(..., strict=)`, where the named-key check runs."""
    load_model = mlx_lm.utils.load_model
    assert {"model_path", "lazy", "strict", "model_config", "get_model_classes"} <= params(load_model)
    source = inspect.getsource(load_model)
    assert 'glob.glob(str(model_path / "model*.safetensors"))' in source
    assert "get_model_classes(config=config)" in source
    assert "hf_quant_config.json" in source
    steps = ("config.update(model_config)", "weights = model.sanitize(weights)", "_quantize(quantization)",
             "model.load_weights(list(weights.items()), strict=strict)")
    positions = [source.index(step) for step in steps]
    assert positions == sorted(positions)
