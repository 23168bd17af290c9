"""Read PyTorch checkpoints (`pytorch_model.bin`, `*.pth`, `*.pt`) without torch
and without running pickled code.

`torch.save` (torch >= 1.6) writes a zip: `<archive>/data.pkl` describes the
objects and `<archive>/data/<key>` holds the raw bytes of each storage. The
unpickler here resolves only a short allow-list of globals (tensor rebuilders,
storage types, dtypes, OrderedDict); anything else raises before it can run.
"""

import collections
import pickle
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

# torch dtype name -> numpy dtype; bfloat16 is read as uint16 and viewed in MLX.
DTYPES = {
    "float32": "f4", "float64": "f8", "float16": "f2", "bfloat16": "u2", "int64": "i8",
    "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "uint16": "u2",
    "uint32": "u4", "uint64": "u8", "bool": "?",
}
STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
UNSUPPORTED_DTYPES = ("complex", "float8", "qint", "quint", "Complex", "QInt", "QUInt")
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
RESAVE_HINT = "re-save it with torch>=1.6 `torch.save(model.state_dict(), path)` or as safetensors"


class UnsafePickleError(ValueError):
    pass


class _Storage:
    def __init__(self, raw: bytes, dtype: str, byteorder: str):
        self.raw, self.dtype, self.byteorder = raw, dtype, byteorder


class _Tensor:
    def __init__(self, data: np.ndarray, dtype: str):
        self.data, self.dtype = data, dtype

    def to_mlx(self) -> mx.array:
        a = mx.array(self.data)
        return a.view(mx.bfloat16) if self.dtype == "bfloat16" else a


def _rebuild_tensor(storage, offset, size, stride, *_, dtype=None):
    dtype = dtype or getattr(storage, "dtype", None)
    if not isinstance(storage, _Storage) or dtype not in DTYPES:
        raise ValueError(f"malformed tensor record (storage {storage!r}, dtype {dtype!r})")
    arr = np.frombuffer(storage.raw, np.dtype(DTYPES[dtype]).newbyteorder(storage.byteorder))
    size, stride = tuple(size), tuple(stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if len(size) != len(stride) or offset < 0 or min(stride, default=0) < 0 or (
        0 not in size and last >= arr.size
    ):
        raise ValueError(f"tensor of size {size}, stride {stride} overruns its storage")
    strides = tuple(s * arr.itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(arr[offset:], size, strides, writeable=False)
    return _Tensor(np.array(view, arr.dtype.newbyteorder("="), order="C"), dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
    return _rebuild_tensor(storage, offset, size, stride, dtype=dtype)


def _rebuild_parameter(tensor, *_):
    return tensor


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): "uint8",
    ("torch", "UntypedStorage"): "uint8",
    **{("torch", name): dtype for name, dtype in STORAGES.items()},
    **{("torch", name): name for name in DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.byteorder = "<" if byteorder == "little" else ">"
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name.startswith(UNSUPPORTED_DTYPES):
            raise ValueError(f"{self.source}: torch.{name} tensors are not supported")
        raise UnsafePickleError(
            f"refusing to load {module}.{name} from {self.source}: not a tensor type; "
            "the file may execute code when loaded with torch.load"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in {self.source}")
        _, dtype, key, _location, _numel = pid
        if dtype not in DTYPES:
            raise ValueError(f"unsupported storage type {dtype!r} in {self.source}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            self.storages[key] = _Storage(raw, dtype, self.byteorder)
        return self.storages[key]


def _flatten(obj, prefix=""):
    if isinstance(obj, _Tensor):
        yield prefix[:-1], obj.to_mlx()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")


def _unpickle(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = sorted((n for n in names if n.rsplit("/", 1)[-1] == "data.pkl"), key=len)
        if not pkl:
            raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
            raise ValueError(f"{path} is a TorchScript archive, not supported: {RESAVE_HINT}")
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        try:
            with archive.open(pkl[0]) as f:
                return _Unpickler(f, archive, prefix, str(path), byteorder).load()
        except (pickle.UnpicklingError, EOFError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{path} is a malformed PyTorch checkpoint: {e!r}") from e


def load_torch_checkpoint(path) -> dict:
    """Tensors of a `torch.save` zip checkpoint as {name: mx.array}."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
        if head == LEGACY_MAGIC:
            raise ValueError(f"{path} is in torch's legacy (pre-1.6) format: {RESAVE_HINT}")
        raise ValueError(f"{path} is not a PyTorch checkpoint")
    obj = _unpickle(path)
    if isinstance(obj, dict) and not any(isinstance(v, _Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    weights = dict(_flatten(obj))
    if not weights:
        raise ValueError(f"{path} holds no tensors")
    return weights
