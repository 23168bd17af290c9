"""Train: `mlx-vlm-native train --data chats.jsonl` finetunes (LoRA by default)
the embedded model, or `--model`, with mlx-lm's flag names; `--recipe NAME`
starts from a recipe shipped in the package (`lora`, `dora`, `full`,
`qlora`) or any recipe file, `-c FILE` from a JSON/YAML config; flags then
override its fields. Other families (`openvision2`, `navit`, `eve`) take a
recipe file whose `family` picks the task module in `mlx_vlm_native/training/`.
Every recipe, with the flags applied, becomes its family's typed config
(`training/config.py`) before anything is loaded; an error names the file and the key.
"""

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

import yaml  # mlx-lm's dependency, as its -c config

from .training import TASKS
from .training.config import ConfigError, family_config, has_key
from .training.loop import stop_message
from .weights.files import read_json_file

RECIPES = Path(__file__).parent / "recipes"


def packaged_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPES.glob("*.json"))


def read_config_file(path: Path) -> dict:
    if path.suffix in (".yaml", ".yml"):
        with open(path) as f:
            try:
                recipe = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        return recipe
    return read_json_file(path)


def load_recipe(name_or_path) -> dict:
    """A recipe file, or the name of one shipped in the package (`lora`)."""
    path = Path(name_or_path)
    if not path.exists() and (RECIPES / f"{name_or_path}.json").exists():
        path = RECIPES / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {name_or_path} (packaged recipes: {', '.join(packaged_recipes())})")
    recipe = read_config_file(path)
    family = recipe.get("family", recipe.get("task", "finetune"))
    if family not in TASKS:
        raise ValueError(f"recipe family {family!r} is not supported; supported: {', '.join(TASKS)}")
    return recipe


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Finetune a model on conversations (LoRA by default; flags as mlx_lm.lora), "
                    "or train a family from a recipe.")
    p.add_argument("--recipe", default=None,
                   help=f"a packaged recipe ({', '.join(packaged_recipes())}) or a recipe file")
    p.add_argument("-c", "--config", default=None, help="a JSON or YAML config with any recipe keys")
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--data", default=None,
                   help="conversations .jsonl (images relative to it) or a folder with train.jsonl "
                        "[and valid.jsonl]; other families: a tar shard glob or a folder of class folders")
    p.add_argument("--fine-tune-type", dest="method", choices=["lora", "dora", "full"], default=None)
    p.add_argument("--iters", "--steps", dest="steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="conversations per micro-batch")
    p.add_argument("--grad-accumulation-steps", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-scale", type=float, default=None)
    p.add_argument("--num-layers", type=int, default=None, help="adapt only the last N decoder layers (-1: all)")
    p.add_argument("--adapter-path", default=None, help="where the adapters are saved (default: OUTPUT/adapters)")
    p.add_argument("--resume-adapter-file", default=None, help="adapters.safetensors to start from")
    p.add_argument("--val-batches", type=int, default=None, help="held-out conversations per evaluation")
    p.add_argument("--steps-per-eval", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="loss on the assistant's tokens only (default: on)")
    p.add_argument("--max-seq-length", dest="max_tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="vocab/tokenizer folder or Hub id (other families)")
    p.add_argument("--init", default=None, help="checkpoint or model folder to start from (other families)")
    p.add_argument("--output", default=None, help="run folder (checkpoints/, model/, adapters/)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint folder (default: the run's latest)")
    p.add_argument("--no-progress", action="store_true")
    return p


FINETUNE_FLAGS = {  # flag destination -> (section or None, recipe key)
    "model": (None, "model"), "output": (None, "output"), "method": (None, "method"), "steps": (None, "steps"),
    "batch_size": (None, "micro_batch_size"), "grad_accumulation_steps": (None, "grad_accumulation"),
    "adapter_path": (None, "adapter_path"), "resume_adapter_file": (None, "resume_adapter_file"),
    "val_batches": (None, "eval_samples"), "steps_per_eval": (None, "eval_every"),
    "save_every": (None, "checkpoint_every"), "mask_prompt": (None, "mask_prompt"), "max_tokens": (None, "max_tokens"),
    "seed": (None, "seed"), "learning_rate": ("optim", "lr"), "lora_rank": ("lora", "rank"),
    "lora_scale": ("lora", "scale"), "num_layers": ("lora", "num_layers"),
}


def finetune_overrides(recipe: dict, args) -> dict:
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    if args.data:
        recipe["data"] = {**recipe.get("data", {}), "train": args.data}
        recipe["data"].pop("jsonl", None)
    for dest, (section, key) in FINETUNE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            (recipe.setdefault(section, {}) if section else recipe)[key] = value
    return recipe


def apply_overrides(recipe: dict, args) -> dict:
    """Command-line values over a recipe of another family (openvision2, navit, eve);
    a flag whose key the family does not have is refused, naming the flag."""
    recipe = dict(recipe)
    family = recipe.get("family")
    if args.data:
        kind = "jsonl" if args.data.endswith(".jsonl") else "folder" if Path(args.data).is_dir() else "shards"
        recipe["data"] = {kind: args.data}
    for key, value in (("model", args.model), ("tokenizer", args.tokenizer), ("init", args.init), ("output", args.output),
                       ("steps", args.steps), ("batch_size", args.batch_size)):
        if value is None:
            continue
        if not has_key(family, key):
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to the {family} family "
                              f"(its recipes have no {key!r} key)")
        recipe[key] = value
    return recipe


def main(argv: Optional[List[str]] = None) -> None:
    args = configure_parser().parse_args(argv)
    if args.recipe and args.config:
        sys.exit("error: give --recipe or -c/--config, not both")
    try:
        source = args.recipe or args.config
        recipe = load_recipe(source) if source else {"family": "finetune"}
        family = recipe.get("family", recipe.get("task", "finetune"))
        overrides = finetune_overrides if family == "finetune" else apply_overrides
        config = family_config(family, overrides(recipe, args), source)
        output = config.run_folder if family == "finetune" else config.output
        task = importlib.import_module(f"mlx_vlm_native.training.{TASKS[family]}")
        result = task.run(config, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    losses = result["losses"]
    if result.get("stopped"):
        print(stop_message(result))
        return
    if losses:
        print(f"[INFO] step {result['step']}: loss {losses[-1]:.4f}; saved to {result.get('saved', output)}")


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
