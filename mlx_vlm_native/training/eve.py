"""EVE (v1) training, one stage per recipe, on the shared loop (`loop.train`):
`mlx-vlm-native train --recipe train/eve/stage1.json --model <EVE folder> --data captions.jsonl
--output runs/stage1` (or `train/eve/train.py`, which adds the teacher options).

The data are JSON lines. Stages 1-2 (`plain`): {"image": "a.jpg", "caption": "..."}.
Stage 3 (`vicuna_v1`): {"image": "a.jpg", "conversations": [{"from": "human", "value":
"<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}, ...]} ("image" may be left
out for text-only samples). Every record is checked before the first step; an error names
its line.

Each micro-batch's loss is its CE (token mean) + `align_loss_weight` x the alignment
loss (image mean), as in the reference; micro-batches (`grad_accumulation`) and
`mx.distributed` ranks are averaged with equal weight, the reference's Trainer semantics.
Checkpoints (trainable weights, optimizer, data position, RNG key) go to
`<output>/checkpoints` and resume exactly; the output folder is an MLX EVE folder
(loadable by `mlx_vlm_native.load`) plus `aligner/aligner.safetensors` and `train_log.jsonl`.
"""

import json
import math
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..conversations import ROLES
from ..processors.image import load_image
from ..utils import copy_side_files, get_model_path, load, save_config, save_weights
from . import eve_align as A
from .checkpoint import resume_state
from .config import EveScale, eve_config
from .loop import TrainConfig, train
from .stream import positions, rank_batches
from .optim import build_optimizer, current_lr

def to_turns(conversations: list) -> list:
    roles = [ROLES.get(c.get("from", c.get("role"))) for c in conversations]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]) or len(roles) % 2:
        raise ValueError("conversations must alternate human/gpt turns, starting with human")
    values = [c["value"] for c in conversations]
    return list(zip(values[::2], values[1::2]))


def read_records(path, prompt_format: str) -> list:
    """Every record of a JSON-lines file, checked for its stage's fields."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("a record must be a JSON object")
            if prompt_format == "plain" and not isinstance(record.get("caption"), str):
                raise ValueError('a stage 1-2 record needs a "caption" string')
            if prompt_format != "plain":
                to_turns(record.get("conversations") or [])
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no samples")
    return records


def make_sample(record: dict, processor, teacher, prompt_format: str, image_root: Path, max_length: int):
    image = load_image(image_root / record["image"]) if record.get("image") else None
    if prompt_format == "plain":
        sample = A.plain_sample(processor, image, record["caption"], teacher)
    else:
        sample = A.conversation_sample(processor, image, to_turns(record["conversations"]), teacher)
    if len(sample.input_ids) > max_length:
        raise ValueError(f"a sample is {len(sample.input_ids)} tokens, over max_length {max_length}")
    return sample


def sample_batches(records, make, batch_size: int, teacher, seed: int, position: Optional[dict] = None):
    """((samples, teacher targets), position) forever: a fresh permutation each epoch,
    this rank's share of each global batch; `position` resumes mid-epoch."""
    group = mx.distributed.init()
    items = positions(len(records), seed, position)

    def stream():
        while True:
            picked = [next(items) for _ in range(batch_size)]
            yield [j for j, _ in picked], picked[-1][1]

    for picked, pos in rank_batches(stream(), group.rank(), group.size()):
        samples = [make(records[j]) for j in picked]
        yield (samples, A.teacher_targets(teacher, samples)), pos


def batch_loss(ratio: int, align_weight: float):
    """The loop's loss: (micro-batch loss, weight 1)."""
    def loss_fn(model, batch, key=None):
        samples, targets = batch
        loss, _ = A.eve_loss(model, samples, targets, ratio, align_weight)
        return loss, mx.array(1.0)

    return loss_fn


def hyperparameters(recipe) -> EveScale:
    """The recipe's `laptop` or `reference` block (`scale`), top-level overrides on top."""
    return eve_config(recipe).hyperparameters


def save_model(model: A.EVETrainingModel, src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, model.eve, progress=False)
    (out / A.ALIGNER_FILE).parent.mkdir(exist_ok=True)
    mx.save_safetensors(str(out / A.ALIGNER_FILE), dict(tree_flatten(model.aligner.parameters())))
    copy_side_files(src, out)
    save_config(json.loads((src / "config.json").read_text()), out)


def run(recipe, resume: Optional[str] = None, progress: bool = True, on_step=None) -> dict:
    """Train one stage from a recipe (a dict or an EveConfig), checked whole before
    the model or the data is read."""
    cfg = eve_config(recipe)
    hp = cfg.hyperparameters
    path = cfg.data.path
    seed = cfg.seed
    mx.random.seed(seed)
    src = get_model_path(cfg.model)
    eve, processor = load(str(src))
    teacher_config = json.loads(Path(cfg.teacher_config).read_text()) if cfg.teacher_config else None
    teacher = A.load_teacher(cfg.teacher or src, teacher_config)
    model = A.EVETrainingModel(eve, A.new_aligner(eve, teacher.tower.config.hidden_size))
    A.load_aligner_weights(model.aligner, src)
    A.broadcast_parameters(model)
    A.apply_stage(model, cfg.stage)
    ratio = A.grid_ratio(eve, processor, teacher)

    prompt_format = cfg.prompt_format
    records = read_records(path, prompt_format)
    image_root = Path(cfg.image_root or Path(path).parent)
    steps = hp.steps
    optimizer = build_optimizer({"lr": hp.learning_rate, "warmup_steps": math.ceil(steps * hp.warmup_ratio),
                                 "weight_decay": hp.weight_decay}, steps)
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    start, position, rng_key = resume_state(resume, ckpt_dir, model, optimizer, steps)

    def make(record):
        return make_sample(record, processor, teacher, prompt_format, image_root, hp.max_length)

    batches = sample_batches(records, make, hp.batch_size, teacher, seed, position)
    config = TrainConfig(steps=steps, grad_accumulation=cfg.grad_accumulation,
                         checkpoint_dir=str(ckpt_dir), checkpoint_every=cfg.checkpoint_every,
                         keep_checkpoints=cfg.keep_checkpoints, progress=progress, rate_unit="img")
    is_main = mx.distributed.init().rank() == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        print(f"[INFO] stage {cfg.stage} ({cfg.name or ''}): {n_trainable:,} trainable parameters, "
              f"{len(records)} samples, {mx.distributed.init().size()} process(es)")
    log = (out / "train_log.jsonl").open("a" if start else "w") if is_main else None

    def after_step(step, loss):
        if log:
            log.write(json.dumps({"step": step, "loss": loss, "lr": current_lr(optimizer)}) + "\n")
            log.flush()
        if on_step is not None:
            on_step(step, loss)

    try:
        result = train(model, batch_loss(ratio, cfg.align_loss_weight), optimizer, batches,
                       config, start_step=start, batch_size_of=lambda b: len(b[0]), rng_key=rng_key, seed=seed,
                       on_step=after_step)
    finally:
        if log:
            log.close()
    if not result["stopped"] and is_main:
        save_model(model, src, out)
    return result
