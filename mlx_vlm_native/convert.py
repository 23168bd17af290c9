"""Convert a Hugging Face checkpoint (folder or Hub id) to an MLX folder,
optionally casting and quantizing: `mlx-vlm-native convert`."""

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.utils import quantize_model

from .models import openvision_checkpoint
from .models.base import VisionLanguageModel
from .utils import OPEN_CLIP_CONFIG, copy_side_files, get_model_path, load_model, save_config, save_weights

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
LANGUAGE_MODEL_ATTRIBUTES = ("language_model", "llm")
QUANT_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
QUANT_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
MULTIMODAL_PREFIXES = ("vision_tower", "multi_modal_projector", "visual", "vision_encoder", "vision_projector")


def cast(model: nn.Module, dtype) -> None:
    """Floating-point parameters to `dtype`, lazily."""
    def f(_, v):
        return v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(f, model.parameters()))


def quantize_language_model(model: nn.Module, config: dict, bits: Optional[int] = 4,
                            group_size: Optional[int] = 64, quantize_vision: bool = False,
                            mode: str = "affine", recipe: Optional[str] = None):
    """mlx-lm quantization of the language model; the vision tower and projector
    stay in float unless `quantize_vision`. `mode` is mlx's (affine, mxfp4,
    nvfp4, mxfp8); `recipe` one of mlx-lm's mixed-precision recipes
    (`mixed_4_6`, ...), whose per-layer choices land in `config["quantization"]`."""
    mixed = None
    if recipe is not None:
        mixed = mixed_quant_predicate_builder(recipe, language_model(model), group_size or 64)

    def predicate(path, module):
        if path.endswith("patch_embed.proj"):  # a convolution everywhere else (mlx-vlm, torch)
            return False
        if path.startswith(MULTIMODAL_PREFIXES):
            return quantize_vision
        if mixed is not None:  # the recipe reads the layer index from the language model's paths
            return mixed(path.split(".", 1)[1], module)
        return True

    return quantize_model(model, config, group_size, bits, mode=mode, quant_predicate=predicate)


def check_quantization(bits: Optional[int], group_size: Optional[int], mode: str) -> None:
    """Refuse bits/group size that mlx cannot quantize with, before anything is loaded."""
    if bits is None and group_size is None:
        return
    try:
        g = group_size or 64
        mx.quantize(mx.zeros((1, 4 * g)), group_size=group_size, bits=bits, mode=mode)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot quantize with --q-bits {bits} --q-group-size {group_size} "
                         f"(--q-mode {mode}): {e}") from None


def count_quantized(model: nn.Module) -> int:
    return sum(1 for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))


def partial_folder(dst: Path) -> Path:
    """Where a conversion into `dst` is written before it is renamed into place."""
    return dst.parent / f".{dst.name}.partial"


def language_model(model: nn.Module) -> nn.Module:
    for name in LANGUAGE_MODEL_ATTRIBUTES:
        if name in model:
            return model[name]
    raise ValueError(f"{type(model).__module__} has no language model to quantize with a recipe")


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    quantize_vision: bool = False,
    revision: Optional[str] = None,
    q_mode: str = "affine",
    quant_predicate: Optional[str] = None,
) -> Path:
    """Write the MLX folder `mlx_path`. The folder appears only once complete:
    the conversion is written to a hidden `.NAME.partial` beside it and renamed,
    so a conversion killed midway leaves `mlx_path` as it was and the next run
    starts over (removing the partial folder)."""
    dst = Path(mlx_path)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"--mlx-path {dst} is a file, not a folder; choose a folder path")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose another --mlx-path")
    if quantize:
        check_quantization(q_bits, q_group_size, q_mode)
    src = get_model_path(hf_path, revision)
    work = partial_folder(dst)
    if work.exists():
        print(f"[INFO] Removing {work}, left by a conversion that did not finish")
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_converted(src, work, dtype, quantize, q_bits, q_group_size, quantize_vision, q_mode, quant_predicate)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"[INFO] Saved MLX model to {dst}")
    return dst


def write_converted(src: Path, dst: Path, dtype, quantize, q_bits, q_group_size, quantize_vision, q_mode,
                    quant_predicate) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if (src / OPEN_CLIP_CONFIG).exists():  # an OpenVision encoder (+ caption decoder)
        if quantize:
            raise ValueError("OpenVision encoder/decoder folders convert without quantization")
        model = openvision_checkpoint.load(src)
        if dtype is not None:
            cast(model, DTYPES[dtype])
        openvision_checkpoint.save(model, dst, tokenizer_src=src)
        return
    print(f"[INFO] Loading {src}")
    model, config = load_model(src, lazy=True)
    if "quantization" in config and quantize:
        raise ValueError("the source is already quantized")
    if dtype is not None:
        cast(model, DTYPES[dtype])
        config["torch_dtype"] = dtype
    if quantize:
        if q_mode not in QUANT_MODES or (quant_predicate is not None and quant_predicate not in QUANT_RECIPES):
            raise ValueError(f"--q-mode must be one of {', '.join(QUANT_MODES)}; "
                             f"--quant-predicate one of {', '.join(QUANT_RECIPES)}")
        print(f"[INFO] Quantizing ({q_mode}{', ' + quant_predicate if quant_predicate else ''})")
        model, config = quantize_language_model(model, config, q_bits, q_group_size, quantize_vision,
                                                q_mode, quant_predicate)
        if count_quantized(model) == 0:
            raise ValueError(f"no layer could be quantized with group size {q_group_size}: no weight's input "
                             "dimension is a multiple of it")
    weights = dict(tree_flatten(model.parameters()))
    if isinstance(model, VisionLanguageModel):  # OpenVision 2's captioner keeps its own layout
        weights, config = model.saved_layout(weights, config)
    save_weights(dst, weights)
    copy_side_files(src, dst)
    save_config(config, dst)


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a Hugging Face VLM to MLX.")
    p.add_argument("--hf-path", "--model", dest="hf_path", required=True,
                   help="local HF folder or Hub repo id")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="cast floating-point weights (default: keep the checkpoint's)")
    p.add_argument("-q", "--quantize", action="store_true")
    p.add_argument("--q-bits", type=int, default=None, help="default: the mode's (4 for affine)")
    p.add_argument("--q-group-size", type=int, default=None, help="default: the mode's (64 for affine)")
    p.add_argument("--q-mode", choices=QUANT_MODES, default="affine")
    p.add_argument("--quant-predicate", choices=QUANT_RECIPES, default=None,
                   help="a mixed-precision recipe (mlx-lm's, as mlx-vlm offers)")
    p.add_argument("--quantize-vision", action="store_true",
                   help="also quantize the vision tower and projector")
    p.add_argument("--revision", default=None)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = configure_parser().parse_args(argv)
    try:
        convert(**vars(args))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
