"""mlx-lm's runtime options on generate, chat and serve: a quantized KV cache
(--kv-bits / --kv-group-size / --quantized-kv-start), a bounded one
(--max-kv-size), a system prompt, and their errors."""

import importlib

import pytest
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

from conftest import make_image
from mlx_vlm_native import generate, load
from mlx_vlm_native.chat import Conversation
from mlx_vlm_native.generate import prepare_inputs, setup_arg_parser
from mlx_vlm_native.params import GenerationParameterError, check_cache_params
from convert.write_hf_release import write_checkpoint


@pytest.fixture(scope="module", params=["default", "qwen2-vl-tiny"])
def loaded(request, tmp_path_factory):
    if request.param == "default":
        return load(None)
    return load(str(write_checkpoint(tmp_path_factory.mktemp("q"), request.param)))


def test_quantized_kv_cache_is_used(loaded, monkeypatch):
    model, processor = loaded
    kinds = []
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")  # the module, not the function
    original = mlx_lm_generate.maybe_quantize_kv_cache

    def recording(cache, *args, **kwargs):
        original(cache, *args, **kwargs)
        kinds.append(type(cache[0]))

    monkeypatch.setattr(mlx_lm_generate, "maybe_quantize_kv_cache", recording)
    image = [make_image(100, 140, 1)]
    t = model.args.text_config
    if (t.hidden_size // t.num_attention_heads) % 32:  # the tiny Qwen2-VL: head dim 16
        with pytest.raises(GenerationParameterError, match="must divide the model's attention head dim 16"):
            generate(model, processor, "What is this?", images=image, kv_bits=8, kv_group_size=32)
        return
    r = generate(model, processor, "What is this?", images=image, max_tokens=6,
                 kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    assert r.generation_tokens >= 1
    assert kinds and all(k is QuantizedKVCache for k in kinds)


def test_bounded_kv_cache_gives_the_same_answer_until_it_rotates(loaded, monkeypatch):
    model, processor = loaded
    image = [make_image(100, 140, 2)]
    full = generate(model, processor, "What is this?", images=image, max_tokens=6)
    size = full.prompt_tokens + 8
    bounded = generate(model, processor, "What is this?", images=image, max_tokens=6, max_kv_size=size)
    assert bounded.text == full.text
    small = generate(model, processor, "What is this?", images=image, max_tokens=6, max_kv_size=16)
    assert small.generation_tokens >= 1  # a cache smaller than the prompt still answers


def test_rotating_cache_is_made(loaded):
    from mlx_vlm_native.generate import new_cache

    model, _ = loaded
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 32 for c in new_cache(model, 32))


def test_system_prompt_goes_first(loaded):
    model, processor = loaded
    inputs = prepare_inputs(model, processor, "Describe.", [make_image(60, 60)], system_prompt="Be brief.")
    text = processor.tokenizer.decode([int(i) for i in inputs.input_ids])
    assert "Be brief." in text and text.index("Be brief.") < text.index("Describe.")
    conversation = Conversation([make_image(60, 60)], system_prompt="Be brief.")
    conversation.ask("Describe.")
    messages = conversation.messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"][0] == {"type": "image"}
    with pytest.raises(ValueError, match="chat template"):
        prepare_inputs(model, processor, "x", [], system_prompt="s", apply_chat_template=False)


@pytest.mark.parametrize("kwargs,param", [
    (dict(kv_bits=7), "kv_bits"), (dict(kv_group_size=48), "kv_group_size"),
    (dict(quantized_kv_start=-1), "quantized_kv_start"), (dict(max_kv_size=2), "max_kv_size"),
    (dict(kv_bits=4, max_kv_size=64), "max_kv_size"),
])
def test_bad_cache_options_are_named(kwargs, param):
    with pytest.raises(GenerationParameterError, match=param) as e:
        check_cache_params(**kwargs)
    assert e.value.param == param


def test_cli_flags_parse():
    args = setup_arg_parser().parse_args(
        ["--kv-bits", "4", "--kv-group-size", "32", "--max-kv-size", "100", "--adapter-path", "a",
         "--system-prompt", "Be brief.", "--quantized-kv-start", "0"])
    assert (args.kv_bits, args.kv_group_size, args.max_kv_size, args.adapter_path, args.system_prompt,
            args.quantized_kv_start) == (4, 32, 100, "a", "Be brief.", 0)
    from mlx_vlm_native import chat, server

    for parser in (chat.setup_arg_parser(), server.setup_arg_parser()):
        a = parser.parse_args(["--kv-bits", "8", "--system-prompt", "s", "--adapter-path", "x"])
        assert (a.kv_bits, a.system_prompt, a.adapter_path) == (8, "s", "x")
