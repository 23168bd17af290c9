"""Train EVE (v1) one stage at a time from a recipe.

    python train/eve/train.py --recipe train/eve/stage1.json \
        --model <EVE folder> --teacher <CLIP or SigLIP folder> \
        --data captions.jsonl --out runs/stage1

`--data` is JSON lines. Stages 1-2 (`plain`): {"image": "a.jpg", "caption": "..."}.
Stage 3 (`vicuna_v1`): {"image": "a.jpg", "conversations": [{"from": "human",
"value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}, ...]}
(LLaVA's format; "image" may be left out for text-only samples). Image paths
are relative to `--image-root` (default: the data file's folder).

Several processes (`mlx.launch` / `mpirun`) average their gradients through
`mx.distributed`; each reads every `size`-th batch. The output folder is an
MLX EVE folder (loadable by `mlx_vlm_native.load`) plus `aligner/aligner.safetensors`
and `train_log.jsonl`.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_vlm_native.models import eve_align as A
from mlx_vlm_native.processors.image import load_image
from mlx_vlm_native.utils import copy_side_files, load, save_config, save_weights

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def read_records(path: Path) -> list:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no samples")
    return records


def to_turns(conversations: list) -> list:
    roles = [ROLES.get(c.get("from", c.get("role"))) for c in conversations]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]) or len(roles) % 2:
        raise ValueError("conversations must alternate human/gpt turns, starting with human")
    values = [c["value"] for c in conversations]
    return list(zip(values[::2], values[1::2]))


def make_sample(record: dict, processor, teacher, prompt_format: str, image_root: Path, max_length: int):
    image = load_image(image_root / record["image"]) if record.get("image") else None
    if prompt_format == "plain":
        sample = A.plain_sample(processor, image, record["caption"], teacher)
    else:
        sample = A.conversation_sample(processor, image, to_turns(record["conversations"]), teacher)
    if len(sample.input_ids) > max_length:
        raise ValueError(f"a sample is {len(sample.input_ids)} tokens, over max_length {max_length}")
    return sample


def save_checkpoint(model: A.EVETrainingModel, src: Path, out: Path, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, model.eve, progress=False)
    (out / A.ALIGNER_FILE).parent.mkdir(exist_ok=True)
    mx.save_safetensors(str(out / A.ALIGNER_FILE), dict(tree_flatten(model.aligner.parameters())))
    copy_side_files(src, out)
    save_config(config, out)


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
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", choices=["laptop", "reference"], default="laptop")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    recipe = json.loads(Path(args.recipe).read_text())
    hp = dict(recipe[args.scale])
    for k in ("steps", "batch_size", "learning_rate"):
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    if "steps" not in hp:
        raise ValueError("the reference scale is given in epochs: pass --steps")
    batch_size = hp.get("batch_size", hp.get("per_device_batch_size"))

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    src = Path(args.model)
    eve, processor = load(str(src))
    teacher_config = json.loads(Path(args.teacher_config).read_text()) if args.teacher_config else None
    teacher = A.load_teacher(args.teacher or src, teacher_config)
    model = A.EVETrainingModel(eve, A.new_aligner(eve, teacher.tower.config.hidden_size))
    A.load_aligner_weights(model.aligner, src)
    A.broadcast_parameters(model)
    A.apply_stage(model, recipe["stage"])
    ratio = A.grid_ratio(eve, processor, teacher)

    records = read_records(args.data)
    image_root = Path(args.image_root) if args.image_root else Path(args.data).parent
    optimizer = A.make_optimizer(hp["learning_rate"], hp["steps"], hp.get("warmup_ratio", 0.0),
                                 hp.get("weight_decay", 0.0))
    step = A.make_train_step(model, optimizer, ratio, recipe.get("align_loss_weight", 1.0))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("w") if rank == 0 else None
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if rank == 0:
        print(f"[INFO] stage {recipe['stage']} ({recipe['name']}): {n_trainable:,} trainable parameters, "
              f"{len(records)} samples, {size} process(es)")
    order = []
    bar = tqdm(range(hp["steps"]), disable=rank != 0, desc=f"stage {recipe['stage']}")
    for i in bar:
        picked = []
        for _ in range(batch_size * size):
            if not order:
                order = list(rng.permutation(len(records)))
            picked.append(order.pop())
        mine = picked[rank::size]
        batch = [make_sample(records[j], processor, teacher, recipe["prompt_format"], image_root,
                             hp.get("max_length", 2048)) for j in mine]
        stats = step(batch, A.teacher_targets(teacher, batch))
        stats["step"], stats["lr"] = i + 1, optimizer.learning_rate.item()
        if log:
            log.write(json.dumps(stats) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{stats['loss']:.3f}", ce=f"{stats['ce']:.3f}", align=f"{stats['align']:.3f}")
    if rank == 0:
        log.close()
        config = json.loads((src / "config.json").read_text())
        save_checkpoint(model, src, out, config)
        print(f"[INFO] saved to {out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
