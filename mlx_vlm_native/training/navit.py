"""NaViT training task: a classifier over images packed at their own resolution
and aspect ratio. Recipes: `train/navit/`.

Each micro-batch is `sequences` rows of `seq_len` tokens. Images are read in
order, resized (native, or a sampled long side with the aspect ratio kept),
patchified, thinned by per-image token dropping, and placed first-fit into the
rows; an image that fits no row starts the next micro-batch. Rows are padded at
their end only. Attention stays inside each image, masked attention pooling
gives one vector per image, and the loss is the mean cross-entropy over images
(the loop weights micro-batches by their image count).

Baselines for `benchmarks/bench_navit.py` (`batching.mode`): "padded" (one image
per row, rows padded to the longest) and "square" (every image resized to
`side` x `side`).

An image's resolution, drop rate and dropped tokens are drawn from
(seed, where it was read), its drop rate's schedule from the step, so a resumed
run builds the same batches.
"""

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from ..models.base import masked_cross_entropy
from ..models.navit import Model, ModelArgs, image_tokens, scale_to_long_side
from ..native import execution
from ..native.packing import Pack, greedy_pack
from .checkpoint import resume_state
from .config import NavitConfig, NavitData, NavitImage, TokenDrop, navit_config, parse
from .loop import TrainConfig, train
from .stream import positions, rank_batches
from .optim import build_optimizer

def sample_drop_rates(n: int, rng: np.random.Generator, max_rate: float = 0.5, beta=(2.0, 2.0)) -> np.ndarray:
    """Per-image drop rates from a scaled Beta distribution."""
    return max_rate * rng.beta(*beta, size=n)


def drop_tokens(pack: Pack, drop_rates: Sequence[float], rng: np.random.Generator) -> Pack:
    """Keep `max(1, round(L * (1 - r)))` random tokens of each segment, in order.

    Positions travel with the kept tokens, so positional encodings stay right;
    the grids are kept as they were, for the record.
    """
    lengths = np.diff(pack.cu_seqlens)
    if len(drop_rates) != len(lengths):
        raise ValueError(f"{len(drop_rates)} drop rates for {len(lengths)} segments")
    keep_idx, new_lengths = [], []
    for start, n, r in zip(pack.cu_seqlens[:-1], lengths, drop_rates):
        if not 0 <= r < 1:
            raise ValueError(f"drop rate {r} outside [0, 1)")
        k = max(1, int(round(n * (1 - r))))
        keep_idx.append(start + np.sort(rng.choice(n, size=k, replace=False)))
        new_lengths.append(k)
    idx = np.concatenate(keep_idx)
    cu = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int32)
    return Pack(pack.patches[idx], pack.grids, cu, pack.positions[idx])


def sample_resolution(
    height: int, width: int, rng: np.random.Generator,
    min_side: int = 64, max_side: int = 512, multiple: int = 28,
) -> Tuple[int, int]:
    """A new (height, width) with the same aspect ratio whose long side is drawn
    uniformly from [min_side, max_side], rounded to `multiple`."""
    return scale_to_long_side(height, width, rng.uniform(min_side, max_side), multiple)


@dataclass
class Labelled:
    image: Image.Image
    label: int
    key: tuple  # where it was read: seeds its resolution and token dropping


# ---------------------------------------------------------------- data


def data_section(spec) -> NavitData:
    return spec if isinstance(spec, NavitData) else parse(NavitData, spec, "data")


class LabelledFiles:
    """Images with labels: a JSONL of `{"image": "a.png", "label": "cat"}` lines
    (paths relative to it, or to `images`), or a folder of one sub-folder per
    class. Shuffled per epoch from `seed`; `iterate(position)` resumes exactly.
    `spec`: the recipe's `data` section (or its dict)."""

    def __init__(self, spec, seed: int = 0, classes: Optional[Sequence[str]] = None):
        spec = data_section(spec)
        self.records = []
        if spec.jsonl is not None:
            path = Path(spec.jsonl)
            if not path.exists():
                raise FileNotFoundError(f"data file not found: {path}")
            root = Path(spec.images or path.parent)
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(rec, dict) or "image" not in rec or "label" not in rec:
                    raise ValueError(f"{path}:{n}: each line needs 'image' and 'label'")
                self.records.append((root / rec["image"], str(rec["label"]), f"{path}:{n}"))
        else:
            root = Path(spec.folder)
            if not root.is_dir():
                raise FileNotFoundError(f"image folder not found: {root}")
            for sub in sorted(p for p in root.iterdir() if p.is_dir()):
                for f in sorted(sub.iterdir()):
                    if f.suffix.lower().lstrip(".") in ("png", "jpg", "jpeg", "webp", "bmp"):
                        self.records.append((f, sub.name, str(f)))
        if not self.records:
            raise ValueError(f"no labelled images in {spec.jsonl or spec.folder}")
        self.classes = list(classes) if classes else sorted({label for _, label, _ in self.records})
        for _, label, where in self.records:
            if label not in self.classes:
                raise ValueError(f"{where}: label {label!r} is not one of the recipe's classes")
        self.seed, self.shuffle = seed, spec.shuffle

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int, key: tuple) -> Labelled:
        path, label, where = self.records[index]
        if not path.exists():
            raise FileNotFoundError(f"{where}: image not found: {path}")
        return Labelled(Image.open(path).convert("RGB"), self.classes.index(label), key)

    def iterate(self, position: Optional[dict] = None) -> Iterator:
        for item, pos in positions(len(self.records), self.seed, position, self.shuffle):
            yield self.get(item, (pos["epoch"], pos["index"] - 1)), pos


def open_data(spec, seed: int, classes=None):
    return LabelledFiles(spec, seed, classes)


def eval_samples(cfg: NavitConfig, data, count: int) -> List[Labelled]:
    """Held-out examples: the first `count` of the recipe's `data.valid` file."""
    if cfg.data.valid:
        valid = LabelledFiles(NavitData(jsonl=cfg.data.valid, shuffle=False), classes=data.classes)
        return [valid.get(i, (0, i)) for i in range(min(count, len(valid)))]
    return []


# ---------------------------------------------------------------- images to tokens


def drop_rate(cfg, rng: np.random.Generator, progress: float) -> float:
    """`{"rate": r}` for every image, or `{"max_rate": m, "beta": [a, b]}` drawn
    per image (m * Beta(a, b)); `"schedule": {"to": x}` moves r (or m) linearly
    to x over the run (progress 0 -> 1). `cfg`: a TokenDrop section or its dict."""
    if not cfg:
        return 0.0
    if not isinstance(cfg, TokenDrop):
        cfg = parse(TokenDrop, cfg, "token_drop")
    value = cfg.rate if cfg.rate is not None else (cfg.max_rate or 0.0)
    if cfg.schedule:
        value = value + (cfg.schedule.to - value) * progress
    if cfg.rate is not None:
        return float(value)
    return float(sample_drop_rates(1, rng, value, tuple(cfg.beta))[0])


def image_size(image: Image.Image, cfg, patch: int, rng) -> tuple:
    """(h, w): a sampled long side in [min_side, max_side] (aspect kept), a fixed
    `side` x `side` square, or the native size (capped at `max_side`).
    `cfg`: an image section or its dict."""
    if not isinstance(cfg, NavitImage):
        cfg = parse(NavitImage, cfg, "image")
    h, w = image.height, image.width
    if cfg.side:
        return cfg.side, cfg.side
    if cfg.sample_resolution and cfg.min_side is not None:
        return sample_resolution(h, w, rng, cfg.min_side, cfg.max_side, patch)
    if cfg.max_side and max(h, w) > cfg.max_side:
        return scale_to_long_side(h, w, cfg.max_side, patch)
    return scale_to_long_side(h, w, max(h, w), patch)


@dataclass
class Tokens:
    """One image as a single-segment pack, after resizing and token dropping."""

    pack: Pack
    label: int
    full_length: int  # tokens before dropping
    rate: float

    @property
    def length(self) -> int:
        return int(self.pack.cu_seqlens[-1])


def to_tokens(sample: Labelled, patch: int, image_cfg: NavitImage, drop_cfg: Optional[TokenDrop], seed: int,
              progress: float) -> Tokens:
    rng = np.random.default_rng((seed, *sample.key))
    size = image_size(sample.image, image_cfg, patch, rng)
    patches, grid = image_tokens(sample.image, patch, size)
    n = len(patches)
    one = Pack(patches, [grid], np.array([0, n], np.int32), _raster_positions(grid))
    rate = drop_rate(drop_cfg, rng, progress)
    if rate > 0:
        one = drop_tokens(one, [rate], rng)
    return Tokens(one, sample.label, n, rate)


def _raster_positions(grid) -> np.ndarray:
    _, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows.reshape(-1), cols.reshape(-1)], -1).astype(np.int32)


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    pack: Pack  # every row's images and end padding as segments of one pack
    labels: np.ndarray  # (segments,) class index; -1 for padding
    images: int
    tokens: int  # image tokens
    padding: int  # padding tokens


def assemble(rows: Sequence[Sequence[Tokens]], row_length: int, patch_dim: int) -> Batch:
    """Rows of images -> one pack; each row is padded at its end to `row_length`."""
    patches, grids, positions, lengths, labels = [], [], [], [], []
    pad_total = 0
    for row in rows:
        for t in row:
            patches.append(t.pack.patches)
            grids.append(t.pack.grids[0])
            positions.append(t.pack.positions)
            lengths.append(t.length)
            labels.append(t.label)
        pad = row_length - sum(t.length for t in row)
        if pad < 0:
            raise ValueError(f"a row of {row_length - pad} tokens is over its length of {row_length}")
        if pad:
            patches.append(np.zeros((pad, patch_dim), np.float32))
            grids.append((1, 1, pad))
            positions.append(np.stack([np.zeros(pad), np.arange(pad)], -1).astype(np.int32))
            lengths.append(pad)
            labels.append(-1)
            pad_total += pad
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    pack = Pack(np.concatenate(patches), grids, cu, np.concatenate(positions))
    images = sum(len(r) for r in rows)
    return Batch(pack, np.array(labels, np.int32), images, int(cu[-1]) - pad_total, pad_total)


def packed_batches(dataset, make_tokens, seq_len: int, sequences: int, patch_dim: int,
                   position: Optional[dict] = None, first_step: int = 1, steps_per_batch: float = 1.0,
                   stats: Optional[dict] = None) -> Iterator:
    """Yield (Batch of `sequences` x `seq_len` tokens, data position after its
    last image). `make_tokens(sample, step)`; micro-batch m belongs to step
    `first_step + floor(m * steps_per_batch)`. An image that fits no row is
    held for the next micro-batch and re-read from the position on resume."""
    samples = dataset.iterate(position)
    held, pos, m = None, position, 0
    while True:
        step = first_step + int(m * steps_per_batch)
        rows, room = [[] for _ in range(sequences)], [seq_len] * sequences
        while True:
            sample, after = held if held is not None else next(samples)
            held = None
            tokens = make_tokens(sample, step)
            if tokens.length > seq_len:
                raise ValueError(f"image {sample.key} has {tokens.length} tokens, over seq_len {seq_len}; "
                                 "raise seq_len or lower image.max_side")
            fit = next((r for r in range(sequences) if room[r] >= tokens.length), None)
            if fit is None:
                held = (sample, after)
                break
            rows[fit].append(tokens)
            room[fit] -= tokens.length
            pos = after
        batch = assemble(rows, seq_len, patch_dim)
        _count(stats, batch)
        m += 1
        yield batch, pos


def padded_batches(dataset, make_tokens, images: int, patch_dim: int, position: Optional[dict] = None,
                   first_step: int = 1, steps_per_batch: float = 1.0, stats: Optional[dict] = None) -> Iterator:
    """Baselines: `images` images per micro-batch, one per row, every row padded
    to the longest (none for square images)."""
    samples = dataset.iterate(position)
    m = 0
    while True:
        step = first_step + int(m * steps_per_batch)
        rows, pos = [], position
        for _ in range(images):
            sample, pos = next(samples)
            rows.append([make_tokens(sample, step)])
        batch = assemble(rows, max(r[0].length for r in rows), patch_dim)
        _count(stats, batch)
        m += 1
        yield batch, pos


def _count(stats: Optional[dict], batch: Batch) -> None:
    if stats is not None:
        for k in ("images", "tokens", "padding"):
            stats[k] = stats.get(k, 0) + getattr(batch, k)


# ---------------------------------------------------------------- loss and evaluation


def classification_loss(model, batch: Batch, key=None):
    """Mean cross-entropy over the batch's images, and their count."""
    logits = model(batch.pack).astype(mx.float32)
    labels = mx.array(batch.labels)
    return masked_cross_entropy(logits, labels, labels >= 0)


def predict(model, images: Sequence[Image.Image], long_side: Optional[int] = None, side: Optional[int] = None,
            budget: int = 4096) -> np.ndarray:
    """Class indices for PIL images at any resolution: their own (rounded to the
    patch), a long side of `long_side` (aspect kept) or a `side` x `side` square."""
    patch = model.args.patch_size
    items = []
    for im in images:
        if side:
            size = (side, side)
        elif long_side:
            size = scale_to_long_side(im.height, im.width, long_side, patch)
        else:
            size = None
        patches, grid = image_tokens(im, patch, size)
        items.append(Tokens(Pack(patches, [grid], np.array([0, len(patches)], np.int32), _raster_positions(grid)),
                            -1, len(patches), 0.0))
    out = np.zeros(len(items), np.int64)
    for group in greedy_pack([t.length for t in items], max(budget, max(t.length for t in items))):
        batch = assemble([[items[i] for i in group]], sum(items[i].length for i in group), 3 * patch * patch)
        logits = model(batch.pack)
        out[group] = np.array(mx.argmax(logits, axis=-1))
    return out


def accuracy(model, samples: Sequence[Labelled], **resolution) -> float:
    if not samples:
        return float("nan")
    pred = predict(model, [s.image for s in samples], **resolution)
    return float(np.mean(pred == np.array([s.label for s in samples])))


def resolution_curve(model, samples: Sequence[Labelled], sides: Sequence[int]) -> dict:
    """Accuracy at each image's native size and at each long side in `sides`."""
    model.eval()
    curve = {"native": accuracy(model, samples)}
    for side in sides:
        curve[str(side)] = accuracy(model, samples, long_side=side)
    return curve


# ---------------------------------------------------------------- saving


def save_model(model: Model, path) -> Path:
    """`config.json` + `model.safetensors`, each written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".safetensors")
    os.close(fd)
    mx.save_safetensors(tmp, dict(tree_flatten(model.parameters())))
    os.replace(tmp, path / "model.safetensors")
    config = {k: v for k, v in vars(model.args).items()}
    (path / "config.json.tmp").write_text(json.dumps(config, indent=2))
    os.replace(path / "config.json.tmp", path / "config.json")
    return path


def load_model(path) -> Model:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a NaViT model folder")
    model = Model(ModelArgs.from_dict(json.loads((path / "config.json").read_text())))
    model.load_weights(str(path / "model.safetensors"))
    execution.apply(model)
    model.eval()
    return model


# ---------------------------------------------------------------- the run


def model_args(recipe, classes: Sequence[str]) -> ModelArgs:
    cfg = navit_config(recipe)
    return ModelArgs.from_dict({**dataclasses.asdict(cfg.model), "num_classes": len(classes),
                                "classes": list(classes)})


def batch_stream(recipe, dataset, args: ModelArgs, position=None, start_step: int = 0, stats=None,
                 processes: int = 1):
    """The recipe's micro-batches (`batching.mode`: packed, padded or square)."""
    cfg = navit_config(recipe)
    seed, steps, batching = cfg.seed, cfg.steps, cfg.batching
    patch = args.patch_size
    patch_dim = args.channels * patch * patch
    image_cfg = NavitImage(side=batching.side) if batching.mode == "square" else cfg.image

    def make_tokens(sample, step):
        return to_tokens(sample, patch, image_cfg, cfg.token_drop, seed, (step - 1) / max(steps - 1, 1))

    common = dict(position=position, first_step=start_step + 1,
                  steps_per_batch=1 / (cfg.grad_accumulation * processes), stats=stats)
    if batching.mode == "packed":
        return packed_batches(dataset, make_tokens, batching.seq_len, batching.sequences, patch_dim, **common)
    return padded_batches(dataset, make_tokens, batching.images, patch_dim, **common)


def run(recipe, resume: Optional[str] = None, progress: bool = True, on_step=None,
        should_stop=None) -> dict:
    """Train from a recipe (a dict or a NavitConfig), checked whole before any data is read."""
    cfg = navit_config(recipe)
    seed, steps = cfg.seed, cfg.steps
    dataset = open_data(cfg.data, seed, cfg.classes)
    args = model_args(cfg, dataset.classes)
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    execution.apply(model)
    optimizer = build_optimizer(cfg.optim.as_dict(), steps)
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    start, position, rng_key = resume_state(resume, ckpt_dir, model, optimizer, steps)
    stats = {}
    group = mx.distributed.init()
    stream = batch_stream(cfg, dataset, args, position, start, stats, group.size())
    if group.size() > 1:
        stream = rank_batches(stream, group.rank(), group.size())
    config = TrainConfig(
        steps=steps, grad_accumulation=cfg.grad_accumulation,
        compute_dtype=cfg.compute_dtype, grad_checkpoint=cfg.grad_checkpoint,
        checkpoint_dir=str(ckpt_dir), checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints, progress=progress,
    )
    result = train(model, classification_loss, optimizer, stream, config, start_step=start,
                   checkpoint_layers=model.blocks, batch_size_of=lambda b: b.images, on_step=on_step,
                   seed=seed, rng_key=rng_key, should_stop=should_stop)
    result.update(model=model, stats=stats)
    if result.get("stopped"):
        return result
    if group.rank() == 0:
        save_model(model, out / "model")
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        samples = eval_samples(cfg, dataset, cfg.eval.count) if cfg.eval.count else []
        if samples:
            curve = resolution_curve(model, samples, cfg.eval.sides)
            (out / "eval.json").write_text(json.dumps({"accuracy": curve, "count": len(samples)}, indent=2))
            print("[INFO] held-out accuracy by long side: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in curve.items()))
            result["accuracy"] = curve
    return result
