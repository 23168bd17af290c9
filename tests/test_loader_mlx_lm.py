"""Folders load through mlx-lm's `load_model` (utils.load_with_mlx_lm), so the
quantization metadata mlx-lm reads counts here too: an nvfp4 folder, and one
whose quantization is only in NVIDIA ModelOpt's `hf_quant_config.json`, give
exactly the outputs of quantizing the float model in memory. The loading
hook leaves no trace: the model is the family's own class. A quantized folder
with a damaged layer still names its key."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import make_image
from mlx_vlm_native.convert import convert, quantize_language_model
from mlx_vlm_native.models import llava_onevision
from mlx_vlm_native.utils import load, load_model, load_processor

NVFP4 = dict(q_bits=4, q_group_size=16, q_mode="nvfp4")
UP_PROJ = "language_model.model.layers.0.mlp.up_proj"


def logits(model, processor) -> np.ndarray:
    inputs = processor(processor.format_prompt("What is this?", 1), images=[make_image(300, 400)])
    embeds, positions = model.get_input_embeddings(inputs)
    return np.array(model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions))


@pytest.fixture(scope="module")
def in_memory(tiny_hf_dir):
    """The float folder quantized to nvfp4 in memory, as `convert` quantizes it."""
    model, config = load_model(tiny_hf_dir)
    model, _ = quantize_language_model(model, config, NVFP4["q_bits"], NVFP4["q_group_size"],
                                       mode=NVFP4["q_mode"])
    return logits(model, load_processor(tiny_hf_dir, model))


@pytest.fixture(scope="module")
def nvfp4_folder(tiny_hf_dir, tmp_path_factory):
    return convert(str(tiny_hf_dir), str(tmp_path_factory.mktemp("nvfp4") / "mlx"), quantize=True, **NVFP4)


def up_proj(model):
    return model.language_model.model.layers[0].mlp.up_proj


def test_nvfp4_folder_matches_quantizing_in_memory(nvfp4_folder, in_memory):
    model, processor = load(str(nvfp4_folder))
    assert type(model) is llava_onevision.Model
    assert isinstance(up_proj(model), nn.QuantizedLinear) and up_proj(model).mode == "nvfp4"
    assert np.array_equal(logits(model, processor), in_memory)


def test_hf_quant_config_json_is_read(nvfp4_folder, in_memory, tmp_path):
    """A ModelOpt export keeps its quantization in hf_quant_config.json, none in config.json."""
    folder = tmp_path / "modelopt"
    shutil.copytree(nvfp4_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.29.0"}, "quant_method": "modelopt",
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16}}))
    model, loaded_config = load_model(folder)
    assert loaded_config["quantization"] == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    assert up_proj(model).mode == "nvfp4"
    assert np.array_equal(logits(model, load_processor(folder, model)), in_memory)


def test_quantization_metadata_without_a_method_is_named(nvfp4_folder, tmp_path):
    """mlx-lm needs hf_quant_config.json's `quant_method`; without it the error names the file."""
    folder = tmp_path / "no-method"
    shutil.copytree(nvfp4_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(ValueError, match=r"hf_quant_config\.json: .* no 'quant_method'.*it has: quantization"):
        load_model(folder)


def test_a_quantized_layer_without_its_scales_is_named(nvfp4_folder, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(nvfp4_folder, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.endswith("layers.0.mlp.up_proj.scales")}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=r"up_proj\.weight' has shape"):
        load_model(folder)


def test_a_config_naming_its_own_model_file_is_refused_without_running_it(tiny_hf_dir, tmp_path):
    """mlx-lm's loader would import a config's `model_file`; this package never lets it."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_hf_dir, folder)
    ran = tmp_path / "CODE_RAN"
    (folder / "custom_model.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "custom_model.py"}))
    with pytest.raises(ValueError, match="custom_model.py"):
        load(str(folder))
    assert not ran.exists()
