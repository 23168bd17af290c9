"""Atomic training checkpoints with exact resume.

A checkpoint is a folder `step_XXXXXXXX/` holding the trainable weights, the
optimizer state and a JSON `state.json` (step, the loop's RNG key, data
position, anything else the caller passes). It is written to a temporary folder and
renamed into place, so an interrupted save never leaves a half checkpoint;
`latest` names the newest complete one.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save_checkpoint(root, step: int, model: nn.Module, optimizer, state: dict, keep: int = 0) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` (0: all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for orphan in root.glob(".tmp_step_*"):  # left by a save that was killed: one writer per run folder
        shutil.rmtree(orphan, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_step_", dir=root))
    try:
        mx.save_safetensors(str(tmp / WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER), opt_state)
        meta = {"step": step, **state}
        (tmp / STATE).write_text(json.dumps(meta, indent=2))
        final = step_dir(root, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under `root` (or `root` itself if it is one)."""
    root = Path(root)
    if (root / STATE).exists():
        return root
    if (root / "latest").exists():
        path = root / (root / "latest").read_text().strip()
        if (path / STATE).exists():
            return path
    steps = sorted(p for p in root.glob("step_*") if (p / STATE).exists())
    return steps[-1] if steps else None


def load_checkpoint(path, model: nn.Module, optimizer) -> dict:
    """Restore weights and optimizer state in place; return state.json."""
    path = Path(path)
    if not (path / STATE).exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE})")
    model.load_weights(list(mx.load(str(path / WEIGHTS)).items()), strict=False)
    opt = mx.load(str(path / OPTIMIZER))
    optimizer.state = tree_unflatten(list(opt.items()))
    state = json.loads((path / STATE).read_text())
    mx.eval(model.parameters(), optimizer.state)
    return state


def resume_state(resume: Optional[str], checkpoint_dir, model: nn.Module, optimizer) -> tuple:
    """(start step, data position, RNG key) to hand the loop: nothing to resume when
    `resume` is None, else the newest checkpoint under `checkpoint_dir` ("auto") or
    under the folder `resume` names, restored into `model` and `optimizer`."""
    if not resume:
        return 0, None, None
    where = checkpoint_dir if resume == "auto" else resume
    ckpt = latest_checkpoint(where)
    if ckpt is None:
        raise FileNotFoundError(f"no training checkpoint to resume from under {where}")
    state = load_checkpoint(ckpt, model, optimizer)
    print(f"[INFO] resumed from {ckpt} at step {state['step']}")
    return state["step"], state["position"], state["rng_key"]
