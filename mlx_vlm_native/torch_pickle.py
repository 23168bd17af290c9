"""Read PyTorch checkpoints (`pytorch_model.bin`, `*.pth`) without torch and
without running pickled code.

`torch.save` writes a zip: `<archive>/data.pkl` describes the objects and
`<archive>/data/<key>` holds raw storage bytes. The unpickler here resolves only
a short allow-list of globals (tensor rebuilders, storage types, OrderedDict);
anything else raises before it can run.
"""

import collections
import pickle
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": "bfloat16", "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


class UnsafePickleError(ValueError):
    pass


class _Storage:
    def __init__(self, data: np.ndarray, dtype):
        self.data, self.dtype = data, dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    arr = storage.data
    itemsize = arr.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        arr[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return _Tensor(view.copy(), storage.dtype)


def _rebuild_parameter(tensor, *_):
    return tensor


class _Tensor:
    def __init__(self, data: np.ndarray, dtype):
        self.data, self.dtype = data, dtype

    def to_mlx(self) -> mx.array:
        if self.dtype == "bfloat16":
            return mx.array(self.data).view(mx.bfloat16)
        return mx.array(self.data)


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in STORAGE_DTYPES},
    **{("torch", name): name for name in TORCH_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.source, self.byteorder = archive, prefix, source, byteorder

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from {self.source}: not a tensor type; "
                "the file may execute code when loaded with torch.load"
            )
        return ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in {self.source}")
        _, kind, key, _location, _numel = pid
        dtype = STORAGE_DTYPES.get(kind) or TORCH_DTYPES.get(kind)
        if dtype is None:
            raise UnsafePickleError(f"unsupported storage type {kind!r} in {self.source}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        np_dtype = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
        np_dtype = np_dtype.newbyteorder("<" if self.byteorder == "little" else ">")
        return _Storage(np.frombuffer(raw, dtype=np_dtype).astype(np_dtype.newbyteorder("=")), dtype)


def _flatten(obj, prefix=""):
    if isinstance(obj, _Tensor):
        yield prefix[:-1], obj.to_mlx()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")


def load_torch_checkpoint(path) -> dict:
    """Tensors of a `torch.save` zip checkpoint as {name: mx.array}."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise ValueError(
                f"{path} uses torch's legacy (pre-1.6) format, which is not supported: "
                "re-save it with torch>=1.6 `torch.save(state_dict, path)` or as safetensors"
            )
        raise ValueError(f"{path} is not a PyTorch checkpoint")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise ValueError(f"{path} is a zip without data.pkl (TorchScript archives are not supported)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder_file = prefix + "byteorder"
        byteorder = "little"
        if byteorder_file in archive.namelist():
            byteorder = archive.read(byteorder_file).decode().strip()
        with archive.open(pkl[0]) as f:
            obj = _Unpickler(f, archive, prefix, str(path), byteorder).load()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    weights = dict(_flatten(obj))
    if not weights:
        raise ValueError(f"{path} holds no tensors")
    return weights
