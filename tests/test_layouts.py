"""Every layout a user has, through the one `load()`: Qwen2-VL / Qwen2.5-VL as
released on the Hub (flat config), as transformers 5 saves them (nested
config), as mlx-vlm's own converter writes them (plain, 4/8-bit affine, mxfp4,
mixed 4/6-bit: `vision_tower.*`, MLX Conv3d patch weights), and this project's
`convert` output loading back in mlx-vlm.

Tolerances: float folders vs transformers, logits max-abs-diff <= 1e-4 (fp32);
quantized folders, greedy tokens equal to mlx-vlm's on the same folder and the
same prompt ids (and logits to 1e-4 of mlx-vlm's; 3e-2 for mxfp4, whose
embeddings dequantize to bfloat16)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import make_image
from mlx_vlm_native import load
from mlx_vlm_native.convert import convert
from mlx_vlm_native.generate import stream_from_inputs
from mlx_vlm_native.random_checkpoint import write_checkpoint

TOL = 1e-4
FAMILIES = {"qwen2-vl-tiny": "Qwen2VLForConditionalGeneration",
            "qwen2.5-vl-tiny": "Qwen2_5_VLForConditionalGeneration"}
QUANTIZED = {
    "4bit": dict(quantize=True, q_bits=4, q_group_size=32),
    "8bit": dict(quantize=True, q_bits=8, q_group_size=32),
    "mxfp4": dict(quantize=True, q_bits=4, q_group_size=32, q_mode="mxfp4"),
    "mixed_4_6": dict(quantize=True, q_group_size=32, quant_predicate="mixed_4_6"),
}
GREEDY_TOKENS = 8


def mlx_vlm_or_skip():
    try:
        import mlx_vlm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mlx-vlm (the peer, test extra) cannot be imported: {e}")
    from mlx_vlm.convert import convert as peer_convert
    from mlx_vlm.utils import load_model as peer_load_model

    return peer_convert, peer_load_model


def hub_release_config(v5: dict) -> dict:
    """A transformers-5 config in the shape of the released Qwen2-VL-2B /
    Qwen2.5-VL-3B config.json files: text keys at the top level, rope_scaling
    {type: mrope}, the vision config with model_type qwen2_vl / qwen2_5_vl,
    in_chans and spatial_patch_size, saved by transformers 4."""
    cfg = {k: v for k, v in v5.items() if k not in ("text_config", "dtype")}
    text = dict(v5["text_config"])
    rope = text.pop("rope_parameters")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings",
              "hidden_act", "tie_word_embeddings", "use_sliding_window", "sliding_window",
              "max_window_layers", "attention_dropout"):
        if k in text:
            cfg[k] = text[k]
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = {k: v for k, v in v5["vision_config"].items() if k not in ("rope_parameters", "dtype")}
    vision.update(model_type=v5["model_type"], in_chans=vision["in_channels"],
                  spatial_patch_size=vision["patch_size"])
    cfg.update(vision_config=vision, torch_dtype="float32", transformers_version="4.41.2")
    return cfg


@pytest.fixture(scope="module", params=list(FAMILIES))
def folders(request, tmp_path_factory):
    """{layout name: folder} for one family, and the transformers model."""
    import transformers

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    ours = write_checkpoint(root / "ours", request.param)
    hf = getattr(transformers, FAMILIES[request.param]).from_pretrained(ours, dtype=torch.float32).eval()
    v5 = root / "transformers5"
    hf.save_pretrained(v5)
    for f in ours.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, v5 / f.name)
    hub = root / "hub"
    shutil.copytree(v5, hub)
    (hub / "config.json").write_text(json.dumps(hub_release_config(json.loads((v5 / "config.json").read_text()))))
    return {"hf": hf, "root": root, "hub": hub, "transformers5": v5}


def peer_folder(folders, name: str) -> Path:
    """mlx-vlm's converter run on the Hub-layout folder (made once per name)."""
    peer_convert, _ = mlx_vlm_or_skip()
    out = folders["root"] / f"mlx_vlm_{name}"
    if not out.exists():
        peer_convert(str(folders["hub"]), str(out), **QUANTIZED.get(name, {}))
    return out


def image_inputs(processor, seed: int = 1):
    return processor(processor.format_prompt("What is here?", 1), images=[make_image(150, 200, seed)])


def ours_logits(model, inputs) -> np.ndarray:
    embeds = model.get_input_embeddings(inputs)
    return np.array(model(mx.array(inputs.input_ids)[None], input_embeddings=embeds)[0].astype(mx.float32))


def hf_logits(hf, inputs) -> np.ndarray:
    with torch.inference_mode():
        return hf(
            input_ids=torch.from_numpy(inputs.input_ids.astype(np.int64))[None],
            mm_token_type_ids=torch.from_numpy(inputs.token_types.astype(np.int64))[None],
            pixel_values=torch.from_numpy(inputs.pack.patches),
            image_grid_thw=torch.tensor(inputs.image_grids),
        ).logits[0].numpy()


def peer_logits(peer, ids, inputs) -> np.ndarray:
    out = peer(mx.array(ids)[None], mx.array(inputs.pack.patches),
               image_grid_thw=mx.array(np.asarray(inputs.image_grids)))
    return np.array(out.logits[0].astype(mx.float32))


def peer_greedy(peer, inputs, n: int = GREEDY_TOKENS):
    """mlx-vlm's forward, greedy, recomputed over the whole sequence each step."""
    ids = [int(i) for i in inputs.input_ids]
    for _ in range(n):
        ids.append(int(np.argmax(peer_logits(peer, ids, inputs)[-1])))
    return ids[len(inputs.input_ids):]


def ours_greedy(model, processor, inputs, n: int = GREEDY_TOKENS):
    """Our generation path (KV cache, M-RoPE continuation), without stopping at EOS."""
    import time

    eos = processor.tokenizer.eos_token_ids
    processor.tokenizer.eos_token_ids = set()
    try:
        stream = stream_from_inputs(model, processor, inputs, time.perf_counter(), max_tokens=n)
        return [r.token for r in stream if r.token is not None]
    finally:
        processor.tokenizer.eos_token_ids = eos


@pytest.mark.parametrize("layout", ["hub", "transformers5", "mlx_vlm_plain"])
def test_float_layouts_match_transformers(folders, layout):
    folder = peer_folder(folders, "plain") if layout == "mlx_vlm_plain" else folders[layout]
    model, processor = load(str(folder))
    inputs = image_inputs(processor)
    diff = np.abs(ours_logits(model, inputs) - hf_logits(folders["hf"], inputs)).max()
    print(f"{layout}: max|logits - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_mlx_vlm_folder_has_the_peer_layout(folders):
    """What makes these folders different from the Hub's (the reason they failed)."""
    weights = mx.load(str(peer_folder(folders, "plain") / "model.safetensors"))
    assert not any(k.startswith("visual.") for k in weights)
    assert weights["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_mlx_vlm_folders_match_the_peer(folders, name):
    _, peer_load_model = mlx_vlm_or_skip()
    folder = peer_folder(folders, name)
    config = json.loads((folder / "config.json").read_text())
    if name == "mixed_4_6":  # per-module settings beside the global ones
        assert any(isinstance(v, dict) for v in config["quantization"].values())
    model, processor = load(str(folder))
    peer = peer_load_model(folder)
    inputs = image_inputs(processor, seed=2)
    diff = np.abs(ours_logits(model, inputs) - peer_logits(peer, inputs.input_ids, inputs)).max()
    ours, theirs = ours_greedy(model, processor, inputs), peer_greedy(peer, inputs)
    print(f"{name}: max|logits - mlx-vlm| = {diff:.2e}; tokens {ours} vs {theirs}")
    # mxfp4 embeddings dequantize to bfloat16 (in both), so activations are bf16 there
    assert diff <= (3e-2 if name == "mxfp4" else TOL)
    assert ours == theirs


@pytest.mark.parametrize("source", ["hub", "transformers5"])
def test_our_converted_folder_loads_in_mlx_vlm(folders, source, tmp_path):
    _, peer_load_model = mlx_vlm_or_skip()
    out = convert(str(folders[source]), str(tmp_path / "ours"))
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)
    config = json.loads((out / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
    peer = peer_load_model(out)
    model, processor = load(str(out))
    inputs = image_inputs(processor, seed=3)
    ref = hf_logits(folders["hf"], inputs)
    peer_diff = np.abs(peer_logits(peer, inputs.input_ids, inputs) - ref).max()
    ours_diff = np.abs(ours_logits(model, inputs) - ref).max()
    print(f"convert {source}: mlx-vlm {peer_diff:.2e}, ours {ours_diff:.2e} vs transformers")
    assert peer_diff <= TOL and ours_diff <= TOL


def test_our_quantized_folder_loads_in_mlx_vlm(folders, tmp_path):
    _, peer_load_model = mlx_vlm_or_skip()
    out = convert(str(folders["hub"]), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    peer = peer_load_model(out)
    model, processor = load(str(out))
    inputs = image_inputs(processor, seed=4)
    ours, theirs = ours_greedy(model, processor, inputs), peer_greedy(peer, inputs)
    print(f"our 4-bit in mlx-vlm: tokens {ours} vs {theirs}")
    assert ours == theirs


def test_unknown_layout_names_layouts_and_unexpected_keys(folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folders["hub"], bad)
    weights = mx.load(str(bad / "model.safetensors"))
    weights = {k.replace("visual.", "vision_encoder_v9.", 1): v for k, v in weights.items()}
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    with pytest.raises(ValueError) as e:
        load(str(bad))
    message = str(e.value)
    assert "missing" in message and "'visual.blocks.0.attn.proj.bias'" in message
    assert "unexpected" in message and "vision_encoder_v9." in message
    assert "layouts tried" in message and "mlx-vlm" in message and "Hub release" in message
