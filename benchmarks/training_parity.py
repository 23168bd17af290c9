"""CPU vs GPU (Metal or CUDA) training parity: the same small LoRA finetune
from the same seed on each device, then the two loss curves compared.

    python benchmarks/training_parity.py --device cpu --out cpu.json
    python benchmarks/training_parity.py --device gpu --out gpu.json
    python benchmarks/training_parity.py --compare cpu.json gpu.json [--tol 1e-3]

The model is a tiny random LLaVA-OneVision (56-px crops) and the data are
generated coloured images, so nothing is downloaded.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: convert/'s layout fixtures


def make_data(root: Path) -> None:
    from PIL import Image

    from convert.write_hf_release import write_checkpoint

    write_checkpoint(root / "model", "tiny-56")
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    rng = np.random.default_rng(0)
    lines = []
    for i in range(48):
        name = list(colours)[i % 3]
        a = np.clip(np.full((48, 64, 3), colours[name]) + rng.normal(0, 8, (48, 64, 3)), 0, 255)
        Image.fromarray(a.astype(np.uint8)).save(root / f"{i}.png")
        lines.append({"images": [f"{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))


def train_curve(device: str, steps: int) -> list:
    import mlx.core as mx

    from mlx_vlm_native.training.finetune import run

    mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root)
        recipe = {"model": str(root / "model"), "data": {"train": str(root / "train.jsonl")},
                  "output": str(root / "run"), "method": "lora", "steps": steps, "grad_accumulation": 4,
                  "lora": {"targets": [r"language_model\..*(q|v)_proj", "multi_modal_projector"], "rank": 8},
                  "optim": {"lr": 1e-3, "warmup_steps": 5}, "seed": 0}
        return run(recipe, progress=False)["losses"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=None)
    p.add_argument("--compare", nargs=2, default=None)
    p.add_argument("--tol", type=float, default=1e-3, help="max abs loss difference (fp32)")
    a = p.parse_args()
    if a.compare:
        x, y = (np.array(json.loads(Path(f).read_text())["losses"]) for f in a.compare)
        diff = np.abs(x - y).max()
        print(f"{len(x)} steps, max |loss difference| {diff:.2e} (tolerance {a.tol:g})")
        sys.exit(0 if diff <= a.tol else 1)
    losses = train_curve(a.device, a.steps)
    print(" ".join(f"{v:.4f}" for v in losses))
    if a.out:
        Path(a.out).write_text(json.dumps({"device": a.device, "losses": losses}))


if __name__ == "__main__":
    main()
