"""Merge trained LoRA/DoRA adapters into the base weights:

    mlx-vlm-native fuse --model BASE --adapter-path RUN/adapters --save-path FUSED [--dequantize] [-q]

A quantized base (QLoRA) stays quantized (each fused layer is re-quantized)
unless `--dequantize`; `-q` quantizes a float result like `convert -q`.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model

from .adapters import ADAPTER_LAYERS
from .convert import quantize_language_model
from .utils import copy_side_files, default_model_path, get_model_path, load, load_config, save_config, save_weights


def fuse(model: Optional[str], adapter_path: str, save_path: str, dequantize: bool = False,
         quantize: bool = False, q_bits: int = 4, q_group_size: int = 64) -> Path:
    src, dst = get_model_path(model or default_model_path()), Path(save_path)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose another --save-path")
    base, _ = load(str(src), adapter_path=adapter_path)
    fused = [(path, m.fuse(dequantize=dequantize)) for path, m in base.named_modules()
             if isinstance(m, ADAPTER_LAYERS)]
    base.update_modules(tree_unflatten(fused))
    config = load_config(src)
    if dequantize:
        base = dequantize_model(base)
        config.pop("quantization", None)
    if quantize:
        if "quantization" in config:
            raise ValueError("the base is already quantized: fuse without -q (or with --dequantize)")
        base, config = quantize_language_model(base, config, q_bits, q_group_size)
    save_weights(dst, base)
    copy_side_files(src, dst)
    save_config(config, dst)
    print(f"[INFO] Fused {len(fused)} adapted layers into {dst}")
    return dst


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge LoRA/DoRA adapters into a model.")
    p.add_argument("--model", default=None, help="the base model: local folder or Hub id (default: the embedded model)")
    p.add_argument("--adapter-path", required=True, help="the adapters folder a training run wrote")
    p.add_argument("--save-path", required=True)
    p.add_argument("--dequantize", action="store_true", help="save float weights even if the base is quantized")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the fused float model")
    p.add_argument("--q-bits", type=int, default=4)
    p.add_argument("--q-group-size", type=int, default=64)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    a = configure_parser().parse_args(argv)
    try:
        fuse(a.model, a.adapter_path, a.save_path, a.dequantize, a.quantize, a.q_bits, a.q_group_size)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
