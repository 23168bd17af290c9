"""Packed text in finetuning: several conversations per row, attention and
positions restricted to each. Checked against each conversation run alone and
against the right-padded batch (loss and gradients)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from mlx_vlm_native import load
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native.training import finetune
from mlx_vlm_native.training.finetune import (
    ConversationFile, PackedBatch, answer_loss, forward_packed, parse_record, run, tokenize,
)


def image(seed, h, w):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def conversations(root, n=4):
    records = []
    for i in range(n):
        image(i, 28 + 14 * (i % 3), 56 - 14 * (i % 2)).save(root / f"{i}.png")
        records.append({"images": [f"{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?" + " and more" * (3 * i % 5)},
            {"from": "gpt", "value": "It is" + " a thing" * (i + 1) + "."},
            {"from": "human", "value": "Again?"},
            {"from": "gpt", "value": "Yes" + "!" * i}]})
    return records


@pytest.fixture(scope="module", params=["qwen2-vl-tiny", "tiny-56", "points-tiny"])
def model_and_samples(request, tmp_path_factory):
    """Qwen2-VL (M-RoPE, positions per sample), LLaVA-OneVision (plain RoPE
    restarted per segment) and POINTS (a packed tower, plain RoPE)."""
    root = tmp_path_factory.mktemp(request.param)
    model, processor = load(str(write_checkpoint(root / "model", request.param)))
    samples = [tokenize(processor, parse_record(r, root)) for r in conversations(root)]
    return model, samples


def per_sample_losses(model, rows):
    logits, targets, mask = forward_packed(model, rows)
    ce = np.array(nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask)
    out = []
    for r, row in enumerate(rows):
        start = 0
        for inputs, _ in row:
            n = len(inputs.input_ids)
            m = np.array(mask[r, start : start + n])
            out.append(ce[r, start : start + n].sum() / m.sum())
            start += n
    return out


def test_packed_per_sample_loss_equals_each_alone(model_and_samples):
    model, samples = model_and_samples
    rows = PackedBatch([samples[:3], samples[3:]])  # 3 + 1 conversations, the second row padded
    packed = per_sample_losses(model, rows)
    alone = [answer_loss(model, [s])[0].item() for s in samples]
    assert np.abs(np.array(packed) - np.array(alone)).max() <= 1e-5, (packed, alone)
    # the same row without the segment mask and position restart is a different computation
    logits, targets, mask = forward_packed(model, PackedBatch([samples[:3]]))
    ids = np.concatenate([s[0].input_ids for s in samples[:3]])[None]
    naive = model(mx.array(ids), input_embeddings=mx.concatenate(
        [model.get_input_embeddings(s[0])[0] for s in samples[:3]], axis=1))
    assert np.abs(np.array(naive) - np.array(logits)).max() > 1e-3


def test_packed_loss_and_gradients_equal_the_padded_batch(model_and_samples):
    model, samples = model_and_samples
    loss_and_grad = nn.value_and_grad(model, lambda m, b: answer_loss(m, b)[0])
    padded_loss, padded_grads = loss_and_grad(model, samples)
    packed_loss, packed_grads = loss_and_grad(model, PackedBatch([samples[:2], samples[2:]]))
    assert answer_loss(model, samples)[1].item() == answer_loss(model, PackedBatch([samples]))[1].item()
    assert abs(packed_loss.item() - padded_loss.item()) <= 1e-5
    a, b = dict(tree_flatten(padded_grads)), dict(tree_flatten(packed_grads))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        diff = np.abs(np.array(a[k]) - np.array(b[k])).max()
        assert diff <= 1e-5 + 1e-4 * np.abs(np.array(a[k])).max(), (k, diff)


@pytest.fixture(scope="module")
def colour_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_data")
    write_checkpoint(root / "model", "tiny-56")
    records = conversations(root, 10)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def test_packed_batches_fill_rows_in_order_and_resume(colour_files):
    _, processor = load(str(colour_files / "model"))
    data = ConversationFile(colour_files / "train.jsonl", shuffle=False)
    lengths = [len(tokenize(processor, data.read(i))[0].input_ids) for i in range(len(data))]
    budget = max(lengths) + min(lengths)
    stream = finetune.sample_batches(data, processor, 2, 10_000, pack_tokens=budget)
    batches = [next(stream) for _ in range(4)]
    order = []
    for batch, position in batches:
        assert isinstance(batch, PackedBatch) and 1 <= len(batch) <= 2
        assert all(sum(len(s[0].input_ids) for s in row) <= budget for row in batch)
        order += sorted(s[0].input_ids.tobytes() for row in batch for s in row)
        # every sample read so far is placed (none lost)
        assert position["epoch"] * len(data) + position["index"] == len(order)
    expected = [tokenize(processor, data.read(i % len(data)))[0].input_ids.tobytes() for i in range(len(order))]
    start = 0
    for batch, _ in batches:  # each batch holds the next samples in data order
        n = sum(len(row) for row in batch)
        assert order[start : start + n] == sorted(expected[start : start + n])
        start += n
    resumed = finetune.sample_batches(data, processor, 2, 10_000, position=batches[1][1], pack_tokens=budget)
    for (want, pos), (got, gpos) in zip(batches[2:], [next(resumed) for _ in range(2)]):
        assert pos == gpos
        assert [[s[0].input_ids.tolist() for s in row] for row in want] == \
               [[s[0].input_ids.tolist() for s in row] for row in got]


def test_packed_finetune_run_resumes_exactly(colour_files, tmp_path):
    def recipe(out):
        return {"model": str(colour_files / "model"), "data": {"train": str(colour_files / "train.jsonl")},
                "output": str(out), "method": "lora", "steps": 4, "seed": 0, "pack": True, "pack_tokens": 256,
                "micro_batch_size": 1, "checkpoint_every": 2, "optim": {"lr": 1e-3},
                "lora": {"targets": [r"language_model\..*(q|v)_proj"], "rank": 4, "scale": 10.0}}

    full = run(recipe(tmp_path / "full"), progress=False)

    def interrupt(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe(tmp_path / "cut"), progress=False, on_step=interrupt)
    resumed = run(recipe(tmp_path / "cut"), resume="auto", progress=False)
    assert resumed["losses"] == full["losses"][2:]
    a = mx.load(str(tmp_path / "full/adapters/adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut/adapters/adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
