"""The one check of generation parameters, shared by the Python API, the CLI
commands and the server: each value's type, finiteness and range. A bad value
raises `GenerationParameterError` naming the parameter; nothing is clamped."""

import math
from typing import Optional

MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
MAX_TEMPERATURE = 2.0  # OpenAI's range
# Sampling divides float32 logits by the temperature: below this, 1/T x logit overflows float32 for large
# logits (1/T itself does under 3e-39) and softmax turns to NaN, while any sampled choice already differs from
# the argmax only between logits closer than float32 resolves. Such a temperature is greedy decoding.
MIN_SAMPLING_TEMPERATURE = 1e-6


class GenerationParameterError(ValueError):
    """A generation parameter out of its type or range; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _integer(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise GenerationParameterError(name, f"{name} must be an integer {bounds}, got {_show(value)}")
    return int(value)


def _number(name: str, value, low: float, high: Optional[float] = None, low_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            ok = False
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        bounds = (f"> {low:g}" if low_open else f">= {low:g}") + (f" and <= {high:g}" if high is not None else "")
        raise GenerationParameterError(name, f"{name} must be a finite number {bounds}, got {_show(value)}")
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_generation_params(
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
) -> dict:
    """The parameters, checked: max_tokens >= 1 (the model's context bounds it
    further), 0 <= temperature <= 2, 0 <= top_p <= 1 (0 or 1: off),
    0 <= seed < 2**64, repetition_penalty > 0 (None or 1: off),
    repetition_context_size >= 1. A temperature under
    `MIN_SAMPLING_TEMPERATURE` is greedy decoding (0)."""
    temperature = _number("temperature", temperature, 0.0, MAX_TEMPERATURE)
    return dict(
        max_tokens=_integer("max_tokens", max_tokens, 1),
        temperature=0.0 if temperature < MIN_SAMPLING_TEMPERATURE else temperature,
        top_p=_number("top_p", top_p, 0.0, 1.0),
        seed=None if seed is None else _integer("seed", seed, 0, MAX_SEED),
        repetition_penalty=None if repetition_penalty is None
        else _number("repetition_penalty", repetition_penalty, 0.0, low_open=True),
        repetition_context_size=_integer("repetition_context_size", repetition_context_size, 1),
    )


KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize takes
KV_GROUP_SIZES = (32, 64, 128)


def check_cache_params(kv_bits: Optional[int] = None, kv_group_size: int = 64,
                       quantized_kv_start: int = 5000, max_kv_size: Optional[int] = None) -> dict:
    """mlx-lm's KV-cache options, checked: kv_bits (None: full precision) and
    kv_group_size quantize the cache once it holds quantized_kv_start tokens;
    max_kv_size bounds it (a rotating cache that keeps the first 4 tokens).
    The two cannot be combined (mlx-lm cannot quantize a rotating cache)."""
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise GenerationParameterError("kv_bits", f"kv_bits must be one of {list(KV_BITS)}, got {_show(kv_bits)}")
    if kv_group_size not in KV_GROUP_SIZES:
        raise GenerationParameterError(
            "kv_group_size", f"kv_group_size must be one of {list(KV_GROUP_SIZES)}, got {_show(kv_group_size)}")
    checked = dict(
        kv_bits=kv_bits, kv_group_size=kv_group_size,
        quantized_kv_start=_integer("quantized_kv_start", quantized_kv_start, 0),
        max_kv_size=None if max_kv_size is None else _integer("max_kv_size", max_kv_size, 8),
    )
    if kv_bits is not None and max_kv_size is not None:
        raise GenerationParameterError("max_kv_size", "max_kv_size cannot be combined with kv_bits "
                                       "(a rotating KV cache is not quantized)")
    return checked
