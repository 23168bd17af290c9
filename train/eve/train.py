"""Train EVE (v1) one stage at a time from a recipe (the `eve` task of
`mlx_vlm_native.training`, with the teacher options spelled out).

    python train/eve/train.py --recipe train/eve/stage1.json \
        --model <EVE folder> --teacher <CLIP or SigLIP folder> \
        --data captions.jsonl --out runs/stage1 [--resume]

`mlx-vlm-native train --recipe train/eve/stage1.json --model ... --data ... --output ...`
runs the same task (teacher from the recipe's `teacher` field or the EVE folder).
Several processes (`mlx.launch` / `mpirun`) average their gradients through
`mx.distributed`; each reads its share of every global batch.
"""

import argparse
import sys

from mlx_vlm_native.train import load_recipe
from mlx_vlm_native.training import eve
from mlx_vlm_native.training.config import family_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--model", required=True, help="EVE folder (reference or MLX layout)")
    p.add_argument("--teacher", default=None,
                   help="CLIP or SigLIP vision folder (HF layout); default: the CLIP teacher inside "
                        "--model (a reference EVE v1 checkpoint)")
    p.add_argument("--teacher-config", default=None,
                   help="JSON file with the CLIP vision config of a teacher read from --model "
                        "(default: CLIP-L/14-336)")
    p.add_argument("--data", required=True, help="JSON lines (see mlx_vlm_native/training/eve.py)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", choices=["laptop", "reference"], default="laptop")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint folder (default: the run's latest)")
    args = p.parse_args(argv)
    recipe = dict(load_recipe(args.recipe), model=args.model, teacher=args.teacher,
                  teacher_config=args.teacher_config, data={"jsonl": args.data}, image_root=args.image_root,
                  output=args.out, scale=args.scale, steps=args.steps, batch_size=args.batch_size,
                  learning_rate=args.learning_rate, grad_accumulation=args.grad_accumulation,
                  checkpoint_every=args.checkpoint_every, seed=args.seed)
    if not eve.run(family_config("eve", recipe, args.recipe), resume=args.resume)["stopped"]:
        print(f"[INFO] saved to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
