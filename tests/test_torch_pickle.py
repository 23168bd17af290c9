"""The torch-free checkpoint reader against torch.load."""

import os
import zipfile

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_vlm_native.weights.torch_pickle import UnsafePickleError, load_torch_checkpoint


def as_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


def torch_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.float().numpy() if t.dtype in (torch.bfloat16, torch.float64) else t.numpy()


def test_tensors_views_and_dtypes_match_torch(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    state = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(3).double(),
        "i64": torch.arange(-5, 5),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3 path
        "mask": torch.tensor([True, False, True]),
        "base": base,
        "transposed": base.t(),  # non-contiguous view of base's storage
        "slice": base[2:4, 1:],  # offset view sharing base's storage
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "m.bin"
    torch.save({"state_dict": state, "epoch": 3, "name": "run"}, path)
    ours = load_torch_checkpoint(path)
    theirs = torch.load(path, weights_only=True)["state_dict"]
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        got, ref = as_numpy(ours[k]), torch_numpy(v)
        assert got.shape == ref.shape, k
        assert np.array_equal(got, ref), k
    assert ours["bf16"].dtype == mx.bfloat16 and ours["f16"].dtype == mx.float16
    assert ours["i64"].dtype == mx.int64 and ours["u16"].dtype == mx.uint16
    assert ours["mask"].dtype == mx.bool_ and ours["scalar"].shape == ()


def test_nested_dicts_flatten(tmp_path):
    path = tmp_path / "n.pth"
    torch.save({"model": {"encoder": {"w": torch.ones(2)}, "head": torch.zeros(1)}}, path)
    assert set(load_torch_checkpoint(path)) == {"encoder.w", "head"}
    # A submodule called "model" beside other tensors is part of the state dict, not a wrapper.
    torch.save({"model": {"w": torch.ones(2)}, "lm_head": torch.zeros(1)}, path)
    assert set(load_torch_checkpoint(path)) == {"model.w", "lm_head"}


class Exploit:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def write_checkpoint(path, pickle_bytes: bytes, storages: dict, byteorder="little"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)


def tensor_pickle(size: int) -> bytes:
    """{'w': FloatStorage tensor of `size` elements, offset 0, stride 1}, by hand."""
    return (
        b"\x80\x02}X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
        b"K\x00K" + bytes([size]) + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
        b"Rs."
    )


def test_code_executing_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": Exploit(os.system, f"touch {marker}")}, path)
    with pytest.raises(UnsafePickleError, match=r"refusing to load \w+\.system from .*evil\.bin"):
        load_torch_checkpoint(path)
    assert not marker.exists()

    evil = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."
    write_checkpoint(path, evil, {})
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_torch_checkpoint(path)


def test_hand_written_tensor_and_out_of_bounds_view(tmp_path):
    path = tmp_path / "crafted.bin"
    raw = np.array([1.5, -2.0], dtype="<f4").tobytes()
    write_checkpoint(path, tensor_pickle(2), {"0": raw})
    assert torch.load(path, weights_only=True)["w"].tolist() == [1.5, -2.0]
    assert np.array_equal(np.array(load_torch_checkpoint(path)["w"]), [1.5, -2.0])
    big = np.array([1.5, -2.0], dtype=">f4").tobytes()
    write_checkpoint(path, tensor_pickle(2), {"0": big}, byteorder="big")
    assert torch.load(path, weights_only=True)["w"].tolist() == [1.5, -2.0]
    assert np.array_equal(np.array(load_torch_checkpoint(path)["w"]), [1.5, -2.0])
    write_checkpoint(path, tensor_pickle(100), {"0": raw})  # view past the storage's end
    with pytest.raises(ValueError, match="overruns"):
        load_torch_checkpoint(path)
    write_checkpoint(path, tensor_pickle(2), {})  # storage file missing
    with pytest.raises(ValueError, match="malformed"):
        load_torch_checkpoint(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit
def test_unsupported_formats_are_clear_errors(tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy.*torch.save"):
        load_torch_checkpoint(legacy)

    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(ValueError, match="TorchScript.*torch.save") as e:
        load_torch_checkpoint(script)
    assert not isinstance(e.value, UnsafePickleError)

    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(64).replace(b"PK", b"pk"))
    with pytest.raises(ValueError, match="junk.bin is not a PyTorch checkpoint"):
        load_torch_checkpoint(junk)

    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="other.zip .*not a PyTorch checkpoint"):
        load_torch_checkpoint(other_zip)


def strided_pickle(size: tuple, stride: tuple, numel: int) -> bytes:
    """{'w': a FloatStorage tensor of `numel` elements viewed with `size`/`stride`}, by hand."""
    def ints(values):
        return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) for v in values) + b"t"

    return (
        b"\x80\x02}X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ" + numel.to_bytes(4, "little") + b"tQ"
        b"K\x00" + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)Rt"
        b"Rs."
    )


def test_stride_zero_expansion_is_refused_before_allocating(tmp_path):
    path = tmp_path / "expand.bin"
    raw = np.array([1.0], dtype="<f4").tobytes()
    write_checkpoint(path, strided_pickle((4, 3), (0, 0), 1), {"0": raw})  # a small expand is fine
    assert np.array_equal(np.array(load_torch_checkpoint(path)["w"]), np.ones((4, 3)))
    write_checkpoint(path, strided_pickle((100_000, 100_000), (0, 0), 1), {"0": raw})  # 40 GB from 4 bytes
    with pytest.raises(ValueError, match=r"expand\.bin: its tensors would take 40000000000 bytes from 4 bytes"):
        load_torch_checkpoint(path)


def test_declared_and_stored_sizes_must_agree(tmp_path):
    path = tmp_path / "sizes.bin"
    raw = np.zeros(4, "<f4").tobytes()
    write_checkpoint(path, strided_pickle((4,), (1,), 1000), {"0": raw})
    with pytest.raises(ValueError, match=r"sizes\.bin: storage '0' declares 1000 float32 elements \(4000 bytes\) "
                                         r"but its zip entry holds 16 bytes"):
        load_torch_checkpoint(path)


def test_zip_bombs_are_refused_from_the_directory(tmp_path):
    path = tmp_path / "bomb.bin"
    numel = 16 << 20  # 64 MB of zeros deflate to about 64 kB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", strided_pickle((numel,), (1,), numel))
        z.writestr("archive/byteorder", "little")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(numel * 4 >> 20):
                f.write(chunk)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ValueError, match=r"bomb\.bin: zip entry archive/data/0 inflates .* refusing a possible zip bomb"):
        load_torch_checkpoint(path)


def test_nesting_and_shared_dicts_are_bounded(tmp_path):
    import pickle

    path = tmp_path / "deep.bin"
    deep = b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 40 + b"}" + b"s" * 40 + b"."
    write_checkpoint(path, deep, {})
    with pytest.raises(ValueError, match=r"deep\.bin: the state dict is nested deeper than 32 levels"):
        load_torch_checkpoint(path)
    # a dict referenced twice at each level would be walked 2**20 times: refused at the repeat
    inner = {}
    outer = inner
    for _ in range(20):
        outer = {"a": outer, "b": outer}
    write_checkpoint(path, pickle.dumps(outer, protocol=2), {})
    with pytest.raises(ValueError, match=r"deep\.bin: the dict at 'a\.a.*' appears more than once"):
        load_torch_checkpoint(path)
