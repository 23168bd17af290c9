"""Adapters travel both ways, on a tiny Qwen2-VL folder written by mlx-vlm
0.7.10's converter (built as in tests/test_layouts.py):

- LoRA made by mlx-vlm's own `get_peft_model` and saved by its
  `save_adapter` gives the same greedy tokens here as in mlx-vlm;
- ours loads in mlx-vlm (`apply_lora_layers`) with the same greedy tokens;
- mlx-lm's `load_adapters` accepts ours (its `language_model/` share) on the
  language model, and the whole model then gives our tokens;
- our older adapter_config.json form still loads.

Each adapter's B matrices are set to random values, so an adapter that did
not load would change the tokens (checked: they differ from the base's)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_vlm_native import load
from mlx_vlm_native.adapters import LANGUAGE_MODEL_FOLDER, adapt_linears, adapter_config, save_adapters
from convert.write_hf_release import write_checkpoint
from test_layouts import hub_release_config, image_inputs, ours_greedy, peer_greedy

TARGETS = [r"language_model\..*(q|v|down)_proj"]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    pytest.importorskip("mlx_vlm")
    import transformers
    from mlx_vlm.convert import convert as peer_convert

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qwen2vl")
    ours = write_checkpoint(root / "ours", "qwen2-vl-tiny")
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(ours, dtype=torch.float32)
    hub = root / "hub"
    hf.save_pretrained(hub)
    for f in ours.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, hub / f.name)
    (hub / "config.json").write_text(json.dumps(hub_release_config(json.loads((hub / "config.json").read_text()))))
    out = root / "mlx_vlm"
    peer_convert(str(hub), str(out))
    return out


def randomize_b(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, 0.5, m.lora_b.shape).astype(np.float32))
    mx.eval(model.parameters())


def peer_model(folder):
    from mlx_vlm.utils import load_model

    return load_model(folder)


def test_mlx_vlm_adapter_gives_the_same_tokens_here(qwen_folder, tmp_path):
    from mlx_vlm.trainer.peft.utils import get_peft_model, save_adapter

    peer = peer_model(qwen_folder)
    model, processor = load(str(qwen_folder))
    inputs = image_inputs(processor, seed=5)
    base = ours_greedy(model, processor, inputs)
    get_peft_model(peer, ["q_proj", "v_proj"], rank=4, alpha=8.0, dropout=0.0, verbose=False)
    randomize_b(peer, 0)
    save_adapter(peer, tmp_path / "adapters.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and "keys" in config["lora_parameters"]
    theirs = peer_greedy(peer, inputs)
    model, processor = load(str(qwen_folder), adapter_path=str(tmp_path))
    ours = ours_greedy(model, processor, inputs)
    print(f"base {base}; mlx-vlm's adapter: mlx-vlm {theirs}, ours {ours}")
    assert ours == theirs and ours != base


@pytest.fixture
def our_adapter(qwen_folder, tmp_path):
    model, processor = load(str(qwen_folder))
    inputs = image_inputs(processor, seed=6)
    base = ours_greedy(model, processor, inputs)
    keys = adapt_linears(model, TARGETS, rank=4, scale=2.0)
    randomize_b(model, 1)
    model.eval()
    save_adapters(tmp_path / "adapters", model, adapter_config("lora", keys, 4, 2.0, 0.0, TARGETS, model))
    return tmp_path / "adapters", inputs, base, ours_greedy(model, processor, inputs)


def test_our_adapter_loads_in_mlx_vlm_with_the_same_tokens(qwen_folder, our_adapter):
    from mlx_vlm.trainer.peft.utils import apply_lora_layers

    folder, inputs, base, ours = our_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert set(config["lora_parameters"]) == {"rank", "scale", "dropout", "keys"}
    peer = apply_lora_layers(peer_model(qwen_folder), folder)
    theirs = peer_greedy(peer, inputs)
    print(f"base {base}; our adapter: ours {ours}, mlx-vlm {theirs}")
    assert theirs == ours and ours != base
    model, processor = load(str(qwen_folder), adapter_path=str(folder))  # and back here
    assert ours_greedy(model, processor, inputs) == ours


def test_mlx_lm_load_adapters_accepts_ours_on_the_language_model(qwen_folder, our_adapter):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    folder, inputs, base, ours = our_adapter
    lm_folder = folder / LANGUAGE_MODEL_FOLDER
    config = json.loads((lm_folder / "adapter_config.json").read_text())
    assert sorted(config["lora_parameters"]["keys"]) == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    model, processor = load(str(qwen_folder))
    mlx_lm_load_adapters(model.language_model, str(lm_folder))
    model.eval()
    assert ours_greedy(model, processor, inputs) == ours
    model, processor = load(str(qwen_folder), adapter_path=str(lm_folder))  # mlx-lm's form read here
    assert ours_greedy(model, processor, inputs) == ours


def test_the_older_adapter_form_still_loads(qwen_folder, our_adapter, tmp_path):
    folder, inputs, _, ours = our_adapter
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "adapter_config.json").write_text(json.dumps({"method": "lora", "targets": TARGETS, "rank": 4,
                                                          "scale": 2.0, "dropout": 0.0}))
    model, processor = load(str(qwen_folder), adapter_path=str(old))
    assert ours_greedy(model, processor, inputs) == ours
