"""Typed recipes: a recipe (JSON/YAML file, packaged name, or dict) becomes a
dataclass, and every key and value is checked before anything is loaded.

`parse(cls, mapping, where)` fills dataclass `cls` from `mapping`: an unknown
key is an error naming the nearest valid one, as is a missing key that has no
default; each value must have its field's type (an integer is not a string of
digits, a float is finite); each class's `check()` then bounds its values,
naming the key and the allowed range.

One config per training family: `FinetuneConfig`, `NavitConfig`, `EveConfig`,
`OpenVision2Config` (`family_config` picks by the recipe's `family`). Each task
parses its recipe once, at the top of `run`, before any data or model is read.
"""

import dataclasses
import difflib
import math
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..models.navit import ModelArgs as NavitArgs
from ..models.openvision import ATTENTION_MASKS, DECODER_VARIANTS, VIT_VARIANTS, DecoderConfig, VisionConfig
from ..processors.image import FIT_PIXELS

MAX_DATA_BYTES = 64 << 30  # a conversations file larger than this is refused (64 GiB)
MAX_LORA_RANK = 4096  # and never above a target layer's smaller dimension (checked on the model)


class ConfigError(ValueError):
    """A recipe key or value that cannot be used; the message names the key."""


MLX_LM_NAMES = {  # mlx-lm's config names -> ours, for the hint
    "learning_rate": "lr", "iters": "steps", "batch_size": "micro_batch_size", "fine_tune_type": "method",
    "grad_accumulation_steps": "grad_accumulation", "save_every": "checkpoint_every", "steps_per_eval": "eval_every",
    "val_batches": "eval_samples", "lora_parameters": "lora", "max_seq_length": "max_tokens",
}


def nearest(key: str, valid) -> str:
    if MLX_LM_NAMES.get(key) in valid:
        return f"; did you mean {MLX_LM_NAMES[key]!r}? (mlx-lm's {key!r})"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(value) -> str:
    return f"{value!r} (a string)" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def coerce(value, kind, key: str):
    """`value` checked against the annotation `kind` (int, float, bool, str,
    Optional, List, Dict, or a dataclass)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object (a mapping), got {_type_name(value)}")
        return parse(kind, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_type_name(value)}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object (a mapping), got {_type_name(value)}")
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_type_name(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {_type_name(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_type_name(value)}")
        return value
    return value


def _key_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where != "recipe" else key


def _required(field_: dataclasses.Field) -> bool:
    return field_.default is dataclasses.MISSING and field_.default_factory is dataclasses.MISSING


def parse(cls, mapping: dict, where: str = "recipe"):
    """Dataclass `cls` from `mapping`; unknown keys, missing required keys and
    wrong types are errors. A class may look at the raw mapping first
    (`check_mapping`), for errors about which keys belong together."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be an object (a mapping), got {_type_name(mapping)}")
    if hasattr(cls, "check_mapping"):
        cls.check_mapping(mapping, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in mapping.items():
        name = _key_path(where, key)
        if key not in fields:
            raise ConfigError(f"unknown key {name!r}{nearest(key, fields)}")
        values[key] = coerce(value, hints[key], name)
    missing = [name for name, f in fields.items() if _required(f) and name not in values]
    if missing:
        raise ConfigError(f"missing key {_key_path(where, missing[0])!r}")
    obj = cls(**values)
    obj.check(where)
    return obj


def at_least(value, low, key: str, note: str = "") -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key} must be >= {low}{note}, got {value}")


def within(value, low, high, key: str, note: str = "") -> None:
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{key} must be in [{low}, {high}]{note}, got {value}")


def one_of(value, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def regular_file(path, key: str, max_bytes: int = MAX_DATA_BYTES) -> Path:
    """`path` as a regular file of at most `max_bytes`: not a folder, FIFO or device."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}: file not found: {path}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{key}: {path} is a folder; give a .jsonl file (or a folder holding train.jsonl)")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file (a FIFO, socket or device cannot be read as data)")
    if st.st_size > max_bytes:
        raise ConfigError(f"{key}: {path} is {st.st_size} bytes; the limit is {max_bytes}")
    return path


def writable_folder(path, key: str) -> Path:
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{key}: {p} is a file, not a folder")
            break
    return path


# ---------------------------------------------------------------- finetuning


@dataclass
class LoraSection:
    targets: List[str] = field(default_factory=lambda: [r"language_model\..*(q|k|v|o|gate|up|down)_proj"])
    rank: int = 8
    scale: float = 20.0  # mlx-lm's
    dropout: float = 0.0
    num_layers: Optional[int] = None  # only the last N decoder layers (mlx-lm's --num-layers); None or -1: all

    def check(self, where: str) -> None:
        within(self.rank, 1, MAX_LORA_RANK, f"{where}.rank", " (and at most a target layer's smaller dimension)")
        if not 0 < abs(self.scale) <= 1e4:
            raise ConfigError(f"{where}.scale must be non-zero with |scale| <= 1e4, got {self.scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers is not None and self.num_layers != -1:
            at_least(self.num_layers, 1, f"{where}.num_layers", " (or -1 for all)")
        if not self.targets:
            raise ConfigError(f"{where}.targets must name at least one layer pattern")


@dataclass
class OptimSection:
    lr: float = 3e-4
    warmup_steps: int = 10
    end_lr: float = 0.0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_decay: Optional[List[str]] = None
    bias_correction: bool = False  # mlx's Adam/AdamW as they come, as mlx-lm uses them
    decay_all: bool = True
    lr_multipliers: Dict[str, float] = field(default_factory=dict)

    def check(self, where: str) -> None:
        if not 0 < self.lr <= 1.0:
            raise ConfigError(f"{where}.lr must be in (0, 1], got {self.lr}")
        within(self.end_lr, 0.0, self.lr, f"{where}.end_lr", " (0 up to lr)")
        at_least(self.warmup_steps, 0, f"{where}.warmup_steps")
        within(self.weight_decay, 0.0, 1.0, f"{where}.weight_decay")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.eps <= 1e-2:
            raise ConfigError(f"{where}.eps must be in (0, 1e-2], got {self.eps}")
        for k, v in self.lr_multipliers.items():
            within(v, 0.0, 100.0, f"{where}.lr_multipliers[{k!r}]")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["no_decay"] is None:
            d.pop("no_decay")
        return d


@dataclass
class DataSection:
    train: Optional[str] = None  # a conversations .jsonl, or a folder holding train.jsonl (and valid.jsonl)
    jsonl: Optional[str] = None  # an older name for train
    valid: Optional[str] = None
    valid_fraction: float = 0.0
    on_bad_record: str = "error"

    def check(self, where: str) -> None:
        if self.valid_fraction != 0.0 and not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"{where}.valid_fraction must be in (0, 1) (or 0 for no split), "
                              f"got {self.valid_fraction}")
        one_of(self.on_bad_record, ("error", "skip"), f"{where}.on_bad_record")

    def files(self, where: str = "data"):
        """(train file, valid file or None), each checked to be a regular file;
        a folder is read as mlx-lm's data folder (train.jsonl, valid.jsonl)."""
        train = self.train or self.jsonl
        if not train:
            raise ConfigError("no training data: pass --data FILE.jsonl (or set data.train in the recipe)")
        valid = self.valid
        if Path(train).is_dir():
            folder = Path(train)
            if not (folder / "train.jsonl").exists():
                raise ConfigError(f"{where}.train: the folder {folder} has no train.jsonl; give a .jsonl file "
                                  "or a folder holding train.jsonl (and optionally valid.jsonl)")
            train = folder / "train.jsonl"
            if valid is None and (folder / "valid.jsonl").exists():
                valid = folder / "valid.jsonl"
        train = regular_file(train, f"{where}.train")
        return train, (regular_file(valid, f"{where}.valid") if valid else None)


@dataclass
class FinetuneConfig:
    """Every key a finetuning recipe may have (train/README.md lists them);
    the defaults are the ones measured to teach the embedded model a new answer
    form from 100 conversations in minutes (docs/finetuning.md)."""

    family: str = "finetune"
    task: Optional[str] = None  # an older name for family
    model: Optional[str] = None  # None: the embedded default model
    data: DataSection = field(default_factory=DataSection)
    output: Optional[str] = None  # the run folder; None: runs/<method>
    adapter_path: Optional[str] = None  # where the adapters go; None: <output>/adapters
    resume_adapter_file: Optional[str] = None  # adapter weights to start from
    method: str = "lora"
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: Optional[List[str]] = None  # regexes of modules kept fixed; None: the vision tower for full, else none
    steps: int = 300
    micro_batch_size: int = 4
    grad_accumulation: int = 1
    max_tokens: Optional[int] = None  # None: the model's context length
    pack: bool = False
    pack_tokens: Optional[int] = None
    on_too_long: str = "skip"
    mask_prompt: bool = True  # the loss on assistant tokens only
    optim: OptimSection = field(default_factory=OptimSection)
    eval_every: int = 0
    eval_samples: int = 16
    checkpoint_every: Optional[int] = None  # None: only at the end
    keep_checkpoints: int = 2
    grad_checkpoint: bool = False
    compute_dtype: Optional[str] = None
    seed: int = 0
    reference: Optional[str] = None  # free text: where the recipe's values come from

    def check(self, where: str) -> None:
        one_of(self.family if self.task is None else self.task, ("finetune",), "family")
        one_of(self.method, ("lora", "dora", "full"), "method")
        at_least(self.steps, 1, "steps")
        within(self.micro_batch_size, 1, 4096, "micro_batch_size")
        within(self.grad_accumulation, 1, 1 << 16, "grad_accumulation")
        at_least(self.max_tokens, 8, "max_tokens")
        at_least(self.pack_tokens, 8, "pack_tokens")
        one_of(self.on_too_long, ("skip", "error"), "on_too_long")
        at_least(self.eval_every, 0, "eval_every", " (0: no evaluation)")
        at_least(self.eval_samples, 1, "eval_samples")
        if self.checkpoint_every is not None:
            at_least(self.checkpoint_every, 1, "checkpoint_every", " (leave it out to checkpoint only at the end)")
        at_least(self.keep_checkpoints, 0, "keep_checkpoints", " (0: keep all)")
        one_of(self.compute_dtype, (None, "float32", "bfloat16", "float16"), "compute_dtype")
        at_least(self.seed, 0, "seed")
        if self.output is not None:
            writable_folder(self.output, "output")
        if self.adapter_path is not None:
            writable_folder(self.adapter_path, "adapter_path")
        if self.resume_adapter_file is not None:
            regular_file(self.resume_adapter_file, "resume_adapter_file", 1 << 40)

    @property
    def frozen(self) -> List[str]:
        """Full finetuning keeps the vision tower unless told: on 100 conversations, training it
        too made the default model confuse shapes (docs/finetuning.md)."""
        if self.freeze is not None:
            return self.freeze
        return [r"^vision_tower\."] if self.method == "full" else []

    @property
    def run_folder(self) -> Path:
        return Path(self.output or self.adapter_path or f"runs/{self.method}")

    @property
    def adapter_folder(self) -> Path:
        return Path(self.adapter_path) if self.adapter_path else self.run_folder / "adapters"


def finetune_config(recipe) -> FinetuneConfig:
    return recipe if isinstance(recipe, FinetuneConfig) else parse(FinetuneConfig, recipe)


# ---------------------------------------------------------------- shared by the other families

DTYPES = (None, "float32", "bfloat16", "float16")


@dataclass
class PretrainOptimSection(OptimSection):
    """The `optim` section of the pretraining families: `OptimSection`'s keys
    and checks with the shared builder's defaults (`optim.build_optimizer`)."""

    lr: float = field()  # required (field() overrides the inherited default): no rate suits every model
    warmup_steps: int = 0
    bias_correction: bool = True
    decay_all: bool = False


def known_keys(mapping: Optional[dict], cls, where: str) -> Optional[dict]:
    """`mapping` (handed to the model config `cls` as it is) with every key one of `cls`'s fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in mapping or {}:
        if key not in names:
            raise ConfigError(f"unknown key {_key_path(where, key)!r}{nearest(key, names)}")
    return mapping


def check_run(cfg) -> None:
    """The keys every family hands to the shared loop."""
    at_least(cfg.steps, 1, "steps")
    within(cfg.grad_accumulation, 1, 1 << 16, "grad_accumulation")
    at_least(cfg.checkpoint_every, 0, "checkpoint_every", " (0: only at the end)")
    at_least(cfg.keep_checkpoints, 0, "keep_checkpoints", " (0: keep all)")
    at_least(cfg.seed, 0, "seed")
    writable_folder(cfg.output, "output")


def positive(value, key: str) -> None:
    at_least(value, 1, key)


def is_rate(value, key: str) -> None:
    """A drop rate or probability in [0, 1)."""
    if value is not None and not 0.0 <= value < 1.0:
        raise ConfigError(f"{key} must be in [0, 1), got {value}")


# ---------------------------------------------------------------- navit


@dataclass
class NavitData:
    jsonl: Optional[str] = None  # {"image": ..., "label": ...} lines
    images: Optional[str] = None  # the folder jsonl's image paths are relative to; None: jsonl's own
    folder: Optional[str] = None  # or one sub-folder of images per class
    valid: Optional[str] = None  # a held-out jsonl, for `eval`
    shuffle: bool = True

    @staticmethod
    def check_mapping(mapping: dict, where: str) -> None:
        if mapping.get("jsonl") is None and mapping.get("folder") is None:
            raise ConfigError(f"{where} needs 'jsonl' (+ 'images') or 'folder', got {sorted(mapping)}")

    def check(self, where: str) -> None:
        pass


@dataclass
class NavitModel:
    """`models.navit.ModelArgs` less the classes, which come from the recipe or the data."""

    patch_size: int = NavitArgs.patch_size
    hidden_size: int = NavitArgs.hidden_size
    num_layers: int = NavitArgs.num_layers
    num_heads: int = NavitArgs.num_heads
    mlp_ratio: float = NavitArgs.mlp_ratio
    position_table: int = NavitArgs.position_table
    channels: int = NavitArgs.channels

    def check(self, where: str) -> None:
        for key in ("patch_size", "hidden_size", "num_layers", "num_heads", "position_table", "channels"):
            positive(getattr(self, key), f"{where}.{key}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"{where}.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}.hidden_size must be a multiple of {where}.num_heads ({self.num_heads}), "
                              f"got {self.hidden_size}")


@dataclass
class NavitImage:
    """Each image's size: a long side drawn from [min_side, max_side] (aspect kept),
    a fixed `side` x `side` square, or its own size capped at `max_side`."""

    min_side: Optional[int] = None
    max_side: Optional[int] = None
    side: Optional[int] = None
    sample_resolution: bool = True

    def check(self, where: str) -> None:
        for key in ("min_side", "max_side", "side"):
            positive(getattr(self, key), f"{where}.{key}")
        if self.min_side is not None:
            if self.max_side is None:
                raise ConfigError(f"{where}.min_side needs {where}.max_side (the range sides are drawn from)")
            within(self.min_side, 1, self.max_side, f"{where}.min_side", " (up to max_side)")


NAVIT_MODES = ("packed", "padded", "square")


@dataclass
class NavitBatching:
    mode: str = "packed"
    seq_len: int = 256  # packed: tokens per row
    sequences: int = 1  # packed: rows per micro-batch
    images: int = 8  # padded and square: images per micro-batch
    side: Optional[int] = None  # square: the side every image is resized to

    def check(self, where: str) -> None:
        if self.mode not in NAVIT_MODES:
            raise ConfigError(f"{where}.mode: unknown batching mode {self.mode!r}; use one of {', '.join(NAVIT_MODES)}")
        if self.mode == "square" and not self.side:
            raise ConfigError(f"batching mode 'square' needs {where}.side")
        for key in ("seq_len", "sequences", "images", "side"):
            positive(getattr(self, key), f"{where}.{key}")


@dataclass
class DropSchedule:
    to: float  # the rate (or max_rate) reached at the last step, linearly

    def check(self, where: str) -> None:
        is_rate(self.to, f"{where}.to")


@dataclass
class TokenDrop:
    """`rate` for every image, or `max_rate` x Beta(`beta`) drawn per image."""

    rate: Optional[float] = None
    max_rate: Optional[float] = None
    beta: List[float] = field(default_factory=lambda: [2.0, 2.0])
    schedule: Optional[DropSchedule] = None

    def check(self, where: str) -> None:
        if self.rate is not None and self.max_rate is not None:
            raise ConfigError(f"{where}: give rate or max_rate, not both")
        is_rate(self.rate, f"{where}.rate")
        is_rate(self.max_rate, f"{where}.max_rate")
        if len(self.beta) != 2 or not all(b > 0 for b in self.beta):
            raise ConfigError(f"{where}.beta must be two numbers > 0, got {self.beta}")


@dataclass
class NavitEval:
    count: int = 0  # held-out images (the first of data.valid); 0: no evaluation
    sides: List[int] = field(default_factory=list)  # long sides to measure accuracy at, besides native

    def check(self, where: str) -> None:
        at_least(self.count, 0, f"{where}.count")
        for i, side in enumerate(self.sides):
            positive(side, f"{where}.sides[{i}]")


@dataclass
class NavitConfig:
    """Every key a NaViT recipe may have (train/navit/shapes.json)."""

    data: NavitData
    steps: int
    optim: PretrainOptimSection
    output: str
    family: str = "navit"
    classes: Optional[List[str]] = None  # None: the data's labels, sorted
    model: NavitModel = field(default_factory=NavitModel)
    image: NavitImage = field(default_factory=NavitImage)
    batching: NavitBatching = field(default_factory=NavitBatching)
    token_drop: Optional[TokenDrop] = None
    grad_accumulation: int = 1
    eval: NavitEval = field(default_factory=NavitEval)
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    compute_dtype: Optional[str] = None
    grad_checkpoint: bool = False
    seed: int = 0

    def check(self, where: str) -> None:
        one_of(self.family, ("navit",), "family")
        check_run(self)
        one_of(self.compute_dtype, DTYPES, "compute_dtype")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ConfigError(f"classes must be distinct names, at least one, got {self.classes}")
        patch, max_side = self.model.patch_size, self.image.max_side
        if self.batching.mode == "packed" and max_side and (max_side // patch) ** 2 > self.batching.seq_len:
            raise ConfigError(f"seq_len {self.batching.seq_len} is below the {(max_side // patch) ** 2} tokens of a "
                              f"{max_side}x{max_side} image; raise batching.seq_len or lower image.max_side")


def navit_config(recipe) -> NavitConfig:
    return recipe if isinstance(recipe, NavitConfig) else parse(NavitConfig, recipe)


# ---------------------------------------------------------------- eve


@dataclass
class EveScale:
    """A stage's hyperparameters at one scale (`laptop`, or `reference`: the
    values read from the reference scripts). Only learning_rate, batch_size,
    steps, warmup_ratio, weight_decay and max_length drive the run; the rest
    record the reference's setting."""

    learning_rate: Optional[float] = None
    batch_size: Optional[int] = None
    per_device_batch_size: Optional[int] = None  # the batch size when batch_size is left out
    steps: Optional[int] = None
    warmup_ratio: float = 0.0
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_length: int = 2048
    dtype: Optional[str] = None
    global_batch_size: Optional[int] = None
    devices: Optional[int] = None
    epochs: Optional[int] = None
    optimizer: Optional[str] = None
    source: Optional[str] = None
    data: Optional[str] = None
    init: Optional[str] = None
    note: Optional[str] = None
    unverified: Optional[str] = None  # which values were not in the reference notes

    def check(self, where: str) -> None:
        if self.learning_rate is not None and not 0 < self.learning_rate <= 1.0:
            raise ConfigError(f"{_key_path(where, 'learning_rate')} must be in (0, 1], got {self.learning_rate}")
        for key in ("batch_size", "per_device_batch_size", "steps", "max_length", "global_batch_size", "devices",
                    "epochs"):
            positive(getattr(self, key), _key_path(where, key))
        is_rate(self.warmup_ratio, _key_path(where, "warmup_ratio"))
        one_of(self.lr_scheduler, ("cosine",), _key_path(where, "lr_scheduler"))
        within(self.weight_decay, 0.0, 1.0, _key_path(where, "weight_decay"))
        one_of(self.dtype, DTYPES, _key_path(where, "dtype"))


@dataclass
class EveData:
    jsonl: Optional[str] = None  # JSON lines: captions (stages 1-2) or conversations (stage 3)
    train: Optional[str] = None  # another name for jsonl

    def check(self, where: str) -> None:
        pass

    @property
    def path(self) -> Optional[str]:
        return self.jsonl or self.train


EVE_MODULES = ("vision_tower", "mm_projector", "language_model", "aligner")


@dataclass
class EveConfig:
    """Every key an EVE stage recipe may have (train/eve/stage*.json), and the
    run's own: model, teacher, data, output and the overrides of the scale's values."""

    stage: int
    prompt_format: str
    model: str
    output: str
    family: str = "eve"
    name: Optional[str] = None
    trainable: Optional[List[str]] = None  # for the reader: what trains follows `stage` (eve_align.trainable_modules)
    align_loss_weight: float = 1.0
    scale: str = "laptop"
    laptop: Optional[EveScale] = None
    reference: Optional[EveScale] = None
    steps: Optional[int] = None  # these three override the scale's
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    teacher: Optional[str] = None  # None: the CLIP teacher inside `model`
    teacher_config: Optional[str] = None
    data: EveData = field(default_factory=EveData)
    image_root: Optional[str] = None  # None: data's folder
    grad_accumulation: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0

    def check(self, where: str) -> None:
        one_of(self.family, ("eve",), "family")
        within(self.stage, 1, 3, "stage")
        one_of(self.prompt_format, ("plain", "vicuna_v1"), "prompt_format")
        for i, module in enumerate(self.trainable or []):
            one_of(module, EVE_MODULES, f"trainable[{i}]")
        at_least(self.align_loss_weight, 0.0, "align_loss_weight")
        one_of(self.scale, ("laptop", "reference"), "scale")
        if getattr(self, self.scale) is None:
            raise ConfigError(f"scale {self.scale!r} needs a {self.scale!r} block")
        scale = self.hyperparameters
        if scale.steps is None:
            raise ConfigError("the reference scale is given in epochs: pass --steps")
        if scale.batch_size is None:
            raise ConfigError(f"{self.scale} has no batch_size: pass --batch-size")
        if scale.learning_rate is None:
            raise ConfigError(f"{self.scale} has no learning_rate: pass --learning-rate")
        if not self.data.path:
            raise ConfigError("the recipe needs data.jsonl (a JSON-lines file), or pass --data")
        check_run(self)

    @property
    def hyperparameters(self) -> EveScale:
        """The chosen scale's block, the top-level overrides on top, checked again."""
        chosen = getattr(self, self.scale)
        overrides = {key: getattr(self, key) for key in ("steps", "batch_size", "learning_rate")
                     if getattr(self, key) is not None}
        scale = dataclasses.replace(chosen, **overrides)
        scale.check("recipe")  # names the overridden keys at top level
        if scale.batch_size is None:
            scale = dataclasses.replace(scale, batch_size=scale.per_device_batch_size)
        return scale


def eve_config(recipe) -> EveConfig:
    return recipe if isinstance(recipe, EveConfig) else parse(EveConfig, recipe)


# ---------------------------------------------------------------- openvision2


@dataclass
class OpenVision2Model:
    """The ViT and caption decoder: variants (`vision`, `decoder`: "S", "B", "L", ...)
    or explicit `vision_config`/`decoder_config` (models.openvision's keys)."""

    image_size: int
    patch_size: int = 14
    vision: Optional[str] = None
    decoder: Optional[str] = None
    vision_config: Optional[Dict[str, Any]] = None
    decoder_config: Optional[Dict[str, Any]] = None
    keep_ratio: float = 0.35  # the share of visual tokens the decoder sees
    attention_mask: str = "prefix"
    max_text_len: int = 128
    pad_token_id: Optional[int] = None  # None: the released [PAD]/[BOS]/[EOS], else the tokenizer's
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def check(self, where: str) -> None:
        positive(self.patch_size, f"{where}.patch_size")
        positive(self.image_size, f"{where}.image_size")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}.image_size must be a multiple of {where}.patch_size ({self.patch_size}), "
                              f"got {self.image_size}")
        if self.vision_config is None:
            one_of(self.vision, tuple(VIT_VARIANTS), f"{where}.vision")
        if self.decoder_config is None:
            one_of(self.decoder, tuple(DECODER_VARIANTS), f"{where}.decoder")
        known_keys(self.vision_config, VisionConfig, f"{where}.vision_config")
        known_keys(self.decoder_config, DecoderConfig, f"{where}.decoder_config")
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"{where}.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        one_of(self.attention_mask, ATTENTION_MASKS, f"{where}.attention_mask")
        at_least(self.max_text_len, 3, f"{where}.max_text_len", " (bos, a token, eos)")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            at_least(getattr(self, key), 0, f"{where}.{key}")


@dataclass
class CaptionData:
    jsonl: Optional[str] = None  # {"image": ..., "caption": ...} lines
    images: Optional[str] = None  # the folder jsonl's image paths are relative to
    shards: Any = None  # or tar shards: a path, a glob, or a list of paths
    shuffle: bool = True
    shuffle_buffer: int = 256  # shards: samples shuffled together

    def check(self, where: str) -> None:
        if self.jsonl is None and self.shards is None:
            raise ConfigError(f"{where} needs either 'jsonl' (+ 'images') or 'shards'")
        if self.shards is not None and not (isinstance(self.shards, str) or (
                isinstance(self.shards, list) and self.shards and all(isinstance(s, str) for s in self.shards))):
            raise ConfigError(f"{where}.shards must be a path, a glob or a list of paths, got {self.shards!r}")
        positive(self.shuffle_buffer, f"{where}.shuffle_buffer")

    def as_spec(self) -> dict:
        """The section as `data.open_dataset` reads it."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Augment:
    inception_crop: Optional[float] = None  # the smallest crop area; None: no augmentation at all
    colour_jitter: float = 0.0

    def check(self, where: str) -> None:
        if self.inception_crop is not None and not 0 < self.inception_crop <= 1:
            raise ConfigError(f"{where}.inception_crop must be in (0, 1], got {self.inception_crop}")
        within(self.colour_jitter, 0.0, 1.0, f"{where}.colour_jitter")


def three_numbers(values: Optional[List[float]], key: str, low: float) -> None:
    if values is not None and (len(values) != 3 or not all(v >= low for v in values)):
        raise ConfigError(f"{key} must be three numbers (R, G, B) >= {low}, got {values}")


@dataclass
class OpenVision2Config:
    """Every key an OpenVision 2 recipe may have (train/openvision2/stage*.json)."""

    model: OpenVision2Model
    tokenizer: str  # a vocab/checkpoint folder or a Hub id
    data: CaptionData
    batch_size: int
    steps: int
    optim: PretrainOptimSection
    output: str
    family: str = "openvision2"
    stage: Optional[int] = None  # 1: low resolution, 2: high, from `init`
    init: Optional[str] = None  # the stage-1 checkpoints folder or model
    image_fit: str = "crop"
    image_mean: Optional[List[float]] = None  # None: OpenVision's
    image_std: Optional[List[float]] = None
    augment: Optional[Augment] = None
    grad_accumulation: int = 1
    loss_weight: float = 1.0
    compute_dtype: Optional[str] = None
    grad_checkpoint: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    seed: int = 0
    reference: Optional[Dict[str, Any]] = None  # the reference release's values, for the reader; never read

    def check(self, where: str) -> None:
        one_of(self.family, ("openvision2",), "family")
        check_run(self)
        within(self.stage, 1, 2, "stage")
        within(self.batch_size, 1, 1 << 20, "batch_size")
        if self.image_fit not in FIT_PIXELS:
            raise ConfigError(f"image_fit: unknown image_fit {self.image_fit!r}; use one of {', '.join(FIT_PIXELS)}")
        three_numbers(self.image_mean, "image_mean", 0.0)
        three_numbers(self.image_std, "image_std", 1e-6)
        if not self.loss_weight > 0:
            raise ConfigError(f"loss_weight must be > 0, got {self.loss_weight}")
        one_of(self.compute_dtype, DTYPES, "compute_dtype")


def openvision2_config(recipe) -> OpenVision2Config:
    return recipe if isinstance(recipe, OpenVision2Config) else parse(OpenVision2Config, recipe)


FAMILY_CONFIGS = {"finetune": finetune_config, "navit": navit_config, "eve": eve_config,
                  "openvision2": openvision2_config}
CONFIG_CLASSES = {"finetune": FinetuneConfig, "navit": NavitConfig, "eve": EveConfig,
                  "openvision2": OpenVision2Config}


def has_key(family: str, key: str) -> bool:
    """Whether `family`'s recipes have the top-level `key` (True for an unknown family)."""
    cls = CONFIG_CLASSES.get(family)
    return cls is None or key in {f.name for f in dataclasses.fields(cls)}


def family_config(family: str, recipe, source=None):
    """`recipe` (overrides applied) as its family's config; an error names
    `source`, the recipe file, before the key."""
    try:
        return FAMILY_CONFIGS[family](recipe)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
