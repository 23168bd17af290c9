"""Finetuning any supported VLM on conversations: LoRA, DoRA, QLoRA (LoRA on a
quantized base) or full, with the loss on assistant tokens only.

Data is a JSONL file, one conversation per line, in the LLaVA form
`{"images": [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}` or the OpenAI form `{"messages": [{"role":
"user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
{"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`.
Images are resolved relative to the file. Lines are read on demand through a
byte-offset index, so the file need not fit in memory.
"""

import contextlib
import copy
import json
import re
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..adapters import ADAPTER_LAYERS, adapt_linears, adapter_config, save_adapters
from ..conversations import Conversation, RecordError, parse_record
from ..models.base import masked_cross_entropy
from ..utils import copy_side_files, default_model_path, get_model_path, load, save_config, save_weights
from .checkpoint import resume_state
from .config import finetune_config, regular_file
from .loop import TrainConfig, train
from .optim import build_optimizer
from .stream import epoch_order, positions, rank_batches

MAX_LINE_BYTES = 64 << 20  # one conversation's JSON line


def parse_line(line: bytes, root: Path) -> Conversation:
    """One JSONL line -> a Conversation; any problem is a ValueError or FileNotFoundError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not valid JSON: {e}") from None
    return parse_record(record, root)


class ConversationFile:
    """A JSONL of conversations, read line by line through byte offsets, shuffled
    per epoch from `seed`; `iterate(position)` resumes exactly.

    Every record is checked when the file is opened, so a bad one stops the run
    before its first step, with the file and line named: `on_bad_record="error"`
    (the default) raises at the first, "skip" leaves the bad lines out and
    counts them in `skipped` (with a warning naming each)."""

    def __init__(self, path, seed: int = 0, shuffle: bool = True, on_bad_record: str = "error"):
        self.path = Path(path)
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        regular_file(self.path, "data file")
        offsets, lines, offset, self.skipped = [], [], 0, 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(line) > MAX_LINE_BYTES:
                    raise RecordError(f"{self.path}, line {number}: longer than {MAX_LINE_BYTES} bytes "
                                      "(one conversation per line)")
                if line.strip():
                    try:
                        parse_line(line, self.path.parent)
                    except (ValueError, FileNotFoundError) as e:
                        if on_bad_record == "error":
                            raise RecordError(f"{self.path}, line {number}: {e}") from None
                        self.skipped += 1
                        warnings.warn(f"{self.path}, line {number}: {e}: skipped")
                    else:
                        offsets.append(offset)
                        lines.append(number)
                offset += len(line)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.lines = np.array(lines, dtype=np.int64)
        if not len(self.offsets):
            skipped = f" ({self.skipped} skipped)" if self.skipped else ""
            raise ValueError(f"{self.path} has no usable records{skipped}")
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, index: int) -> Conversation:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            line = f.readline()
        try:
            return parse_line(line, self.path.parent)
        except (ValueError, FileNotFoundError) as e:  # the file changed since it was checked
            raise RecordError(f"{self.path}, line {int(self.lines[index])}: {e}") from None

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self), self.seed, epoch, self.shuffle)

    def iterate(self, position: Optional[dict] = None) -> Iterator[Tuple[Conversation, dict]]:
        for index, pos in positions(len(self), self.seed, position, self.shuffle):
            yield self.read(index), pos


def split_file(path, valid_fraction: float, seed: int, on_bad_record: str = "error"):
    """Train and held-out views of one file: every record lands in exactly one."""
    train = ConversationFile(path, seed, on_bad_record=on_bad_record)
    if valid_fraction <= 0:
        return train, None
    valid = copy.copy(train)
    valid.shuffle = False
    n = len(train)
    keep = np.ones(n, bool)
    keep[np.random.default_rng(seed).permutation(n)[: max(1, int(n * valid_fraction))]] = False
    train.offsets, valid.offsets = train.offsets[keep], train.offsets[~keep]
    train.lines, valid.lines = train.lines[keep], train.lines[~keep]
    return train, valid


# ---------------------------------------------------------------- tokenization


def tokenize(processor, conversation: Conversation, mask_prompt: bool = True):
    """Processed inputs and a mask of the assistant tokens (answer + end token);
    with `mask_prompt` False, of every token but the media placeholders.

    The conversation is rendered once; each assistant turn's span is where the
    rendering of the turns before it (with the generation prompt) ends and the
    rendering up to and including it ends."""
    messages = conversation.messages
    full = processor.format_messages(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.format_messages(messages[:i], add_generation_prompt=True)
        upto = processor.format_messages(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        end = len(upto.rstrip())  # the template's newline after the end token is not the answer
        spans.append((len(before), end))
    encode = lambda text: processor.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ids, mask, start = [], [], 0
    for a, b in spans:
        for text, trained in ((full[start:a], False), (full[a:b], True)):
            piece = encode(text) if text else []
            ids += piece
            mask += [trained] * len(piece)
        start = b
    if start < len(full):
        piece = encode(full[start:])
        ids += piece
        mask += [False] * len(piece)
    inputs = processor(full, images=conversation.images, videos=conversation.videos)
    if not mask_prompt:
        mask = [True] * len(ids)
    return inputs, expand_mask(inputs.input_ids, ids, mask, placeholder_ids(processor))


def placeholder_ids(processor) -> set:
    return {t for t in (processor.image_token_id, processor.video_token_id) if t is not None}


def expand_mask(expanded: np.ndarray, ids: list, mask: list, placeholders: set) -> np.ndarray:
    """The mask of `ids` carried over to the processor's expanded ids: only the
    (never trained) placeholders repeat, so other tokens keep their order."""
    kept = [(t, m) for t, m in zip(ids, mask) if t not in placeholders]
    others = [t for t in expanded.tolist() if t not in placeholders]
    if [t for t, _ in kept] != others:
        raise ValueError("segment-wise tokenization differs from the processor's; cannot mask the answers")
    values = iter(m for _, m in kept)
    return np.array([False if t in placeholders else next(values) for t in expanded.tolist()])


# ---------------------------------------------------------------- adapters


def set_trainable(model: nn.Module, method: str, freeze: Sequence[str] = ()) -> None:
    """LoRA/DoRA: only adapter weights train; full: everything except paths
    matching a `freeze` regex."""
    if method == "full":
        model.unfreeze()
    else:
        model.freeze()
        for _, module in model.named_modules():
            if isinstance(module, ADAPTER_LAYERS):
                module.unfreeze(recurse=False)
                module.linear.freeze()
    patterns = [re.compile(f) for f in freeze]
    for path, module in model.named_modules():
        if path and any(p.search(path) for p in patterns):
            module.freeze()


# ---------------------------------------------------------------- loss


def head_language_model(model) -> Optional[nn.Module]:
    """The decoder whose output head can be given selected rows: an mlx-lm
    model (its `__call__` runs `self.model`, then the head, row by row)."""
    lm = getattr(model, "language_model", None)
    inner = getattr(lm, "model", None)
    if isinstance(inner, nn.Module) and type(lm).__module__.startswith("mlx_lm."):
        return inner
    return None


@contextlib.contextmanager
def head_on_rows(model, rows: np.ndarray):
    """Within it, the model's output is the logits of only these rows of its
    (B * L) hidden states, as (1, len(rows), vocab): the output head (and the
    loss after it) skips the positions that are not targets. On a vocabulary of
    150k the logits of a whole sequence cost more memory than a decoder layer's
    activations. Yields False (and changes nothing) where the model's decoder
    is not one `head_language_model` knows."""
    inner = head_language_model(model)
    if inner is None:
        yield False
        return
    cls, index = type(inner), mx.array(rows.astype(np.int32))

    def __call__(self, *args, **kwargs):
        h = cls.__call__(self, *args, **kwargs)
        return mx.take(h.reshape(-1, h.shape[-1]), index, axis=0)[None]

    inner.__class__ = type(f"RowsOf{cls.__name__}", (cls,), {"__call__": __call__})
    try:
        yield True
    finally:
        inner.__class__ = cls


def forward_batch(model, batch: Sequence, targets_only: bool = False) -> Tuple[mx.array, mx.array, mx.array]:
    """Right-padded (logits, targets, target mask) of a list of (inputs, mask);
    the images of the whole batch go through one `encode_vision` call (one
    packed tower call for the packed families). With `targets_only`, where the
    model allows it (`head_on_rows`), the logits, targets and mask of the target
    positions only, as one row."""
    samples = [inputs for inputs, _ in batch]
    features = model.encode_vision(samples)
    length = max(len(s.input_ids) for s in samples)
    embeds, positions = [], []
    ids, masks = np.zeros((len(batch), length), np.int32), np.zeros((len(batch), length), bool)
    for i, ((inputs, mask), feats) in enumerate(zip(batch, features)):
        e, p = model.get_input_embeddings(inputs, vision_features=feats)
        n = len(inputs.input_ids)
        embeds.append(mx.pad(e[0], [(0, length - n), (0, 0)]))
        positions.append([p])
        ids[i, :n], masks[i, :n] = inputs.input_ids, mask
    kwargs = dict(input_embeddings=mx.stack(embeds), positions=row_positions(positions, length))
    targets, masks = np.pad(ids[:, 1:], [(0, 0), (0, 1)]), np.pad(masks[:, 1:], [(0, 0), (0, 1)])
    if targets_only and masks.any():
        rows = np.flatnonzero(masks)
        with head_on_rows(model, rows) as selected:
            if selected:
                logits = model(mx.array(ids), **kwargs)
                return logits, mx.array(targets.reshape(-1)[rows][None]), mx.ones((1, len(rows)), dtype=mx.bool_)
    logits = model(mx.array(ids), **kwargs)
    return logits[:, :-1], mx.array(targets[:, :-1]), mx.array(masks[:, :-1])


def row_positions(rows: Sequence[Sequence[Optional[np.ndarray]]], length: int) -> Optional[np.ndarray]:
    """The positions of each row's samples ((.., n) each, from `get_input_embeddings`)
    end to end, zero-padded to `length`: (R, .., length); None for a family
    with plain 1-D positions."""
    first = rows[0][0]
    if first is None:
        return None
    out = np.zeros((len(rows), *first.shape[:-1], length), first.dtype)
    for r, row in enumerate(rows):
        start = 0
        for p in row:
            out[r, ..., start : start + p.shape[-1]] = p
            start += p.shape[-1]
    return out


class PackedBatch(list):
    """Rows of samples, each row one sequence: [[(inputs, mask), ...], ...]."""


class SegmentMask:
    """Stands in for each layer's KV cache during one training forward, so an
    mlx-lm model attends only within each conversation of a packed row: mlx-lm
    takes the attention mask from the cache (`make_mask`), rotates from its
    `offset` (0) and passes keys and values through `update_and_fetch`."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, *args, **kwargs) -> mx.array:
        return self.mask

    def update_and_fetch(self, keys, values):
        return keys, values


class SegmentRoPE(nn.Module):
    """A layer's rotary embedding applied to each segment of each row from
    position 0, exactly as for the conversation alone."""

    def __init__(self, rope, bounds: Sequence[Sequence[Tuple[int, int]]]):
        super().__init__()
        self.rope, self.bounds = rope, bounds

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:  # (B, H, L, D)
        rows = [mx.concatenate([self.rope(x[b : b + 1, :, s:e]) for s, e in bounds], axis=2)
                for b, bounds in enumerate(self.bounds)]
        return mx.concatenate(rows, axis=0)


@contextlib.contextmanager
def segment_rope(model, bounds):
    attentions = [layer.self_attn for layer in model.layers]
    if not all(hasattr(a, "rope") for a in attentions):
        raise ValueError(f"packing is not supported for {type(model).__module__}: its attention has no `rope`")
    originals = [a.rope for a in attentions]
    for a, rope in zip(attentions, originals):
        a.rope = SegmentRoPE(rope, bounds)
    try:
        yield
    finally:
        for a, rope in zip(attentions, originals):
            a.rope = rope


def forward_packed(model, rows: Sequence, targets_only: bool = False) -> Tuple[mx.array, mx.array, mx.array]:
    """(logits, targets, target mask) of packed rows, each padded at its end:
    block-diagonal causal attention, positions restarting at each
    conversation (M-RoPE positions per sample for Qwen2-VL), and each
    conversation's targets its own next tokens, as if it were alone.
    `targets_only`: as for `forward_batch`."""
    samples = [inputs for row in rows for inputs, _ in row]
    features = iter(model.encode_vision(samples))
    length = max(sum(len(inputs.input_ids) for inputs, _ in row) for row in rows)
    R = len(rows)
    ids, targets = np.zeros((R, length), np.int32), np.zeros((R, length), np.int32)
    masks, segments = np.zeros((R, length), bool), np.zeros((R, length), np.int32)
    embeds, bounds, positions = [], [], []
    for r, row in enumerate(rows):
        parts, spans, start = [], [], 0
        positions.append([])
        for j, (inputs, mask) in enumerate(row):
            e, p = model.get_input_embeddings(inputs, vision_features=next(features))
            n = len(inputs.input_ids)
            parts.append(e[0])
            positions[r].append(p)
            ids[r, start : start + n] = inputs.input_ids
            targets[r, start : start + n - 1] = inputs.input_ids[1:]
            masks[r, start : start + n - 1] = mask[1:]
            segments[r, start : start + n] = j
            spans.append((start, start + n))
            start += n
        if start < length:  # the end padding: one more segment, never a target
            parts.append(mx.zeros((length - start, parts[0].shape[-1]), parts[0].dtype))
            segments[r, start:] = len(row)
            spans.append((start, length))
        embeds.append(mx.concatenate(parts))
        bounds.append(spans)
    seg = mx.array(segments)
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & causal
    cache = [SegmentMask(mask) for _ in model.layers]
    positions = row_positions(positions, length)
    selected = np.flatnonzero(masks) if targets_only and masks.any() else None
    with head_on_rows(model, selected) if selected is not None else contextlib.nullcontext(False) as on_rows:
        if positions is not None:  # each sample's own positions, from 0
            logits = model(mx.array(ids), cache=cache, input_embeddings=mx.stack(embeds), positions=positions)
        else:
            with segment_rope(model, bounds):
                logits = model(mx.array(ids), cache=cache, input_embeddings=mx.stack(embeds))
    if on_rows:
        return logits, mx.array(targets.reshape(-1)[selected][None]), mx.ones((1, len(selected)), dtype=mx.bool_)
    return logits, mx.array(targets), mx.array(masks)


def answer_loss(model, batch, key=None):
    """Mean cross-entropy over assistant tokens, and their count; the output
    head runs on those tokens' positions only (`head_on_rows`)."""
    forward = forward_packed if isinstance(batch, PackedBatch) else forward_batch
    logits, targets, mask = forward(model, batch, targets_only=True)
    return masked_cross_entropy(logits, targets, mask)


# ---------------------------------------------------------------- the run


def sample_batches(data: ConversationFile, processor, micro_batch: int, max_tokens: int,
                   on_too_long: str = "skip", position: Optional[dict] = None, stats: Optional[dict] = None,
                   pack_tokens: Optional[int] = None, mask_prompt: bool = True):
    """Yield (micro-batch of (inputs, mask), data position after it), this
    process's share under `mx.distributed`: of each group of `size`
    micro-batches, rank r takes the r-th; the position is after the group.

    With `pack_tokens`, a micro-batch is a `PackedBatch` of `micro_batch` rows
    of at most `pack_tokens` tokens, filled first-fit in data order; a sample
    that fits no row starts the next micro-batch (and is read again on resume,
    the position being after the last sample placed).

    When a whole pass over the data finds no sample within the token limit,
    that is an error naming the limit and the shortest sample."""
    group = mx.distributed.init()
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    samples = data.iterate(position)
    limit = min(max_tokens, pack_tokens) if pack_tokens else max_tokens
    held = []
    unusable = {"run": 0, "shortest": None}  # samples skipped in a row

    def next_sample():
        if held:
            return held.pop()
        while True:
            if unusable["run"] >= len(data):
                raise ValueError(f"no sample of {data.path} fits the {limit}-token limit (max_tokens / pack_tokens; "
                                 f"the shortest has {unusable['shortest']} tokens) or has an answer to learn")
            conversation, pos = next(samples)
            inputs, mask = tokenize(processor, conversation, mask_prompt)
            n = len(inputs.input_ids)
            if n > limit or not mask.any():
                unusable["run"] += 1
                unusable["shortest"] = min(n, unusable["shortest"] or n)
                stats["skipped"] += 1
                if n > limit:
                    message = f"a sample of {n} tokens exceeds the {limit}-token limit"
                    if on_too_long == "error":
                        raise ValueError(message)
                    warnings.warn(f"{message}: skipped ({stats['skipped']} so far)")
                continue
            unusable["run"] = 0
            return (inputs, mask), pos

    def next_batch():
        if pack_tokens:
            return next_packed()
        batch = []
        while len(batch) < micro_batch:
            sample, pos = next_sample()
            batch.append(sample)
        return batch, pos

    def next_packed():
        rows, room, pos = [[] for _ in range(micro_batch)], [pack_tokens] * micro_batch, None
        while True:
            sample, after = next_sample()
            n = len(sample[0].input_ids)
            fit = next((r for r in range(micro_batch) if room[r] >= n), None)
            if fit is None:
                held.append((sample, after))
                return PackedBatch(row for row in rows if row), pos
            rows[fit].append(sample)
            room[fit] -= n
            pos = after

    def stream():
        while True:
            yield next_batch()

    yield from rank_batches(stream(), group.rank(), group.size())


def answer_tokens(batch) -> int:
    rows = batch if isinstance(batch, PackedBatch) else [batch]
    return sum(int(m.sum()) for row in rows for _, m in row)


def evaluate(model, batches: Sequence) -> float:
    total, count = 0.0, 0
    for batch in batches:
        loss, n = answer_loss(model, batch)
        total += loss.item() * n.item()
        count += n.item()
    return total / max(count, 1)


def run(recipe, resume: Optional[str] = None, progress: bool = True, on_step=None) -> dict:
    """Finetune from a recipe (a dict or a FinetuneConfig): every key and
    value is checked before the model is loaded."""
    cfg = finetune_config(recipe)
    train_file, valid_file = cfg.data.files()
    seed = cfg.seed
    mx.random.seed(seed)
    model_path = get_model_path(cfg.model or default_model_path())
    model, processor = load(str(model_path))
    method, lora = cfg.method, cfg.lora
    adapters = None
    if method in ("lora", "dora"):
        keys = adapt_linears(model, lora.targets, lora.rank, lora.scale, lora.dropout, method == "dora",
                             lora.num_layers)
        adapters = adapter_config(method, keys, lora.rank, lora.scale, lora.dropout, lora.targets, model)
    set_trainable(model, method, cfg.frozen)
    if cfg.resume_adapter_file:
        load_weights_from(model, cfg.resume_adapter_file)

    on_bad = cfg.data.on_bad_record
    train_data, valid_data = split_file(train_file, cfg.data.valid_fraction, seed, on_bad)
    if valid_file is not None:
        valid_data = ConversationFile(valid_file, seed, shuffle=False, on_bad_record=on_bad)
    steps = cfg.steps
    optimizer = build_optimizer(cfg.optim.as_dict(), steps)
    out = cfg.run_folder
    ckpt_dir = out / "checkpoints"
    start, position, rng_key = resume_state(resume, ckpt_dir, model, optimizer, steps)

    context = model.args.text_config.max_position_embeddings
    max_tokens = cfg.max_tokens or context
    stats = {}
    pack_tokens = (cfg.pack_tokens or max_tokens) if cfg.pack else None
    batches = sample_batches(train_data, processor, cfg.micro_batch_size, max_tokens, cfg.on_too_long, position,
                             stats, pack_tokens, cfg.mask_prompt)
    config = TrainConfig(
        steps=steps, grad_accumulation=cfg.grad_accumulation,
        compute_dtype=cfg.compute_dtype, grad_checkpoint=cfg.grad_checkpoint,
        checkpoint_dir=str(ckpt_dir), checkpoint_every=cfg.checkpoint_every or 0,
        keep_checkpoints=cfg.keep_checkpoints, progress=progress, rate_unit="tok",
    )
    eval_every, evals = cfg.eval_every, []
    held_out = []
    if valid_data is not None and eval_every:
        it = valid_data.iterate()
        held_out = [[tokenize(processor, next(it)[0], cfg.mask_prompt)]
                    for _ in range(min(len(valid_data), cfg.eval_samples))]

    def after_step(step, loss):
        if held_out and (step % eval_every == 0 or step == steps):
            model.eval()
            evals.append((step, evaluate(model, held_out)))
            model.train()
        if on_step is not None:
            on_step(step, loss)

    result = train(model, answer_loss, optimizer, batches, config, start_step=start,
                   checkpoint_layers=model.layers, batch_size_of=answer_tokens,
                   rng_key=rng_key, seed=seed, on_step=after_step)
    model.eval()
    summary = {**result, "evals": evals, "skipped": stats.get("skipped", 0), "bad_records": train_data.skipped}
    if result["stopped"]:
        return summary
    if mx.distributed.init().rank() == 0:
        if method == "full":
            save_weights(out / "model", model)
            copy_side_files(model_path, out / "model")
            save_config(json.loads((model_path / "config.json").read_text()), out / "model")
            summary["saved"] = str(out / "model")
        else:
            save_adapters(cfg.adapter_folder, model, adapters)
            summary["saved"] = str(cfg.adapter_folder)
    return summary


def load_weights_from(model, file) -> None:
    """Start from saved adapter (or full) weights: each must exist in the model with its shape."""
    weights = mx.load(str(file))
    expected = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in expected:
            raise ValueError(f"{file}: weight {name!r} does not exist in this model (is it for another model "
                             "or another set of targets?)")
        if w.shape != expected[name].shape:
            raise ValueError(f"{file}: weight {name!r} has shape {list(w.shape)}, the model's is "
                             f"{list(expected[name].shape)}")
    model.load_weights(list(weights.items()), strict=False)
