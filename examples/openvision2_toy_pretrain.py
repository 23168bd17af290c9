"""OpenVision-2-style generative pretraining at toy scale: a small ViT and caption
decoder learn from generated shape captions alone (35% of the visual tokens
reach the decoder), then caption a held-out picture.

    python examples/openvision2_toy_pretrain.py --steps 200

The full-size recipes are train/openvision2/stage{1,2}.json.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from mlx_vlm_native.caption import caption
from mlx_vlm_native.training import openvision2
from mlx_vlm_native.training.data import CaptionFolder
from mlx_vlm_native.utils import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: train/shapes_world.py
from train import shapes_world as shapes  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/ov2_toy")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the embedded model's, trained on these captions)")
    a = p.parse_args()

    out = Path(a.out)
    data = shapes.write_dataset(out / "data", a.images, seed=3, two_image_fraction=0.0)
    tokenizer = a.tokenizer or default_model_path()
    recipe = {
        "family": "openvision2",
        "model": {"image_size": 48, "patch_size": 8,
                  "vision_config": {"width": 64, "layers": 2, "head_width": 32},
                  "decoder_config": {"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256},
                  "keep_ratio": 0.35, "max_text_len": 48, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        "tokenizer": tokenizer,
        "data": {"jsonl": str(data / "captions.jsonl")},
        "image_fit": "pad",
        "batch_size": 32, "steps": a.steps, "seed": 0,
        "optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.05, "betas": [0.9, 0.95]},
        "output": str(out / "run"),
    }
    result = openvision2.run(recipe, progress=False)
    losses = result["losses"]
    k = max(1, min(10, len(losses) // 2))
    print(f"caption loss: first {k} steps {np.mean(losses[:k]):.3f} -> last {k} steps {np.mean(losses[-k:]):.3f}")

    first = CaptionFolder(data / "captions.jsonl", shuffle=False).records[0]
    text = caption(out / "run" / "model", str(data / first[0]), max_tokens=40)
    print(f"reference: {first[1]}\nmodel:     {text}")
