"""POINTS1.5 on tiny checkpoints written in its released layouts.

transformers has no POINTS class, so the oracle is assembled the way the
reference model is: transformers' Qwen2-VL tower (its hidden states, its own
merger unused), transformers' `PatchMerger` as the projector, and
`Qwen2ForCausalLM` fed `inputs_embeds` (fp32; logits max-abs-diff <= 1e-4)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import make_image
from mlx_vlm_native import batch_generate, generate, load
from mlx_vlm_native.convert import convert
from mlx_vlm_native.models.points_v15 import Model
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native.utils import load_weights

TOL = 1e-4


@pytest.fixture(scope="module")
def qwen2_layout(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("points_qwen2"), "points-tiny-qwen2", seed=3)
    return path, *load(str(path))


@pytest.fixture(scope="module")
def custom_llama_layout(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("points_custom"), "points-tiny", seed=3)
    return path, *load(str(path))


@pytest.fixture(scope="module")
def oracle(qwen2_layout):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger, Qwen2VisionTransformerPretrainedModel

    torch.set_num_threads(1)
    path = qwen2_layout[0]
    config = json.loads((path / "config.json").read_text())
    weights = {k: torch.from_numpy(np.array(v)) for k, v in load_weights(path).items()}

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

    vision_cfg = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    tower = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**vision_cfg)).eval()
    tower.load_state_dict(part("vision_encoder."))
    llm_cfg = dict(config["llm_config"])
    llm_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": llm_cfg.pop("rope_theta")}
    llm = Qwen2ForCausalLM(Qwen2Config(**llm_cfg)).eval()
    llm.load_state_dict({("model." + k[len("model.") :] if k.startswith("model.") else k): v
                         for k, v in part("llm.").items()})
    projector = PatchMerger(llm_cfg["hidden_size"], context_dim=vision_cfg["embed_dim"]).eval()
    projector.load_state_dict(part("vision_projector."))

    def logits(inputs):
        with torch.inference_mode():
            hidden = tower(torch.from_numpy(inputs.pack.patches), grid_thw=torch.tensor(inputs.pack.grids))
            features = projector(hidden.last_hidden_state)
            embeds = llm.model.embed_tokens(torch.from_numpy(inputs.input_ids.astype(np.int64)))
            embeds[torch.from_numpy(inputs.token_types > 0)] = features
            return llm(inputs_embeds=embeds[None]).logits[0].numpy()

    return logits


def mlx_logits(model, inputs):
    embeds, positions = model.get_input_embeddings(inputs)
    return np.array(model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions)[0])


def test_prompt_format_is_points(qwen2_layout):
    _, _, processor = qwen2_layout
    assert processor.format_prompt("What is it?", 2) == (
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\n<|vision_start|><|image_pad|><|vision_end|>\n"
        "What is it?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_logits_match_reference_composition(qwen2_layout, oracle):
    _, model, processor = qwen2_layout
    images = [make_image(300, 420, 1), make_image(64, 150, 2)]
    inputs = processor(processor.format_prompt("Compare.", 2), images=images)
    assert inputs.vision_tokens == sum(h * w for _, h, w in inputs.image_grids) // 4
    ours, ref = mlx_logits(model, inputs), oracle(inputs)
    print(f"POINTS logits max-abs-diff {np.abs(ours - ref).max():.2e} over {len(ours)} tokens")
    assert np.abs(ours - ref).max() <= TOL


def test_custom_llama_layout_loads_to_the_same_model(qwen2_layout, custom_llama_layout):
    """The original release's fused names map onto the Qwen2 ones exactly."""
    raw = load_weights(custom_llama_layout[0])
    assert "llm.lm.layers.0.attention.key_value_dense.weight" in raw
    assert "vision_encoder.merger.mlp.0.weight" in raw  # present but unused
    a = dict(tree_flatten(qwen2_layout[1].parameters()))
    b = dict(tree_flatten(custom_llama_layout[1].parameters()))
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_custom_llama_split_follows_the_reference_formulas(custom_llama_layout):
    """Fused key/value rows are viewed as (kv_heads, 2 * head_dim) with the
    key first; `dense_h_to_4h` output is chunked as x1 * silu(x2)."""
    path, model, _ = custom_llama_layout
    raw = {k: np.array(v) for k, v in load_weights(path).items()}
    c = model.args.llm_config
    hd, kv_heads = c.hidden_size // c.num_attention_heads, c.num_key_value_heads
    x = np.random.default_rng(0).standard_normal((5, c.hidden_size)).astype(np.float32)
    pre = "llm.lm.layers.1."
    kv = x @ raw[pre + "attention.key_value_dense.weight"].T + raw[pre + "attention.key_value_dense.bias"]
    kv = kv.reshape(5, kv_heads, 2 * hd)
    key, value = kv[..., :hd].reshape(5, -1), kv[..., hd:].reshape(5, -1)
    h = x @ raw[pre + "mlp.dense_h_to_4h.weight"].T
    x1, x2 = np.split(h, 2, axis=-1)
    swiglu = x1 * (x2 / (1 + np.exp(-x2)))
    layer = model.llm.model.layers[1]
    xm = mx.array(x)
    assert np.abs(np.array(layer.self_attn.k_proj(xm)) - key).max() <= 1e-5
    assert np.abs(np.array(layer.self_attn.v_proj(xm)) - value).max() <= 1e-5
    mlp = layer.mlp
    ours = np.array(mlp.down_proj(mx.array(swiglu)))
    assert np.abs(np.array(mlp(xm)) - ours).max() <= 1e-5


def test_batch_runs_one_encoder_call(qwen2_layout, vision_calls):
    _, model, processor = qwen2_layout
    prompts = ["A.", "B.", "C."]
    images = [[make_image(90, 130, 1)], [make_image(200, 60, 2), make_image(56, 56, 3)], [make_image(150, 150, 4)]]
    singles = [generate(model, processor, p, images=i, max_tokens=5) for p, i in zip(prompts, images)]
    vision_calls.clear()  # the single-prompt runs above
    batched = batch_generate(model, processor, prompts, images=images, max_tokens=5)
    assert vision_calls == [4]
    assert [r.text for r in batched] == [r.text for r in singles]


def test_convert_round_trip_and_video_refused(custom_llama_layout, tmp_path):
    path, model, processor = custom_llama_layout
    out = tmp_path / "mlx"
    convert(str(path), str(out))
    converted, converted_processor = load(str(out))
    assert isinstance(converted, Model)
    inputs = processor(processor.format_prompt("x", 1), images=[make_image(100, 100)])
    assert np.array_equal(mlx_logits(converted, inputs), mlx_logits(model, inputs))
    with pytest.raises(ValueError, match="images only"):
        converted_processor.format_prompt("x", 0, 1)
