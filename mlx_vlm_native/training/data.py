"""Image-caption pairs for training, deterministic by seed and resumable.

Two sources:
- `CaptionFolder`: a folder of images plus a JSONL file of
  `{"image": "relative/path.jpg", "caption": "..."}` lines;
- `CaptionShards`: WebDataset-style tar shards (`key.jpg` + `key.txt`, or a
  `key.json` with a "caption"), streamed member by member with `tarfile`.

Both iterate in epochs shuffled from `seed + epoch` and describe where they
are with a small JSON-able `position`; `iterate(position)` continues exactly
from there.
"""

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..processors.image import inception_crop, load_image, normalise
from .stream import epoch_order, positions

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class Sample:
    image: Image.Image
    caption: str
    key: tuple = ()  # where it was read (epoch, ...): seeds its augmentation


class CaptionFolder:
    def __init__(self, jsonl, image_root=None, seed: int = 0, shuffle: bool = True):
        jsonl = Path(jsonl)
        self.root = Path(image_root) if image_root else jsonl.parent
        self.records = []
        for n, line in enumerate(jsonl.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ValueError(f"{jsonl}, line {n}: not a valid UTF-8 JSON record: {e}") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("image"), str) and isinstance(rec.get("caption"), str)):
                raise ValueError(f"{jsonl}, line {n}: each line needs an 'image' path and a 'caption' string")
            self.records.append((rec["image"], rec["caption"]))
        if not self.records:
            raise ValueError(f"{jsonl} has no records")
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.records), self.seed, epoch, self.shuffle)

    def iterate(self, position: Optional[dict] = None) -> Iterator:
        """Yield (Sample, position after it) forever, epoch after epoch."""
        for item, pos in positions(len(self.records), self.seed, position, self.shuffle):
            path, caption = self.records[item]
            yield Sample(load_image(self.root / path), caption, (pos["epoch"], pos["index"] - 1)), pos


def read_shard(path: Path) -> Iterator[Sample]:
    """Stream one tar shard: group consecutive members by key (name up to the first dot)."""
    current, parts = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            key = str(Path(member.name).parent / key)
            if key != current and current is not None:
                sample = to_sample(current, parts)
                if sample is not None:
                    yield sample
                parts = {}
            current = key
            parts[ext.lower() or name] = tar.extractfile(member).read()
    if current is not None:
        sample = to_sample(current, parts)
        if sample is not None:
            yield sample


def to_sample(key: str, parts: dict) -> Optional[Sample]:
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
        return None
    if "txt" in parts:
        caption = parts["txt"].decode("utf-8").strip()
    elif "json" in parts:
        caption = json.loads(parts["json"])["caption"]
    else:
        return None
    return Sample(load_image(image), caption)


class CaptionShards:
    """Tar shards, shard order shuffled per epoch and samples shuffled inside a
    bounded buffer; a position is (epoch, shard, samples already yielded from it)."""

    def __init__(self, shards: Sequence, seed: int = 0, shuffle: bool = True, buffer: int = 256):
        self.shards = sorted(Path(s) for s in shards)
        if not self.shards:
            raise ValueError("no tar shards given")
        missing = [s for s in self.shards if not s.exists()]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]}")
        self.seed, self.shuffle, self.buffer = seed, shuffle, buffer

    def shard_order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.shards), self.seed, epoch, self.shuffle)

    def shard_samples(self, shard: Path, epoch: int, index: int) -> Iterator[Sample]:
        if not self.shuffle:
            yield from read_shard(shard)
            return
        rng = np.random.default_rng((self.seed, epoch, index))
        pool: List[Sample] = []
        for sample in read_shard(shard):
            pool.append(sample)
            if len(pool) >= self.buffer:
                yield pool.pop(int(rng.integers(len(pool))))
        while pool:
            yield pool.pop(int(rng.integers(len(pool))))

    def iterate(self, position: Optional[dict] = None) -> Iterator:
        pos = dict(position or {"epoch": 0, "shard": 0, "offset": 0})
        epoch, shard, offset = pos["epoch"], pos["shard"], pos["offset"]
        while True:
            order = self.shard_order(epoch)
            for s in range(shard, len(order)):
                stream = self.shard_samples(self.shards[order[s]], epoch, s)
                for k, sample in enumerate(stream):
                    if k < offset:  # resuming: replay the deterministic stream
                        continue
                    sample.key = (epoch, s, k)
                    yield sample, {"epoch": epoch, "shard": s, "offset": k + 1}
                offset = 0
            epoch, shard = epoch + 1, 0


def open_dataset(spec: dict, seed: int = 0):
    """A recipe's `data` section: {"jsonl": ..., "images": ...} or {"shards": [...]/glob}."""
    if "jsonl" in spec:
        return CaptionFolder(spec["jsonl"], spec.get("images"), seed=seed, shuffle=spec.get("shuffle", True))
    if "shards" in spec:
        shards = spec["shards"]
        if isinstance(shards, str):
            base = Path(shards)
            shards = sorted(base.parent.glob(base.name)) if any(c in base.name for c in "*?[") else [base]
        return CaptionShards(shards, seed=seed, shuffle=spec.get("shuffle", True),
                             buffer=spec.get("shuffle_buffer", 256))
    raise ValueError("data needs either 'jsonl' (+ 'images') or 'shards'")


def batches(dataset, batch_size: int, collate: Callable, position: Optional[dict] = None) -> Iterator:
    """Yield (collate(samples), position after the batch)."""
    items, pos = [], position
    for sample, pos in dataset.iterate(position):
        items.append(sample)
        if len(items) == batch_size:
            yield collate(items), pos
            items = []


def colour_jitter(x: np.ndarray, strength: float, rng, p_jitter: float = 0.8, p_gray: float = 0.2) -> np.ndarray:
    """SimCLR-style jitter on (H, W, 3) floats in [0, 1]: brightness, contrast and
    saturation by factors in [1 - s, 1 + s] (random order, prob. p_jitter), then
    grayscale with prob. p_gray. (The reference also jitters hue by 0.1 s; not done here.)"""
    gray = lambda a: (a @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]  # noqa: E731
    if rng.random() < p_jitter:
        for op in rng.permutation(3):
            f = np.float32(rng.uniform(1 - strength, 1 + strength))
            if op == 0:
                x = x * f
            elif op == 1:
                x = (x - gray(x).mean()) * f + gray(x).mean()
            else:
                x = (x - gray(x)) * f + gray(x)
            x = np.clip(x, 0.0, 1.0)
    if rng.random() < p_gray:
        x = np.repeat(gray(x), 3, axis=-1)
    return x


def augmented_pixels(sample: Sample, size: int, mean, std, seed: int, area_min: float, jitter: float) -> np.ndarray:
    """Training pixels (size, size, 3): inception crop + colour jitter, drawn from
    an RNG seeded by (seed, where the sample was read), so resumed runs repeat them."""
    rng = np.random.default_rng((seed, *sample.key))
    x = np.asarray(inception_crop(sample.image, size, area_min, rng), dtype=np.float32) / 255.0
    if jitter > 0:
        x = colour_jitter(x, jitter, rng)
    return normalise(x, mean, std)


def tokenize_captions(tokenizer, captions: Sequence[str], max_len: int, bos: int, eos: int, pad: int) -> np.ndarray:
    """[bos] caption [eos] pad..., truncated to `max_len` tokens, (B, max_len) int32."""
    out = np.full((len(captions), max_len), pad, dtype=np.int32)
    for i, text in enumerate(captions):
        ids = tokenizer.encode(text, add_special_tokens=False)[: max_len - 2]
        ids = [bos] + ids + [eos]
        out[i, : len(ids)] = ids
    return out
