"""Read PyTorch checkpoints (`pytorch_model.bin`, `*.pth`, `*.pt`) without torch
and without running pickled code.

`torch.save` (torch >= 1.6) writes a zip: `<archive>/data.pkl` describes the
objects and `<archive>/data/<key>` holds the raw bytes of each storage. The
unpickler here resolves only a short allow-list of globals (tensor rebuilders,
storage types, dtypes, OrderedDict); anything else raises before it can run.

Everything is verified before it is allocated: each storage's zip entry must
hold exactly the bytes its record declares (and not be a compression bomb),
each tensor's size and stride must lie inside its storage, the tensors
together may not expand far beyond the storage bytes (stride-0 or repeated
views), and the nesting of the state dict is bounded. Errors name the file and
the storage or tensor.
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
MAX_DEPTH = 32  # nesting of dicts around the tensors
MAX_TENSORS = 1_000_000
MAX_PICKLE_BYTES = 1 << 30  # data.pkl itself (the tensors' bytes are in separate entries)
MAX_COMPRESSION = 100  # torch stores entries uncompressed; a deflated one may not expand more than this
EXPANSION_SLACK = 64 << 20  # bytes the tensors may exceed their storages by (small expanded views)


class UnsafePickleError(ValueError):
    pass


def _itemsize(dtype: str) -> int:
    return np.dtype(DTYPES[dtype]).itemsize


class _Storage:
    """One storage's zip entry, read when a tensor first needs it."""

    def __init__(self, archive: zipfile.ZipFile, entry: str, key: str, dtype: str, byteorder: str):
        self.archive, self.entry, self.key, self.dtype, self.byteorder = archive, entry, key, dtype, byteorder
        self.nbytes = archive.getinfo(entry).file_size
        self.raw = None

    def array(self, dtype: str) -> np.ndarray:
        if self.raw is None:
            self.raw = self.archive.read(self.entry)
        return np.frombuffer(self.raw, np.dtype(DTYPES[dtype]).newbyteorder(self.byteorder))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Tensor:
    """A tensor record, checked and materialised only once its name is known."""

    def __init__(self, storage, offset, size, stride, dtype):
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def check(self, name: str, source: str) -> int:
        """Its size and stride inside its storage; the bytes it will take."""
        where = f"{source}: tensor {name!r}"
        size, stride, offset = self.size, self.stride, self.offset
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and all(map(_is_int, size + stride))
                and _is_int(offset)) or len(size) != len(stride) or len(size) > 64:
            raise ValueError(f"{where} has a malformed size {size!r} / stride {stride!r} / offset {offset!r}")
        if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
            raise ValueError(f"{where} has a negative size, stride or offset ({size}, {stride}, {offset})")
        numel = int(np.prod(size, dtype=object)) if size else 1
        elements = self.storage.nbytes // _itemsize(self.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if numel and last >= elements:
            raise ValueError(f"{where} of size {size}, stride {stride}, offset {offset} overruns its storage "
                             f"{self.storage.key!r} of {elements} elements")
        return numel * _itemsize(self.dtype)

    def to_mlx(self) -> mx.array:
        arr = self.storage.array(self.dtype)
        strides = tuple(s * arr.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(arr[self.offset:], self.size, strides, writeable=False)
        a = mx.array(np.array(view, arr.dtype.newbyteorder("="), order="C"))
        return a.view(mx.bfloat16) if self.dtype == "bfloat16" else a


def _rebuild_tensor(storage, offset, size, stride, *_, dtype=None):
    dtype = dtype or getattr(storage, "dtype", None)
    if not isinstance(storage, _Storage) or dtype not in DTYPES:
        raise ValueError(f"malformed tensor record (storage {storage!r}, dtype {dtype!r})")
    return _Tensor(storage, offset, tuple(size) if isinstance(size, (tuple, list)) else size,
                   tuple(stride) if isinstance(stride, (tuple, list)) else stride, dtype)


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
        _, dtype, key, _location, numel = pid
        if dtype not in DTYPES:
            raise ValueError(f"unsupported storage type {dtype!r} in {self.source}")
        if key not in self.storages:
            entry = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(entry)
            except KeyError:
                raise ValueError(f"{self.source} is a malformed PyTorch checkpoint: storage {key!r} has no "
                                 f"zip entry {entry}") from None
            declared = numel * _itemsize(dtype) if _is_int(numel) else None
            if declared is None or info.file_size != declared:
                raise ValueError(f"{self.source}: storage {key!r} declares {numel!r} {dtype} elements "
                                 f"({declared} bytes) but its zip entry holds {info.file_size} bytes")
            _check_compression(info, self.source)
            self.storages[key] = _Storage(self.archive, entry, str(key), dtype, self.byteorder)
        return self.storages[key]


def _check_compression(info: zipfile.ZipInfo, source: str) -> None:
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(1 << 20, MAX_COMPRESSION * info.compress_size):
        raise ValueError(f"{source}: zip entry {info.filename} inflates {info.compress_size} bytes to "
                         f"{info.file_size} (over {MAX_COMPRESSION}x): refusing a possible zip bomb")


def _tensor_records(obj, source: str, prefix: str = "", depth: int = 0, seen=None):
    """(name, _Tensor) for each tensor of nested dicts, bounded in depth and count."""
    seen = set() if seen is None else seen
    if isinstance(obj, _Tensor):
        yield prefix[:-1], obj
    elif isinstance(obj, dict):
        if depth >= MAX_DEPTH:
            raise ValueError(f"{source}: the state dict is nested deeper than {MAX_DEPTH} levels at {prefix[:80]!r}")
        if id(obj) in seen:
            raise ValueError(f"{source}: the dict at {prefix[:80]!r} appears more than once")
        seen.add(id(obj))
        for k, v in obj.items():
            yield from _tensor_records(v, source, f"{prefix}{k}.", depth + 1, seen)


def _materialise(records: list, source: str) -> dict:
    """Check every tensor against its storage, and all of them against the bytes
    stored, before any is allocated."""
    if len(records) > MAX_TENSORS:
        raise ValueError(f"{source} holds {len(records)} tensors, over the limit of {MAX_TENSORS}")
    total = sum(t.check(name, source) for name, t in records)
    stored = sum({id(t.storage): t.storage.nbytes for _, t in records}.values())
    if total > 2 * stored + EXPANSION_SLACK:
        raise ValueError(f"{source}: its tensors would take {total} bytes from {stored} bytes of storage "
                         "(stride-0 or repeated views); refusing to expand them")
    return {name: t.to_mlx() for name, t in records}


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
            byteorder = archive.read(f"{prefix}byteorder")[:16].decode("ascii", "replace").strip()
        info = archive.getinfo(pkl[0])
        _check_compression(info, str(path))
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"{path}: {pkl[0]} is {info.file_size} bytes, over the limit of {MAX_PICKLE_BYTES}")
        try:
            with archive.open(pkl[0]) as f:
                obj = _Unpickler(f, archive, prefix, str(path), byteorder).load()
            if isinstance(obj, dict) and not any(isinstance(v, _Tensor) for v in obj.values()):
                for key in ("state_dict", "model", "module"):
                    if isinstance(obj.get(key), dict):
                        obj = obj[key]
                        break
            return _materialise(list(_tensor_records(obj, str(path))), str(path))
        except (pickle.UnpicklingError, EOFError, TypeError, KeyError, IndexError, AttributeError,
                zipfile.BadZipFile, RecursionError, OverflowError) as e:
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
    try:
        weights = _unpickle(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is a damaged zip file: {e}") from e
    if not weights:
        raise ValueError(f"{path} holds no tensors")
    return weights
