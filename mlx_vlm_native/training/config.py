"""Typed recipes: a recipe (JSON/YAML file, packaged name, or dict) becomes a
dataclass, and every key and value is checked before anything is loaded.

`parse(cls, mapping, where)` fills dataclass `cls` from `mapping`: an unknown
key is an error naming the nearest valid one; each value must have its field's
type (an integer is not a string of digits, a float is finite); each class's
`check()` then bounds its values, naming the key and the allowed range.
"""

import dataclasses
import difflib
import math
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

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


def parse(cls, mapping: dict, where: str = "recipe"):
    """Dataclass `cls` from `mapping`; unknown keys and wrong types are errors."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be an object (a mapping), got {_type_name(mapping)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in mapping.items():
        name = f"{where}.{key}" if where != "recipe" else key
        if key not in fields:
            raise ConfigError(f"unknown key {name!r}{nearest(key, fields)}")
        values[key] = coerce(value, hints[key], name)
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
