"""Numbers from a checkpoint's config.json, checked before anything is built.

One table of the sizes every family reads (HF names, wherever they appear in
the config tree: top level, text_config, vision_config, llm_config, ...):
type, range and consistency are checked, and an error names the file, the key
and the allowed range. Then the memory the config implies (parameters x
bytes per parameter, a lower bound) is compared with the machine's memory, so
a config of a million layers or a ten-billion-word vocabulary is refused with
a message instead of failing in an allocation.
"""

import math
import os
from typing import Iterator, Optional, Tuple

INT, FLOAT = "an integer", "a number"

# key: (kind, lowest, highest, lowest excluded)
RULES = {
    "vocab_size": (INT, 1, 10_000_000, False),
    "hidden_size": (INT, 1, 65_536, False),
    "intermediate_size": (INT, 1, 1_048_576, False),
    "num_hidden_layers": (INT, 1, 1_024, False),
    "num_attention_heads": (INT, 1, 1_024, False),
    "num_key_value_heads": (INT, 1, 1_024, False),
    "head_dim": (INT, 1, 8_192, False),
    "max_position_embeddings": (INT, 1, 100_000_000, False),
    "image_size": (INT, 1, 16_384, False),
    "patch_size": (INT, 1, 1_024, False),
    "num_channels": (INT, 1, 64, False),
    "spatial_merge_size": (INT, 1, 64, False),
    "temporal_patch_size": (INT, 1, 64, False),
    "width": (INT, 1, 65_536, False),  # OpenVision / open_clip names
    "layers": (INT, 1, 1_024, False),
    "head_width": (INT, 1, 8_192, False),
    "embed_dim": (INT, 1, 65_536, False),
    "depth": (INT, 1, 1_024, False),
    "num_heads": (INT, 1, 1_024, False),
    "mlp_ratio": (FLOAT, 0, 64, True),
    "rms_norm_eps": (FLOAT, 0, 1, True),
    "layer_norm_eps": (FLOAT, 0, 1, True),
    "rope_theta": (FLOAT, 0, 1e12, True),
    "image_token_index": (INT, 0, 100_000_000, False),
}


NESTED = ("text_config", "vision_config", "llm_config", "decoder_config", "language_config", "vision_tower_config")


class ConfigError(ValueError):
    pass


def invalid_unicode(text: str) -> Optional[int]:
    """The index of the first lone surrogate in `text` (no UTF-8 for it: a JSON
    \\ud800 escape, or a command-line byte that is not UTF-8), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_value(file: str, where: str, value, rule) -> None:
    kind, low, high, open_low = rule
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = numeric and (kind == FLOAT or isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    ok = ok and math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise ConfigError(f"{file}: {where} is {repr(value)[:60]}; it must be {kind} {bound} and <= {high:g}")


def _dicts(config: dict, file: str, path: str = "") -> Iterator[Tuple[str, dict]]:
    """Every object of the config tree with its dotted path; a sub-config
    (`NESTED`) that is neither an object nor null is an error."""
    yield path, config
    for key, value in config.items():
        if key in NESTED and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{file}: {_where(path, key)} must be an object, got {type(value).__name__}")
        if isinstance(value, dict):
            yield from _dicts(value, file, _where(path, key))


def check_config(config: dict, file: str = "config.json") -> None:
    """Type, range and consistency of every size `config` gives, then the memory it implies."""
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(config).__name__}")
    parameters = 0
    for path, d in _dicts(config, file):
        for key, rule in RULES.items():
            value = d.get(key)
            if value is None:
                continue
            for i, v in enumerate(value if isinstance(value, list) and key in ("image_size", "patch_size")
                                  else [value]):
                _check_value(file, _where(path, key) + (f"[{i}]" if isinstance(value, list) else ""), v, rule)
        heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
        if heads and kv and heads % kv:
            raise ConfigError(f"{file}: {_where(path, 'num_attention_heads')} ({heads}) must be a multiple of "
                              f"num_key_value_heads ({kv})")
        hidden = d.get("hidden_size")
        if heads and hidden and not d.get("head_dim") and hidden % heads:
            raise ConfigError(f"{file}: {_where(path, 'hidden_size')} ({hidden}) must be a multiple of "
                              f"num_attention_heads ({heads}) when no head_dim is given")
        parameters += implied_parameters(d)
    check_memory(parameters, bytes_per_parameter(config), file)


def implied_parameters(d: dict) -> int:
    """A lower bound on the parameters one config object describes (its own
    keys only): embeddings, transformer blocks, patch positions."""
    width = d.get("hidden_size") or d.get("width") or d.get("embed_dim") or 0
    layers = d.get("num_hidden_layers") or d.get("layers") or d.get("depth") or 0
    if not isinstance(width, int) or not isinstance(layers, int):
        return 0
    inner = d.get("intermediate_size") or int(width * (d.get("mlp_ratio") or 4))
    total = layers * (4 * width * width + 2 * width * inner)
    vocab = d.get("vocab_size") or 0
    total += vocab * width
    size, patch = d.get("image_size"), d.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and patch:
        total += (size // patch) ** 2 * width
    return int(total)


def bytes_per_parameter(config: dict) -> float:
    quantization = config.get("quantization")
    if isinstance(quantization, dict) and isinstance(quantization.get("bits"), int):
        return quantization["bits"] / 8
    dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return 4 if dtype == "float32" else 2


def machine_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(parameters: int, per_parameter: float, file: str, memory: Optional[int] = None) -> None:
    memory = memory or machine_memory()
    need = parameters * per_parameter
    if memory and need > memory:
        raise ConfigError(f"{file} describes a model of at least {parameters / 1e9:.1f}B parameters, "
                          f"{need / 2**30:.1f} GiB at {per_parameter:g} bytes each: more than this machine's "
                          f"{memory / 2**30:.1f} GiB of memory")
