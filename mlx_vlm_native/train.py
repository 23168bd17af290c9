"""Train from a recipe: `mlx-vlm-native train --recipe train/openvision2/stage1.json`.

The recipe's `family` (or `task`) picks the task module in
`mlx_vlm_native/training/`; command-line options override recipe fields.
"""

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

from .training import TASKS
from .training.loop import stop_message
from .weight_files import read_json_file


def load_recipe(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}")
    recipe = read_json_file(path)
    family = recipe.get("family", recipe.get("task"))
    if family not in TASKS:
        raise ValueError(f"recipe family {family!r} is not supported; supported: {', '.join(TASKS)}")
    return recipe


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train or pretrain a model from a recipe.")
    p.add_argument("--recipe", required=True, help="JSON recipe, e.g. train/openvision2/stage1.json")
    p.add_argument("--model", default=None, help="model folder or Hub id to finetune")
    p.add_argument("--data", default=None,
                   help="a .jsonl (images relative to it), a tar shard glob, or a folder of class folders")
    p.add_argument("--tokenizer", default=None, help="vocab/tokenizer folder or Hub id")
    p.add_argument("--init", default=None, help="checkpoint or model folder to start from (stage 2)")
    p.add_argument("--output", default=None, help="run folder (checkpoints/, model/)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint folder (default: the run's latest)")
    p.add_argument("--no-progress", action="store_true")
    return p


def apply_overrides(recipe: dict, args) -> dict:
    recipe = dict(recipe)
    if args.data:
        kind = "jsonl" if args.data.endswith(".jsonl") else "folder" if Path(args.data).is_dir() else "shards"
        recipe["data"] = {kind: args.data}
    for key, value in (("model", args.model), ("tokenizer", args.tokenizer), ("init", args.init), ("output", args.output),
                       ("steps", args.steps), ("batch_size", args.batch_size)):
        if value is not None:
            recipe[key] = value
    return recipe


def main(argv: Optional[List[str]] = None) -> None:
    args = configure_parser().parse_args(argv)
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args)
        family = recipe.get("family", recipe.get("task"))
        task = importlib.import_module(f"mlx_vlm_native.training.{TASKS[family]}")
        result = task.run(recipe, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    losses = result["losses"]
    if result.get("stopped"):
        if family not in ("finetune", "eve"):  # those two say it themselves
            print(stop_message(result))
        return
    if losses:
        print(f"[INFO] step {result['step']}: loss {losses[-1]:.4f}; saved to {recipe['output']}")


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
