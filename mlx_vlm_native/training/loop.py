"""A small, model-agnostic training loop.

`loss_fn(model, batch, key) -> (mean loss, weight)`: the weight (e.g. the
number of target tokens) makes gradient accumulation and data parallelism give
exactly the weighted mean over the whole global batch. `key` is a PRNG key for
anything random in the loss (token masking, dropout); the loop splits it from
its own key, which checkpoints store, so a resumed run draws the same numbers. Gradients of micro-batches are
summed as `grad * weight`, summed across processes with
`mx.distributed.all_sum`, then divided by the total weight.
"""

import contextlib
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .optim import current_lr


@dataclass
class TrainConfig:
    steps: int
    grad_accumulation: int = 1
    compute_dtype: Optional[str] = None  # "bfloat16" / "float16": cast weights for the forward
    grad_checkpoint: bool = False
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    log_every: int = 1
    progress: bool = True
    rate_unit: str = "img"  # what batch_size_of counts, for the progress bar's rate
    compile: bool = True  # compile each micro-batch's gradient when batches are trees of arrays


def cast_floats(tree, dtype):
    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, tree)


_CHECKPOINTED = {}


def checkpointed_class(cls):
    """A subclass of `cls` whose forward is wrapped in `mx.checkpoint`: its
    activations are recomputed in the backward pass instead of stored."""
    if cls not in _CHECKPOINTED:
        def __call__(self, x, *args, **kwargs):
            def forward(params, x):
                self.update(params)
                return cls.__call__(self, x, *args, **kwargs)

            return mx.checkpoint(forward)(self.trainable_parameters(), x)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls]


def enable_grad_checkpoint(layers: Sequence[nn.Module]) -> None:
    """Gradient checkpointing on these blocks only (the class of each instance
    is swapped, so other models of the same class are untouched)."""
    for layer in layers:
        if type(layer) not in _CHECKPOINTED.values():
            layer.__class__ = checkpointed_class(type(layer))


def all_sum_tree(tree, group):
    """Sum a tree of arrays across processes in one `all_sum` over their
    concatenation (as mlx-lm's `average_gradients` batches them)."""
    flat = tree_flatten(tree)
    if not flat:
        return tree
    joined = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in flat]), group=group)
    sizes = [v.size for _, v in flat]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return tree_unflatten([(k, joined[offsets[i]: offsets[i + 1]].reshape(v.shape))
                           for i, (k, v) in enumerate(flat)])


def is_array_tree(tree) -> bool:
    """True when every leaf of (nested lists, tuples, dicts) `tree` is an mx.array."""
    if isinstance(tree, mx.array):
        return True
    if isinstance(tree, (list, tuple)):
        return all(is_array_tree(t) for t in tree)
    if isinstance(tree, dict):
        return all(is_array_tree(t) for t in tree.values())
    return False


def make_step(model: nn.Module, loss_fn: Callable, optimizer, config: TrainConfig):
    """One optimizer step over `grad_accumulation` micro-batches."""
    dtype = getattr(mx, config.compute_dtype) if config.compute_dtype else None
    group = mx.distributed.init()

    def loss_of(params, batch, key):
        model.update(cast_floats(params, dtype) if dtype is not None else params)
        loss, weight = loss_fn(model, batch, key)
        return loss.astype(mx.float32), weight

    value_and_grad = mx.value_and_grad(loss_of)

    def weighted(params, batch, key):
        """(loss x weight, weight, gradient x weight) of one micro-batch, in fp32."""
        (loss, weight), grads = value_and_grad(params, batch, key)
        weight = weight.astype(mx.float32)
        return loss * weight, weight, tree_map(lambda g: g.astype(mx.float32) * weight, grads)

    compiled = mx.compile(weighted, inputs=[mx.random.state], outputs=[mx.random.state])
    traceable = [config.compile]

    def micro_step(params, batch, key):
        """`weighted`, compiled where the batch is arrays only (it is then an input, not
        a constant of the trace). A loss that reads values on the host (`.item()`,
        NumPy) cannot be traced: the run goes on uncompiled, with the random state the
        failed trace left behind replaced."""
        if not (traceable[0] and is_array_tree(batch)):
            return weighted(params, batch, key)
        before = np.array(mx.random.state[0])
        try:
            return compiled(params, batch, key)
        except ValueError as e:
            if "function transformations" not in str(e):
                raise
            traceable[0] = False
            mx.random.seed(int(before.astype(np.uint64)[0] << np.uint64(32) | before.astype(np.uint64)[1]))
            warnings.warn(f"the loss cannot be compiled ({str(e).splitlines()[0]}); training uncompiled")
            return weighted(params, batch, key)

    def step(micro_batches, key):
        params = model.trainable_parameters()
        total_grad, total_loss, total_weight = None, mx.array(0.0), mx.array(0.0)
        keys = mx.random.split(key, len(micro_batches))
        for batch, k in zip(micro_batches, keys):
            loss, weight, grads = micro_step(params, batch, k)
            total_grad = grads if total_grad is None else tree_map(mx.add, total_grad, grads)
            total_loss = total_loss + loss
            total_weight = total_weight + weight
            mx.eval(total_grad, total_loss, total_weight)
        if group.size() > 1:
            summed = all_sum_tree({"grad": total_grad, "loss": total_loss.reshape(1),
                                   "weight": total_weight.reshape(1)}, group)
            total_grad, total_loss, total_weight = summed["grad"], summed["loss"][0], summed["weight"][0]
        scale = 1.0 / mx.maximum(total_weight, 1e-8)
        grads = tree_map(lambda g: g * scale, total_grad)
        model.update(params)  # back to the full-precision weights
        optimizer.update(model, grads)
        loss = total_loss * scale
        mx.eval(model.parameters(), optimizer.state, loss)
        return loss.item()

    return step


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite: the run stops, and the weights it has
    now are not saved (the last checkpoint written stays the newest)."""


def check_finite_loss(loss: float, step: int, last_checkpoint) -> None:
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint was written")
        raise NonFiniteLossError(
            f"the loss became {loss} at step {step}: training stopped and these weights were not saved; {kept}. "
            "Lower the learning rate, or check the data and the adapter scale")
@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step
    (yields the question "was one asked?"); off the main thread, never."""
    requested = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, lambda *_: requested.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_message(result: dict) -> str:
    """What a stopped run says: where its checkpoint is, or that none was written."""
    saved = result.get("checkpoint")
    where = f"checkpoint {saved}; continue with --resume" if saved else "no checkpoint was written"
    return f"[INFO] stopped at step {result['step']}: {where}"


def train(
    model: nn.Module,
    loss_fn: Callable,
    optimizer,
    batches: Iterator,
    config: TrainConfig,
    start_step: int = 0,
    checkpoint_layers: Sequence[nn.Module] = (),
    batch_size_of: Callable = len,
    extra_state: Optional[dict] = None,
    on_step: Optional[Callable] = None,
    seed: int = 0,
    rng_key: Optional[list] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> dict:
    """Run steps `start_step+1 .. config.steps`.

    `batches` yields (batch, data position); the position after the last batch
    of each step is stored in checkpoints so a resumed run reads on from there,
    as is the RNG key (`rng_key`, from a checkpoint's state; else from `seed`).
    When `should_stop()` turns true the loop writes a checkpoint after the
    current step and returns with "stopped": True; without `should_stop`, a
    SIGINT or SIGTERM asks for that (`stop_on_signals`). When a
    step fails (bad data, out of memory, a bug), the last completed step is
    checkpointed, if it is not already, before the error goes on.
    Returns {"losses": [...], "step": last step, "position": data position,
    "stopped", "checkpoint": the last checkpoint written by this call or None}."""
    if should_stop is None:
        with stop_on_signals() as requested:
            return train(model, loss_fn, optimizer, batches, config, start_step, checkpoint_layers, batch_size_of,
                         extra_state, on_step, seed, rng_key, requested)
    if config.grad_checkpoint:
        enable_grad_checkpoint(checkpoint_layers)
    model.train()
    step_fn = make_step(model, loss_fn, optimizer, config)
    group = mx.distributed.init()
    is_main = group.rank() == 0
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and is_main),
               desc="train", unit="step")
    key = mx.array(rng_key, dtype=mx.uint32) if rng_key is not None else mx.random.key(seed)
    losses, position, step = [], None, start_step
    done = {"step": start_step, "position": None, "key": key, "saved": None}  # the last completed step

    def save(step, position, key):
        done["saved"] = save_checkpoint(config.checkpoint_dir, step, model, optimizer,
                                        {"position": position, "rng_key": key.tolist(), **(extra_state or {})},
                                        keep=config.keep_checkpoints)
        done["saved_step"] = step

    try:
        for step in range(start_step + 1, config.steps + 1):
            tic = time.perf_counter()
            micro, images = [], 0
            for _ in range(config.grad_accumulation):
                batch, position = next(batches)
                micro.append(batch)
                images += batch_size_of(batch)
            key, step_key = mx.random.split(key)
            loss = step_fn(micro, step_key)
            check_finite_loss(loss, step, done["saved"])
            done.update(step=step, position=position, key=key)
            lr = current_lr(optimizer)
            losses.append(loss)
            seconds = time.perf_counter() - tic
            if step % max(config.log_every, 1) == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                **{f"{config.rate_unit}_s": f"{images * group.size() / seconds:.1f}"},
                                mem=f"{mx.get_peak_memory() / 1e9:.2f}GB")
            bar.update(1)
            last = step == config.steps
            due = config.checkpoint_every and step % config.checkpoint_every == 0
            stop = should_stop is not None and should_stop()
            if config.checkpoint_dir and is_main and (due or last or stop):
                save(step, position, key)
            if on_step is not None:
                on_step(step, loss)
            if stop:
                break
    except Exception as e:
        if (config.checkpoint_dir and is_main and done["step"] > start_step
                and not isinstance(e, NonFiniteLossError)  # its weights are NaN: the last checkpoint stays
                and done.get("saved_step") != done["step"]):
            try:
                save(done["step"], done["position"], done["key"])
                print(f"[INFO] the run failed after step {done['step']}: checkpoint {done['saved']}",
                      file=sys.stderr)
            except Exception as e:  # the state itself may be what failed: the error below matters more
                print(f"[INFO] the run failed after step {done['step']} and could not checkpoint: {e}",
                      file=sys.stderr)
        raise
    finally:
        bar.close()
    saved = str(done["saved"]) if done["saved"] else None
    return {"losses": losses, "step": step, "position": done["position"],
            "stopped": bool(should_stop and should_stop()), "checkpoint": saved}
