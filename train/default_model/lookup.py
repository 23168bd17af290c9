"""Stage 2 with the named object looked up: the answer loss plus an auxiliary loss that
teaches chosen attention heads to look at the object a question names.

The generator knows which image tokens each object covers. For every answer that names one
object's colour and shape (the colour, shape and place answers, and a lone shape's caption),
the heads in LOOKUP_HEADS are taught, at each position that predicts an answer token, to put
their attention on that object's tokens: the loss is
-log(attention mass on the object), averaged over those positions, times `weight`. This is
the binding the plain answer loss left at about half right on scenes of several shapes
(the tokens hold every object's colour, shape and cell; the decoder looked at the wrong one).

Conversations are generated on the fly (the same `shapes` generator and question mix as the
files stage 2 otherwise reads), each from its own seed, so a resumed run sees the same
batches. The run is the project's training loop (`training.loop.train`): checkpoints,
resume and a clean stop on SIGINT/SIGTERM come from there.
"""

import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from mlx_vlm_native.models.base import masked_cross_entropy
from mlx_vlm_native.training.finetune import Conversation, answer_tokens, forward_batch, set_trainable, tokenize
from mlx_vlm_native.training.loop import TrainConfig, stop_message, train as run_loop
from mlx_vlm_native.training.checkpoint import resume_state
from mlx_vlm_native.training.optim import build_optimizer
from mlx_vlm_native.utils import copy_side_files, load, save_config, save_weights

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]  # encoder.py; the repo root
from train import shapes_world as shapes  # noqa: E402  (train/shapes_world.py)
from encoder import object_region  # noqa: E402

LOOKUP_HEADS = ((1, 0), (2, 0))  # (layer, query head) taught to look at that object


def named_item(scene: shapes.Scene, answer: str) -> Optional[shapes.Item]:
    """The one object whose colour and shape the answer names ("It is a red cross.", "The
    circle is red."), or None when it names none or several (counts, words, lists, captions
    of several shapes)."""
    said = set(shapes.words(answer).split())
    found = [i for i in scene.items if i.colour in said and i.shape in said]
    return found[0] if len(found) == 1 else None


def mentions(scene: shapes.Scene, answer: str, in_lists: bool = False) -> List[Tuple[shapes.Item, int, int]]:
    """(object, start, end) of the characters of `answer` about each object: the whole answer
    when it names one object; with `in_lists`, also each object's own words in a caption
    ("a small red circle at the top left") or a list ("circle red", "red circle top left")."""
    one = named_item(scene, answer)
    if one is not None:
        return [(one, 0, len(answer))]
    if not in_lists:
        return []
    text, found = answer.lower(), []
    for item in scene.items:
        forms = (f"{item.phrase()} {shapes.position_phrase(item.position)}", f"{item.shape} {item.colour}",
                 f"{item.colour} {item.shape} {item.position}")
        at = next(((text.find(f), f) for f in forms if text.count(f) == 1), None)
        if at is not None:
            found.append((item, at[0], at[0] + len(at[1])))
    return found


def sample(rng: np.random.Generator, mix: Optional[Dict[str, float]], turns: int, two_image_fraction: float,
           two_image_turns: int, grid: int, in_lists: bool = False):
    """(Conversation with PIL images, [[(object token mask, start, end) of each object the answer is
    about] per assistant turn]) or None."""
    record, scene, images = shapes.training_conversation(rng, ("image", "second"), turns, two_image_fraction, mix,
                                                         two_image_turns)
    if record is None:
        return None
    answers = [m["content"] for m in record["messages"][1::2]]
    about = [[] for _ in answers] if len(images) > 1 else [
        [(object_region(scene, item, grid), start, end) for item, start, end in mentions(scene, answer, in_lists)]
        for answer in answers]
    return as_conversation(record, images), about


def as_conversation(record: dict, images: list) -> Conversation:
    messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
                for m in record["messages"]]
    return Conversation(messages, images, [])


def answer_runs(mask: np.ndarray) -> List[np.ndarray]:
    """The query positions predicting each answer's tokens (answer i's tokens are the i-th run of
    `mask`; position p predicts token p + 1)."""
    rows = np.flatnonzero(mask[1:])
    return np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(rows) else []


def mention_rows(tokenizer, answer: str, ids: np.ndarray, rows: np.ndarray, start: int, end: int) -> np.ndarray:
    """The positions predicting the answer's tokens that overlap characters start..end (`ids`:
    the answer's tokens as the conversation holds them, `rows`: the positions predicting them)."""
    said, done = [], 0
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1].tolist())
        if not answer.startswith(text):  # the end token
            break
        if done < end and len(text) > start:
            said.append(rows[t])
        done = len(text)
    if done != len(answer):
        raise ValueError(f"the answer {answer!r} is not the text of its tokens {ids.tolist()}")
    return np.array(said, int)


def batches(processor, seed: int, micro_batch: int, position: Optional[dict], grid: int, image_token: int,
            **data):
    """Yield ([(inputs, mask, [(query rows, object token positions)])], position after it)."""
    index = (position or {}).get("index", 0)
    while True:
        batch = []
        while len(batch) < micro_batch:
            made = sample(np.random.default_rng((seed, index)), grid=grid, **data)
            index += 1
            if made is None:
                continue
            conversation, about = made
            inputs, mask = tokenize(processor, conversation)
            ids = np.asarray(inputs.input_ids)
            image_at = np.flatnonzero(ids == image_token)
            answers = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
            lookups = []
            for rows, answer, objects in zip(answer_runs(mask), answers, about):
                for region, start, end in objects:
                    whole = start == 0 and end == len(answer)
                    said = rows if whole else mention_rows(processor.tokenizer, answer, ids[rows + 1], rows, start, end)
                    lookups.append((said, image_at[region]))
            batch.append((inputs, mask, lookups))
        yield batch, {"index": index}


@contextlib.contextmanager
def recorded_queries_and_keys(model, layers: Sequence[int]):
    """{layer: [rotated queries, rotated keys]} of a forward pass, as the attention computes them."""
    seen = {layer: [] for layer in layers}
    attentions = {layer: model.layers[layer].self_attn for layer in layers}
    originals = {layer: a.rope for layer, a in attentions.items()}

    def recorder(layer):
        def rope(x, offset=0):
            y = originals[layer](x, offset=offset)
            seen[layer].append(y)
            return y
        return rope

    for layer, a in attentions.items():
        a.rope = recorder(layer)
    try:
        yield seen
    finally:
        for layer, a in attentions.items():
            a.rope = originals[layer]


def lookup_loss(seen: dict, lookups: Sequence, scale: float) -> mx.array:
    """Mean over heads and supervised positions of -log(attention mass on the named object)."""
    B, _, T, _ = seen[LOOKUP_HEADS[0][0]][0].shape
    target = np.zeros((B, T, T), bool)
    for b, sample_lookups in enumerate(lookups):
        for rows, tokens in sample_lookups:
            target[b, rows[:, None], tokens[None, :]] = True
    supervised = mx.array(target.any(-1).astype(np.float32))
    target = mx.array(target)
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    total = mx.array(0.0)
    for layer, head in LOOKUP_HEADS:
        queries, keys = seen[layer]
        kv = head // (queries.shape[1] // keys.shape[1])
        scores = (queries[:, head] @ keys[:, kv].transpose(0, 2, 1)).astype(mx.float32) * scale
        everything = mx.logsumexp(mx.where(causal, scores, -1e9), axis=-1)
        on_object = mx.logsumexp(mx.where(target, scores, -1e9), axis=-1)
        total = total + ((everything - on_object) * supervised).sum() / mx.maximum(supervised.sum(), 1.0)
    return total / len(LOOKUP_HEADS)


def make_loss(weight: float, scale: float, stats: dict):
    def loss(model, batch, key=None):
        with recorded_queries_and_keys(model, sorted({layer for layer, _ in LOOKUP_HEADS})) as seen:
            logits, targets, mask = forward_batch(model, [(inputs, m) for inputs, m, _ in batch])
        ce, count = masked_cross_entropy(logits, targets, mask)
        aux = lookup_loss(seen, [lookups for _, _, lookups in batch], scale)
        stats["lookup"] = aux
        return ce + weight * aux, count
    return loss


def train(model_dir: Path, out: Path, steps: int, lr: float, weight: float, mix=None, turns: int = 5,
          two_image_fraction: float = 0.15, two_image_turns: int = 4, micro_batch: int = 16, seed: int = 0,
          checkpoint_every: int = 200, progress: bool = True, in_lists: bool = False) -> Path:
    """Train a built model's projector and decoder (the ViT frozen) on generated conversations with
    the answer loss plus `weight` x the lookup loss (`in_lists`: also on each object's words in
    captions and lists); resumes from out/checkpoints; writes out/model."""
    mx.random.seed(seed)
    model, processor = load(str(model_dir))
    set_trainable(model, "full", ["vision_tower"])
    optimizer = build_optimizer({"lr": lr, "warmup_steps": 50, "end_lr": 1e-5, "weight_decay": 0.0,
                                 "bias_correction": False, "decay_all": True}, steps)
    ckpt_dir = out / "checkpoints"
    start, position, rng_key = resume_state("auto" if ckpt_dir.exists() else None, ckpt_dir, model, optimizer)
    vision = model.args.vision_config
    grid = vision.image_size // vision.patch_size
    data = batches(processor, seed, micro_batch, position, grid, model.args.image_token_index, mix=mix,
                   turns=turns, two_image_fraction=two_image_fraction, two_image_turns=two_image_turns,
                   in_lists=in_lists)
    attention = model.layers[0].self_attn
    stats = {}
    config = TrainConfig(steps=steps, checkpoint_dir=str(ckpt_dir), checkpoint_every=checkpoint_every,
                         keep_checkpoints=1, progress=progress, rate_unit="tok")

    def log(step, loss):
        if step % 50 == 0:
            print(f"step {step}: loss {loss:.4f}, lookup {stats['lookup'].item():.3f}", flush=True)

    result = run_loop(model, make_loss(weight, attention.scale, stats), optimizer, data, config,
                      start_step=start, batch_size_of=lambda b: answer_tokens([(i, m) for i, m, _ in b]),
                      rng_key=rng_key, seed=seed, on_step=log)
    if result["stopped"]:
        sys.exit(stop_message(result))
    model.eval()
    save_weights(out / "model", model)
    copy_side_files(model_dir, out / "model")
    save_config(json.loads((model_dir / "config.json").read_text()), out / "model")
    return out / "model"
