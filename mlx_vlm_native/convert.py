"""Convert a Hugging Face checkpoint (folder or Hub id) to an MLX folder,
optionally casting and quantizing: `mlx-vlm-native convert`."""

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .utils import OPEN_CLIP_CONFIG, copy_side_files, get_model_path, load_model, save_config, save_weights

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MULTIMODAL_PREFIXES = ("vision_tower", "multi_modal_projector", "visual", "vision_encoder", "vision_projector")


def cast(model: nn.Module, dtype) -> None:
    """Floating-point parameters to `dtype`, lazily."""
    def f(_, v):
        return v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(f, model.parameters()))


def quantize_language_model(model: nn.Module, config: dict, bits: int = 4, group_size: int = 64, quantize_vision: bool = False):
    """mlx-lm quantization of the language model; the vision tower and projector
    stay in float unless `quantize_vision`."""
    from mlx_lm.utils import quantize_model

    def predicate(path, module):
        if path.endswith("patch_embed.proj"):  # a convolution everywhere else (mlx-vlm, torch)
            return False
        return quantize_vision or not path.startswith(MULTIMODAL_PREFIXES)

    return quantize_model(model, config, group_size, bits, quant_predicate=predicate)


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quantize_vision: bool = False,
    revision: Optional[str] = None,
) -> Path:
    src = get_model_path(hf_path, revision)
    dst = Path(mlx_path)
    if (src / OPEN_CLIP_CONFIG).exists():  # an OpenVision encoder (+ caption decoder)
        if quantize:
            raise ValueError("OpenVision encoder/decoder folders convert without quantization")
        from . import openvision_checkpoint

        return openvision_checkpoint.convert(src, dst, dtype)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose another --mlx-path")
    print(f"[INFO] Loading {src}")
    model, config = load_model(src, lazy=True)
    if "quantization" in config and quantize:
        raise ValueError("the source is already quantized")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
        cast(model, DTYPES[dtype])
        config["torch_dtype"] = dtype
    if quantize:
        print(f"[INFO] Quantizing to {q_bits} bits, group size {q_group_size}")
        model, config = quantize_language_model(model, config, q_bits, q_group_size, quantize_vision)
    weights = dict(tree_flatten(model.parameters()))
    layout = getattr(importlib.import_module(type(model).__module__), "mlx_vlm_layout", None)
    if layout is not None:  # the peer has this architecture: write its layout, which loads in both
        weights, config = layout(weights, config, model.args)
    save_weights(dst, weights)
    copy_side_files(src, dst)
    save_config(config, dst)
    print(f"[INFO] Saved MLX model to {dst}")
    return dst


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a Hugging Face VLM to MLX.")
    p.add_argument("--hf-path", "--model", dest="hf_path", required=True,
                   help="local HF folder or Hub repo id")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="cast floating-point weights (default: keep the checkpoint's)")
    p.add_argument("-q", "--quantize", action="store_true")
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
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
