"""Tiny random OpenVision 2 checkpoints in the released open_clip layout
(`open_clip_config.json`, the tower's torch names, the caption decoder and a
BERT WordPiece vocabulary): layout fixtures for the tests and offline demos,
which `mlx-vlm-native convert` turns into MLX folders.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mlx_vlm_native.models.openvision import IMAGENET_MEAN, IMAGENET_STD, positional_table
from mlx_vlm_native.models.openvision_checkpoint import DECODER_CONFIG, DECODER_WEIGHTS, OPEN_CLIP_CONFIG

TINY_WORDS = (
    "a photo of the cat dog red blue green square circle on in with and small large "
    "image picture white black yellow two one sitting table grass sky tree car".split()
)


def write_vocab(path: Path, words=TINY_WORDS) -> list:
    """A WordPiece vocab with pad/bos/eos at 0/1/2 as in the released decoders."""
    tokens = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    Path(path).write_text("\n".join(tokens) + "\n")
    return tokens


def write_tiny_open_clip(dst, image_size: int = 28, patch_size: int = 7, width: int = 32,
                         layers: int = 2, head_width: int = 8, decoder_width: int = 24,
                         decoder_depth: int = 2, decoder_heads: int = 3,
                         seed: int = 0, weights_format: str = "safetensors") -> Path:
    """Random weights in the released open_clip + caption-decoder layout (torch
    names and shapes, OIHW conv, fused in_proj), the MoCo-v3 positional table
    stored as the JAX converter stores it, and a tiny BERT vocab."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ln(prefix, d):
        return {f"{prefix}.weight": 1 + r(d), f"{prefix}.bias": r(d)}

    W, mlp, grid = width, 4 * width, image_size // patch_size
    vision = {
        "conv1.weight": r(W, 3, patch_size, patch_size),
        "class_embedding": r(W),
        "positional_embedding": np.array(positional_table(grid, W)),
        "proj": r(W, W),
        **ln("ln_post", W),
    }
    def block(prefix, d, hidden):
        return {
            **ln(f"{prefix}.ln_1", d), **ln(f"{prefix}.ln_2", d),
            f"{prefix}.attn.in_proj_weight": r(3 * d, d), f"{prefix}.attn.in_proj_bias": r(3 * d),
            f"{prefix}.attn.out_proj.weight": r(d, d), f"{prefix}.attn.out_proj.bias": r(d),
            f"{prefix}.mlp.c_fc.weight": r(hidden, d), f"{prefix}.mlp.c_fc.bias": r(hidden),
            f"{prefix}.mlp.c_proj.weight": r(d, hidden), f"{prefix}.mlp.c_proj.bias": r(d),
        }
    for i in range(layers):
        vision.update(block(f"transformer.resblocks.{i}", W, mlp))
    if weights_format == "bin":
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in vision.items()}, dst / "open_clip_pytorch_model.bin")
    else:
        save_file(vision, str(dst / "open_clip_model.safetensors"))
    config = {
        "model_cfg": {
            "embed_dim": W,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": W,
                           "patch_size": patch_size, "head_width": head_width,
                           "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True,
                           "output_tokens": True, "norm_kwargs": {"eps": 1e-6}},
        },
        "preprocess_cfg": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    (dst / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))

    vocab = write_vocab(dst / "vocab.txt")
    D, V = decoder_width, len(vocab)
    decoder = {
        "token_embedding.weight": r(V, D, scale=0.5),
        "image_projection.weight": r(D, W),
        **ln("ln_final", D),
        "lm_head.weight": r(V, D, scale=0.5),
    }
    for i in range(decoder_depth):
        decoder.update(block(f"blocks.{i}", D, 4 * D))
    save_file(decoder, str(dst / DECODER_WEIGHTS))
    (dst / DECODER_CONFIG).write_text(json.dumps({
        "width": D, "depth": decoder_depth, "num_heads": decoder_heads, "mlp_dim": 4 * D,
        "vocab_size": V, "vision_width": W, "pad_id": 0, "bos_id": 1, "eos_id": 2,
    }, indent=2))
    return dst
