"""Checkpoint files verified before loading: safetensors headers against the file,
config.json as JSON; every error names the file (and the tensor)."""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest

from mlx_vlm_native.utils import load_config, load_weights
from mlx_vlm_native.weights.files import check_safetensors


def write_raw(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), {"a.weight": mx.ones((4, 3)), "b.bias": mx.zeros((5,), dtype=mx.float16)})
    return path


def test_a_real_file_passes_and_loads(good):
    check_safetensors(good)
    weights = load_weights(good.parent)
    assert set(weights) == {"a.weight", "b.bias"} and np.array_equal(np.array(weights["a.weight"]), np.ones((4, 3)))


def test_truncated_file_names_the_file_and_tensor(good):
    data = good.read_bytes()
    good.write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '(a\.weight|b\.bias)' ends at byte \d+ .* truncated"):
        load_weights(good.parent)
    good.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a safetensors file"):
        load_weights(good.parent)
    good.write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or not a safetensors file"):
        load_weights(good.parent)


@pytest.mark.parametrize("header, data, words", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'w' is F32 of shape \[4\] \(16 bytes\)"),
    ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'w' has an unknown dtype 'F33'"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'w' has a malformed shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), r"tensor 'w' has data_offsets"),
    ({"v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), r"tensor 'w' overlaps"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(20), r"cover 8 bytes of data but the file has 20"),
    ([1, 2], b"", r"malformed safetensors header: not a JSON object"),
])
def test_inconsistent_headers_are_refused(tmp_path, header, data, words):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*" + words if not words.startswith("tensor") else
                       r"bad\.safetensors: " + words):
        load_weights(tmp_path)


def test_invalid_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava_onevision",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"config\.json is not UTF-8"):
        load_config(tmp_path)
