"""The torch-free checkpoint reader against torch.load."""

import builtins
import os
import pickle

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_vlm_native.torch_pickle import UnsafePickleError, load_torch_checkpoint


def as_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


def test_tensors_views_and_dtypes_match_torch(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    state = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(10),
        "mask": torch.tensor([True, False, True]),
        "transposed": base.t(),  # non-contiguous view
        "slice": base[2:4, 1:],  # shares storage, offset
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / "m.bin"
    torch.save({"state_dict": state, "epoch": 3}, path)
    ours = load_torch_checkpoint(path)
    assert set(ours) == set(state)
    for k, v in state.items():
        ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        got = as_numpy(ours[k])
        assert got.shape == ref.shape, k
        assert np.array_equal(got, ref), k
    assert ours["bf16"].dtype == mx.bfloat16 and ours["i64"].dtype == mx.int64


def test_nested_dicts_flatten(tmp_path):
    path = tmp_path / "n.pth"
    torch.save({"model": {"encoder": {"w": torch.ones(2)}, "head": torch.zeros(1)}}, path)
    assert set(load_torch_checkpoint(path)) == {"encoder.w", "head"}


class Exploit:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def test_code_executing_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": Exploit(os.system, f"touch {marker}")}, path)
    with pytest.raises(UnsafePickleError, match="system"):
        load_torch_checkpoint(path)
    assert not marker.exists()
    torch.save({"x": Exploit(builtins.eval, "1+1")}, path)
    with pytest.raises(UnsafePickleError, match=r"builtin\w*\.eval"):
        load_torch_checkpoint(path)


def test_legacy_and_garbage_files_are_clear_errors(tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy"):
        load_torch_checkpoint(legacy)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(64).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_torch_checkpoint(junk)
