"""Optimizer and learning-rate schedule, built from `mlx.optimizers`.

Decoupled weight decay (AdamW) applies to weight matrices and kernels only;
biases, norms, embeddings and other vectors go to plain Adam.
"""

import re
from typing import Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim

NO_DECAY_DEFAULT = ("embedding", "class_embedding", "positional_embedding")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0) -> Callable:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `end_lr`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    cosine = optim.cosine_decay(peak_lr, max(total_steps - warmup_steps, 1), end_lr)
    if warmup_steps == 0:
        return cosine
    warmup = optim.linear_schedule(0.0, peak_lr, warmup_steps)
    return optim.join_schedules([warmup, cosine], [warmup_steps])


def decays(path: str, weight: mx.array, no_decay: Sequence[str] = NO_DECAY_DEFAULT) -> bool:
    """Weight decay only on matrices/kernels named `...weight`, never embeddings."""
    name = path.rsplit(".", 1)[-1]
    owner = path.rsplit(".", 2)[-2] if path.count(".") >= 1 else ""
    if any(p in owner or p == name for p in no_decay):
        return False
    return name == "weight" and weight.ndim >= 2


def adamw(
    learning_rate,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    no_decay: Sequence[str] = NO_DECAY_DEFAULT,
    bias_correction: bool = True,
    decay_all: bool = False,
) -> optim.Optimizer:
    """AdamW on weights, Adam on the rest; bias-corrected as optax's
    scale_by_adam. `decay_all` decays every parameter (and `bias_correction`
    False skips the correction), as mlx's AdamW alone does: the finetuning
    task's defaults."""
    betas = list(betas)
    if weight_decay == 0.0:
        return optim.Adam(learning_rate, betas, eps, bias_correction=bias_correction)
    if decay_all:
        return optim.AdamW(learning_rate, betas, eps, weight_decay, bias_correction=bias_correction)
    return optim.MultiOptimizer(
        [
            optim.AdamW(learning_rate, betas, eps, weight_decay, bias_correction=bias_correction),
            optim.Adam(learning_rate, betas, eps, bias_correction=bias_correction),
        ],
        [lambda path, w: decays(path, w, no_decay)],
    )


def build_optimizer(cfg: dict, total_steps: int) -> optim.Optimizer:
    """From a recipe's `optim` section: lr, warmup_steps, end_lr, weight_decay,
    betas, eps, no_decay, bias_correction, decay_all, and `lr_multipliers`
    {path regex: factor}, which give modules their own rates (LLaVA-OneVision
    trains its tower at 1/5)."""
    schedule = warmup_cosine(
        cfg["lr"], total_steps, cfg.get("warmup_steps", 0), cfg.get("end_lr", 0.0)
    )

    def make(factor: float) -> optim.Optimizer:
        lr = schedule if factor == 1 else (lambda step: factor * schedule(step))
        return adamw(
            lr,
            weight_decay=cfg.get("weight_decay", 0.0),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=cfg.get("eps", 1e-8),
            no_decay=tuple(cfg.get("no_decay", NO_DECAY_DEFAULT)),
            bias_correction=cfg.get("bias_correction", True),
            decay_all=cfg.get("decay_all", False),
        )

    multipliers = list((cfg.get("lr_multipliers") or {}).items())
    if not multipliers:
        return make(1.0)
    filters = [lambda path, _, p=re.compile(k): bool(p.search(path)) for k, _ in multipliers]
    return optim.MultiOptimizer([make(f) for _, f in multipliers] + [make(1.0)], filters)


def current_lr(optimizer: optim.Optimizer) -> float:
    inner = getattr(optimizer, "optimizers", [optimizer])[0]
    return float(inner.learning_rate)
