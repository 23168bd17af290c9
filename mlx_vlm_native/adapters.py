"""LoRA / DoRA adapters (mlx-lm's layers) on a model's Linear layers, and the
adapter folder that finetuning writes and `load(..., adapter_path=)` reads:
`adapter_config.json` + `adapters.safetensors`."""

import json
import math
import re
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from .weight_files import load_checked_safetensors, read_json_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def adapt_linears(model: nn.Module, targets: Sequence[str], rank: int, scale: float,
                  dropout: float = 0.0, dora: bool = False) -> int:
    """Wrap every Linear (or QuantizedLinear) whose path matches one of the
    `targets` regexes in a LoRA (or DoRA) layer from mlx-lm; returns how many."""
    cls = DoRALinear if dora else LoRALinear
    patterns = [re.compile(t) for t in targets]
    swaps = [
        (path, cls.from_base(module, r=rank, dropout=dropout, scale=scale))
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and any(p.search(path) for p in patterns)
    ]
    if not swaps:
        raise ValueError(f"no Linear layer matches the targets {list(targets)}")
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def save_adapters(path, model: nn.Module, config: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = path / (ADAPTER_WEIGHTS + ".partial.safetensors")
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_adapters(model: nn.Module, path) -> nn.Module:
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}: not an adapter folder")
    config = read_json_file(path / ADAPTER_CONFIG)
    weights = load_checked_safetensors(path / ADAPTER_WEIGHTS, "the adapter's weights")
    scale = config.get("scale")
    if isinstance(scale, (int, float)) and not math.isfinite(scale):
        raise ValueError(f"{path / ADAPTER_CONFIG}: scale is {scale}; it must be a finite number")
    if config["method"] in ("lora", "dora"):
        adapt_linears(model, config["targets"], config["rank"], config["scale"], 0.0, config["method"] == "dora")
    expected = dict(tree_flatten(model.parameters()))
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(f"adapter weight '{unknown[0]}' does not exist in this model")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model
