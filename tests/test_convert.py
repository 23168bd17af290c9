"""The converter: HF folder -> MLX folder, dtype, quantization, bad checkpoints."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_image
from mlx_vlm_native import generate, load
from mlx_vlm_native.convert import convert


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    return convert(str(tiny_hf_dir), str(tmp_path_factory.mktemp("c") / "mlx"))


def logits_for(model, processor, image):
    inputs = processor(processor.format_prompt("What is this?", 1), images=[image])
    embeds, positions = model.get_input_embeddings(inputs)
    return np.array(model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions))


def test_converted_folder_loads_and_matches_source(tiny_hf_dir, converted):
    files = {f.name for f in converted.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"} <= files
    image = make_image(300, 400)
    a = logits_for(*load(str(tiny_hf_dir)), image)
    b = logits_for(*load(str(converted)), image)
    assert np.array_equal(a, b)
    # converting an already-converted folder is a no-op on values (sanitize is idempotent)
    again = convert(str(converted), str(converted.parent / "again"))
    assert np.array_equal(logits_for(*load(str(again)), image), a)


def test_dtype_cast(tiny_hf_dir, tmp_path):
    out = convert(str(tiny_hf_dir), str(tmp_path / "bf16"), dtype="bfloat16")
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}


def test_quantized_model_loads_and_generates(tiny_hf_dir, tmp_path):
    out = convert(str(tiny_hf_dir), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    weights = mx.load(str(out / "model.safetensors"))
    assert "language_model.model.layers.0.mlp.up_proj.scales" in weights
    assert not any(k.startswith("vision_tower") and k.endswith("scales") for k in weights)
    model, processor = load(str(out))
    result = generate(model, processor, "Describe this.", images=[make_image(128, 128)], max_tokens=8)
    assert result.generation_tokens > 0 and isinstance(result.text, str)


def _copy_with_weights(src, dst, edit):
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


def test_missing_key_is_named(tiny_hf_dir, tmp_path):
    key = "model.language_model.layers.1.mlp.down_proj.weight"
    bad = _copy_with_weights(tiny_hf_dir, tmp_path / "m", lambda w: w.pop(key))
    with pytest.raises(ValueError, match="language_model.model.layers.1.mlp.down_proj.weight"):
        load(str(bad))


def test_misshaped_key_is_named(tiny_hf_dir, tmp_path):
    key = "model.multi_modal_projector.linear_1.weight"

    def edit(w):
        w[key] = w[key][:, :-1]

    bad = _copy_with_weights(tiny_hf_dir, tmp_path / "s", edit)
    with pytest.raises(ValueError, match=r"multi_modal_projector.linear_1.weight' has shape \(64, 31\)"):
        convert(str(bad), str(tmp_path / "out"))


def test_unsupported_model_type(tiny_hf_dir, tmp_path):
    bad = tmp_path / "u"
    shutil.copytree(tiny_hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "mystery_vlm"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mystery_vlm.*not supported"):
        load(str(bad))


def test_torch_bin_checkpoint_converts(tiny_hf_dir, tmp_path):
    """The same weights as pytorch_model.bin (loaded without torch's unpickler)."""
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    shutil.copytree(tiny_hf_dir, src)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    image = make_image(200, 300)
    a = logits_for(*load(str(tiny_hf_dir)), image)
    b = logits_for(*load(str(convert(str(src), str(tmp_path / "out")))), image)
    assert np.array_equal(a, b)


def test_malicious_bin_is_refused(tiny_hf_dir, tmp_path):
    import os

    import torch

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil"
    shutil.copytree(tiny_hf_dir, src)
    (src / "model.safetensors").unlink()
    torch.save({"model.image_newline": Exploit()}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="system"):
        convert(str(src), str(tmp_path / "out"))
    assert not marker.exists()


def test_output_folder_not_overwritten(converted):
    with pytest.raises(FileExistsError):
        convert(str(converted), str(converted))


def test_mlx_path_pointing_at_a_file_is_a_clear_error(tiny_hf_dir, tmp_path):
    from mlx_vlm_native.convert import main

    target = tmp_path / "model.bin"
    target.write_bytes(b"not a folder")
    with pytest.raises(FileExistsError, match=r"model\.bin is a file, not a folder"):
        convert(str(tiny_hf_dir), str(target))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["--hf-path", str(tiny_hf_dir), "--mlx-path", str(target)])
    assert target.read_bytes() == b"not a folder"


def test_unquantizable_settings_are_refused(tiny_hf_dir, tmp_path, monkeypatch):
    from mlx_vlm_native import convert as convert_module

    with pytest.raises(ValueError, match="cannot quantize with --q-bits 3 --q-group-size 7"):
        convert(str(tiny_hf_dir), str(tmp_path / "q"), quantize=True, q_bits=3, q_group_size=7)
    assert not (tmp_path / "q").exists()
    # settings mlx accepts but that no layer's shape fits leave every layer as it was:
    # an error, not a success doing nothing
    monkeypatch.setattr(convert_module, "quantize_language_model", lambda model, config, *a: (model, config))
    with pytest.raises(ValueError, match="no layer could be quantized with group size 32"):
        convert(str(tiny_hf_dir), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=32)
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()


def test_a_conversion_cut_short_restarts_cleanly_into_the_same_folder(tiny_hf_dir, tmp_path, monkeypatch):
    from mlx_vlm_native import convert as convert_module

    out = tmp_path / "mlx"
    calls = []

    def dies(config, path):  # as if the process were stopped after the weights were written
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_config", dies)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_hf_dir), str(out))
    assert calls and not out.exists() and not (tmp_path / ".mlx.partial").exists()
    monkeypatch.undo()
    # a SIGKILL leaves the partial folder behind: the next run removes it and converts
    (tmp_path / ".mlx.partial").mkdir()
    (tmp_path / ".mlx.partial" / "model.safetensors").write_bytes(b"half a file")
    out.mkdir()  # an empty target folder is fine
    convert(str(tiny_hf_dir), str(out))
    assert not (tmp_path / ".mlx.partial").exists()
    model, processor = load(str(out))
    assert generate(model, processor, "Hi", max_tokens=2).generation_tokens > 0
