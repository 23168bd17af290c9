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

from ..weights.files import load_checked_safetensors, read_json_file

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


def check_state(state: dict, path: Path, steps: Optional[int] = None) -> dict:
    """state.json's step (0 <= step <= the run's steps), data position and RNG key."""
    step = state.get("step")
    top = f" and <= {steps} (the run's steps)" if steps is not None else ""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or (steps is not None and step > steps):
        raise ValueError(f"{path}: step is {repr(step)[:40]}; it must be an integer >= 0{top}")
    key = state.get("rng_key")
    if "rng_key" in state and not (isinstance(key, list) and len(key) == 2 and all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 2**32 for k in key)):
        raise ValueError(f"{path}: rng_key must be two unsigned 32-bit integers, got {str(key)[:60]}")
    return state


def load_checkpoint(path, model: nn.Module, optimizer, steps: Optional[int] = None) -> dict:
    """Restore weights and optimizer state in place; return state.json. Every
    file is checked first (safetensors headers against the files, finite
    values, the weights this model trains, state.json's step within `steps`)."""
    path = Path(path)
    if not (path / STATE).exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE})")
    state = check_state(read_json_file(path / STATE), path / STATE, steps)
    weights = load_checked_safetensors(path / WEIGHTS, "the checkpoint's weights")
    expected = dict(tree_flatten(model.trainable_parameters()))
    missing, unknown = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ValueError(f"{path / WEIGHTS} does not match the model being trained: "
                         + (f"no {missing[0]!r} ({len(missing)} missing)" if missing else f"unknown {unknown[0]!r}"))
    for name, array in weights.items():
        if array.shape != expected[name].shape:
            raise ValueError(f"{path / WEIGHTS}: {name!r} has shape {array.shape}, the model's is "
                             f"{expected[name].shape}")
    opt = load_checked_safetensors(path / OPTIMIZER, "the checkpoint's optimizer state")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


def resume_state(resume: Optional[str], checkpoint_dir, model: nn.Module, optimizer,
                 steps: Optional[int] = None) -> tuple:
    """(start step, data position, RNG key) to hand the loop: nothing to resume when
    `resume` is None, else the newest checkpoint under `checkpoint_dir` ("auto") or
    under the folder `resume` names, restored into `model` and `optimizer`
    (its step at most the run's `steps`)."""
    if not resume:
        return 0, None, None
    where = checkpoint_dir if resume == "auto" else resume
    ckpt = latest_checkpoint(where)
    if ckpt is None:
        raise FileNotFoundError(f"no training checkpoint to resume from under {where}")
    state = load_checkpoint(ckpt, model, optimizer, steps)
    print(f"[INFO] resumed from {ckpt} at step {state['step']}")
    return state["step"], state.get("position"), state.get("rng_key")
