"""LoRA / DoRA adapters (mlx-lm's layers) on a model's Linear layers, and the
adapter folder that finetuning writes and `load(..., adapter_path=)` reads:
`adapter_config.json` + `adapters.safetensors`.

The config is written in the peers' keys: `fine_tune_type`, `num_layers` and
`lora_parameters` {rank, scale, dropout, keys (module paths from the model's
root, as mlx-vlm's trainer writes them)}, plus our `targets` regexes. mlx-vlm's
`apply_lora_layers` reads the folder as it is; `language_model/` beside it
holds the decoder's share in mlx-lm's form (keys relative to a decoder layer,
weight names relative to the language model) for mlx-lm's `load_adapters`.
Reading takes all three forms, and this project's older one
({method, targets, rank, scale}).
"""

import json
import math
import re
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from .weights.files import load_checked_safetensors, read_json_file

ADAPTER_LAYERS = (LoRALinear, DoRALinear)  # mlx-lm's layers that wrap a Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
LANGUAGE_MODEL_FOLDER = "language_model"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # mlx-lm's form of the decoder's adapters


def layer_paths(model: nn.Module) -> List[str]:
    """The module path of each decoder layer (`model.layers`), in order."""
    ids = {id(layer): i for i, layer in enumerate(getattr(model, "layers", []) or [])}
    paths = [None] * len(ids)
    for path, module in model.named_modules():
        if id(module) in ids:
            paths[ids[id(module)]] = path
    return paths


def layer_of(path: str, layers: Sequence[str]) -> Optional[int]:
    return next((i for i, lp in enumerate(layers) if lp and path.startswith(lp + ".")), None)


def linear_dims(module) -> tuple:
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape
        return out, packed * 32 // module.bits
    return tuple(module.weight.shape)


def wrap(module, rank: int, scale: float, dropout: float, dora: bool, path: str):
    if rank > min(linear_dims(module)):
        raise ValueError(f"LoRA rank {rank} exceeds the smaller dimension {min(linear_dims(module))} of {path} "
                         f"{list(linear_dims(module))}: use a rank in [1, {min(linear_dims(module))}]")
    return (DoRALinear if dora else LoRALinear).from_base(module, r=rank, dropout=dropout, scale=scale)


def adapt_linears(model: nn.Module, targets: Sequence[str], rank: int, scale: float,
                  dropout: float = 0.0, dora: bool = False, num_layers: Optional[int] = None) -> List[str]:
    """Wrap every Linear (or QuantizedLinear) whose path matches one of the
    `targets` regexes in a LoRA (or DoRA) layer from mlx-lm; with `num_layers`,
    those inside decoder layers only in the last `num_layers` (mlx-lm's
    --num-layers). Returns the wrapped paths."""
    patterns = [re.compile(t) for t in targets]
    layers = layer_paths(model)
    first = 0 if num_layers in (None, -1) else max(len(layers) - num_layers, 0)
    paths = [
        path for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and any(p.search(path) for p in patterns)
        and (layer_of(path, layers) is None or layer_of(path, layers) >= first)
    ]
    if not paths:
        raise ValueError(f"no Linear layer matches the targets {list(targets)}")
    return adapt_paths(model, paths, rank, scale, dropout, dora)


def adapt_paths(model: nn.Module, paths: Sequence[str], rank: int, scale: float, dropout: float = 0.0,
                dora: bool = False) -> List[str]:
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise ValueError(f"adapter key {missing[0]!r} names no module of this model")
    model.update_modules(tree_unflatten([(p, wrap(modules[p], rank, scale, dropout, dora, p)) for p in paths]))
    return list(paths)


def adapter_config(method: str, keys: Sequence[str], rank: int, scale: float, dropout: float,
                   targets: Sequence[str], model: nn.Module) -> dict:
    """The peers' keys (mlx-lm / mlx-vlm) and ours."""
    layers = layer_paths(model)
    used = [layer_of(k, layers) for k in keys]
    used = [i for i in used if i is not None]
    return {"fine_tune_type": method, "num_layers": len(layers) - min(used) if used else 0,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys)},
            "targets": list(targets)}


def save_adapters(path, model: nn.Module, config: dict) -> None:
    """adapters.safetensors + adapter_config.json, and language_model/ in mlx-lm's form."""
    path = Path(path)
    weights = dict(tree_flatten(model.trainable_parameters()))
    if config.get("fine_tune_type") in ("lora", "dora"):  # the adapters' own leaves (as mlx-lm checks)
        weights = {k: v for k, v in weights.items() if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    write_folder(path, weights, config)
    lm = getattr(model, "language_model", None)
    prefix = next((p for p, m in model.named_modules() if m is lm), None) if lm is not None else None
    keys = config.get("lora_parameters", {}).get("keys", [])
    layers = layer_paths(model)
    inside = [(k, layers[layer_of(k, layers)]) for k in keys if layer_of(k, layers) is not None]
    if not prefix or not inside or config["fine_tune_type"] == "full":
        return
    relative = sorted({k[len(lp) + 1:] for k, lp in inside})
    lm_weights = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    lm_config = {**config, "lora_parameters": {**config["lora_parameters"], "keys": relative},
                 "note": "the language model's share of ../, in mlx-lm's form (mlx_lm.tuner.utils.load_adapters)"}
    lm_config.pop("targets", None)
    write_folder(path / LANGUAGE_MODEL_FOLDER, lm_weights, lm_config)


def write_folder(path: Path, weights: dict, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (ADAPTER_WEIGHTS + ".partial.safetensors")
    mx.save_safetensors(str(tmp), weights)
    tmp.replace(path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def apply_config(model: nn.Module, config: dict) -> str:
    """Wrap the layers an adapter config names; returns the fine-tune type."""
    if "lora_parameters" not in config:  # this project's older form
        method = config.get("method", "lora")
        if method in ("lora", "dora"):
            adapt_linears(model, config["targets"], config["rank"], config["scale"], 0.0, method == "dora")
        return method
    method = config.get("fine_tune_type", "lora")
    if method == "full":
        return method
    lp = config["lora_parameters"]
    rank, scale, dropout = lp["rank"], lp["scale"], lp.get("dropout", 0.0)
    modules = dict(model.named_modules())
    layers = layer_paths(model)
    n = config.get("num_layers", -1)
    tail = layers if n in (None, -1) or n >= len(layers) else layers[len(layers) - n:]
    lm = getattr(model, "language_model", None)
    lm_prefix = next((p for p, m in model.named_modules() if m is lm), None) if lm is not None else None
    keys = lp.get("keys")
    if keys is None:  # mlx-lm's default: every Linear of the last num_layers layers
        keys = [p for lp_ in tail for p, m in modules.items()
                if p.startswith(lp_ + ".") and isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    paths = []
    for key in keys:
        if key in modules:  # from the model's root (mlx-vlm)
            paths.append(key)
        elif lm_prefix and f"{lm_prefix}.{key}" in modules:  # from the language model (mlx-vlm's fallback)
            paths.append(f"{lm_prefix}.{key}")
        else:  # relative to each decoder layer (mlx-lm)
            found = [f"{lp_}.{key}" for lp_ in tail if f"{lp_}.{key}" in modules]
            if not found:
                raise ValueError(f"adapter key {key!r} names no module of this model")
            paths += found
    adapt_paths(model, list(dict.fromkeys(paths)), rank, scale, dropout, method == "dora")
    return method


def load_adapters(model: nn.Module, path) -> nn.Module:
    """An adapter folder of ours, mlx-vlm's or mlx-lm's (whose weight names are
    relative to the language model) onto `model`."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}: not an adapter folder")
    config = read_json_file(path / ADAPTER_CONFIG)
    scale = config.get("scale", (config.get("lora_parameters") or {}).get("scale"))
    if isinstance(scale, (int, float)) and not math.isfinite(scale):
        raise ValueError(f"{path / ADAPTER_CONFIG}: scale is {scale}; it must be a finite number")
    apply_config(model, config)
    weights = load_checked_safetensors(path / ADAPTER_WEIGHTS, "the adapter's weights")
    expected = dict(tree_flatten(model.parameters()))
    if weights and not set(weights) & set(expected) and hasattr(model, "language_model"):
        weights = {f"language_model.{k}": v for k, v in weights.items()}  # mlx-lm's names
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(f"adapter weight '{unknown[0]}' does not exist in this model")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model
