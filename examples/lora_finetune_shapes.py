"""Teach the embedded model a new skill with LoRA: it was never asked about
sizes, so "What size is the star?" gets a wrong kind of answer. Generate a few
hundred conversations about sizes (plus the old question types, so it keeps
them), train LoRA adapters on the decoder's attention and the projector, and
compare held-out accuracy on size questions before and after.

    python examples/lora_finetune_shapes.py --steps 150
"""

import argparse
import sys
from pathlib import Path

from mlx_vlm_native import load
from mlx_vlm_native.training import finetune
from mlx_vlm_native.utils import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: train/shapes_world.py
from train import shapes_world as shapes  # noqa: E402

MIX = {"size": 0.5, "colour": 0.15, "shape": 0.15, "position": 0.1, "count": 0.1}


def size_accuracy(model, processor, questions) -> float:
    return shapes.evaluate(model, processor, questions, max_tokens=16)["size"]["accuracy"]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--out", default="runs/lora_sizes")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval", type=int, default=40, help="held-out size questions")
    a = p.parse_args()

    out = Path(a.out)
    data = shapes.write_dataset(out / "data", a.images, seed=7, two_image_fraction=0.0, mix=MIX)
    questions = shapes.held_out_questions(a.eval, seed=8, kinds=["size"])
    model, processor = load(a.model)
    before = size_accuracy(model, processor, questions)

    recipe = {
        "model": a.model or default_model_path(),
        "data": {"train": str(data / "conversations.jsonl")},
        "output": str(out), "method": "lora", "steps": a.steps, "micro_batch_size": 8,
        "lora": {"targets": [r"language_model\..*(q|v)_proj", r"multi_modal_projector\.linear_\d"],
                 "rank": 8, "scale": 10.0},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "seed": 0,
    }
    result = finetune.run(recipe, progress=False)
    losses = result["losses"]
    print(f"loss: first 10 steps {sum(losses[:10]) / 10:.3f} -> last 10 steps {sum(losses[-10:]) / 10:.3f}")

    model, processor = load(recipe["model"], adapter_path=str(out / "adapters"))
    after = size_accuracy(model, processor, questions)
    print(f"size questions: {before:.0%} before, {after:.0%} after ({a.eval} held-out)")
    q = questions[0]
    from mlx_vlm_native import generate

    print(f"> {q.question}\n{generate(model, processor, q.question, images=q.images, max_tokens=16).text}")
