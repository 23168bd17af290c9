"""Checks of checkpoint files before they are loaded: a safetensors header
against the file it describes, and config.json as JSON. Errors name the file
(and the tensor). And the weight files of a checkpoint folder, read only
through those checks (safetensors) or the safe unpickler (torch pickles)."""

import json
import math
from pathlib import Path
from typing import List

import mlx.core as mx

from .torch_pickle import load_torch_checkpoint

SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit


def check_safetensors(path) -> List[str]:
    """Verify a .safetensors header against the file before anything is mapped:
    the header's length and JSON, each tensor's dtype, shape and byte range
    (inside the data, matching its shape, not overlapping another), and that
    the data is exactly as long as the tensors need (a truncated file fails).
    Returns the names of the tensors it checked."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                             f"the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} has a malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a malformed safetensors header: not a JSON object")
    data_size = size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where} has a malformed header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where} has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise ValueError(f"{where} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"{where} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if not 0 <= begin <= end:
            raise ValueError(f"{where} has data_offsets {offsets} that do not make a byte range")
        if end > data_size:
            raise ValueError(f"{where} ends at byte {end} of the data but the file has {data_size}: "
                             "the file is truncated")
        if end - begin != expected:
            raise ValueError(f"{where} is {dtype} of shape {shape} ({expected} bytes) but its data_offsets "
                             f"{offsets} hold {end - begin} bytes")
        ranges.append((begin, end, name))
    ranges.sort()
    covered = 0
    for begin, end, name in ranges:
        if begin < covered:
            raise ValueError(f"{path}: tensor {name!r} overlaps the tensor before it (bytes {begin}..{end})")
        covered = end
    if covered != data_size:
        raise ValueError(f"{path}: the tensors cover {covered} bytes of data but the file has {data_size}")
    return [name for _, _, name in ranges]


def weight_files(path) -> List[Path]:
    """The weight files of a checkpoint folder: its safetensors, else its torch pickles."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors, pytorch_model*.bin or *.pth weights in {path}")
    return files


def read_weight_file(path) -> dict:
    """The tensors of one weight file: safetensors after `check_safetensors`
    (lazily), a torch pickle through the safe unpickler (no pickled code runs)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_torch_checkpoint(path)
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def load_checked_safetensors(path, what: str) -> dict:
    """A small safetensors file that is loaded whole (adapters, training
    checkpoints): present, its header checked against the file, and every
    floating-point tensor finite. `what` says what the file is, for errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    check_safetensors(path)
    weights = mx.load(str(path))
    for name, array in weights.items():
        if mx.issubdtype(array.dtype, mx.floating) and not mx.all(mx.isfinite(array)).item():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values; {what} is unusable")
    return weights


def read_json_file(path) -> dict:
    """A JSON object file such as config.json; bad JSON is an error naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
