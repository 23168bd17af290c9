"""Finetuning: conversation data, assistant-only loss, LoRA/DoRA/full, adapters,
fuse, exact resume, and 2-process data parallelism through mlx.launch."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from mlx_vlm_native import generate, load
from mlx_vlm_native.fuse import fuse
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native.training import finetune
from mlx_vlm_native.training.finetune import ConversationFile, answer_loss, run, tokenize

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def colour_image(name, seed, h=48, w=64):
    rng = np.random.default_rng(seed)
    a = np.full((h, w, 3), COLOURS[name], np.float64) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """A 56-px-crop LLaVA-OneVision and 24 conversations about a colour."""
    root = tmp_path_factory.mktemp("colours")
    write_checkpoint(root / "model", "tiny-56")
    lines = []
    for i in range(24):
        name = list(COLOURS)[i % 2]
        colour_image(name, i).save(root / f"img{i}.png")
        if i % 3:
            lines.append({"images": [f"img{i}.png"], "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"},
                {"from": "gpt", "value": f"The square is {name}."}]})
        else:  # the OpenAI form
            lines.append({"messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"img{i}.png"}},
                                             {"type": "text", "text": "What colour is the square?"}]},
                {"role": "assistant", "content": f"The square is {name}."}]})
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def recipe(root, out, **kw):
    r = {"model": str(root / "model"), "data": {"train": str(root / "train.jsonl")}, "output": str(out),
         "method": "lora", "steps": 6, "micro_batch_size": 1, "grad_accumulation": 2, "seed": 0,
         "lora": {"targets": [r"language_model\..*(q|v|o|gate|up|down)_proj", "multi_modal_projector",
                              "vision_tower"], "rank": 8, "scale": 10.0},
         "optim": {"lr": 1e-3, "warmup_steps": 2}}
    r.update(kw)
    return r


def test_loss_mask_covers_exactly_the_answers(colour_data):
    _, processor = load(str(colour_data / "model"))
    data = ConversationFile(colour_data / "train.jsonl", shuffle=False)
    conversation = data.read(1)
    conversation.messages += [{"role": "user", "content": "And again?"}, {"role": "assistant", "content": "Still blue."}]
    inputs, mask = tokenize(processor, conversation)
    assert len(mask) == len(inputs.input_ids)
    trained = processor.tokenizer.decode(inputs.input_ids[mask].tolist())
    assert trained == "The square is blue.<|im_end|>Still blue.<|im_end|>"
    assert not mask[inputs.input_ids == processor.image_token_id].any()


def test_bad_data_is_reported(colour_data, tmp_path):
    shutil.copy(colour_data / "img0.png", tmp_path / "a.png")
    cases = {
        "missing.jsonl": ({"images": ["nope.png"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}, FileNotFoundError, "nope.png"),
        "count.jsonl": ({"images": ["a.png"], "conversations": [
            {"from": "human", "value": "<image><image>\nQ"}, {"from": "gpt", "value": "A"}]}, ValueError, "2 image placeholder"),
        "no_answer.jsonl": ({"conversations": [{"from": "human", "value": "Q"}]}, ValueError, "assistant turn"),
    }
    for name, (record, error, match) in cases.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=rf"{name}, line 1: .*{match}"):  # when the file is opened
            ConversationFile(tmp_path / name)


def test_too_long_samples_skip_with_count_or_fail(colour_data, tmp_path):
    _, processor = load(str(colour_data / "model"))
    shutil.copy(colour_data / "img0.png", tmp_path / "a.png")
    records = [{"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\n" + "long " * 200},
                                                       {"from": "gpt", "value": "A"}]},
               {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\nshort"},
                                                       {"from": "gpt", "value": "B"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = ConversationFile(tmp_path / "d.jsonl", shuffle=False)
    limit = len(tokenize(processor, data.read(1))[0].input_ids)
    stats = {}
    with pytest.warns(UserWarning, match="skipped"):
        batch, position = next(finetune.sample_batches(data, processor, 1, limit, "skip", stats=stats))
    assert stats["skipped"] == 1 and position == {"epoch": 0, "index": 2}
    assert processor.tokenizer.decode(batch[0][0].input_ids[batch[0][1]].tolist()) == "B<|im_end|>"
    with pytest.raises(ValueError, match="exceeds the"):
        next(finetune.sample_batches(data, processor, 1, limit, "error"))


@pytest.mark.slow
def test_lora_learns_the_colours_and_adapters_reload(colour_data, tmp_path):
    out = tmp_path / "run"
    result = run(recipe(colour_data, out, steps=240, optim={"lr": 1e-3, "warmup_steps": 5}), progress=False)
    losses = result["losses"]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    model, processor = load(str(colour_data / "model"), adapter_path=str(out / "adapters"))
    for i, name in enumerate(["red", "blue", "blue", "red"]):
        answer = generate(model, processor, "What colour is the square?", images=[colour_image(name, 100 + i)],
                          max_tokens=8).text
        assert answer == f"The square is {name}.", answer
    base, _ = load(str(colour_data / "model"))
    before = generate(base, processor, "What colour is the square?", images=[colour_image("red", 7)], max_tokens=8).text
    assert before != "The square is red."

    fused_dir = tmp_path / "fused"
    fuse(str(colour_data / "model"), str(out / "adapters"), str(fused_dir))
    fused, _ = load(str(fused_dir))
    inputs = processor(processor.format_prompt("What colour is the square?", 1), images=[colour_image("blue", 5)])
    a = model(mx.array(inputs.input_ids)[None], input_embeddings=model.get_input_embeddings(inputs)[0])
    b = fused(mx.array(inputs.input_ids)[None], input_embeddings=fused.get_input_embeddings(inputs)[0])
    assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))


def test_resume_after_interruption_is_exact(colour_data, tmp_path):
    full = run(recipe(colour_data, tmp_path / "full", checkpoint_every=3), progress=False)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe(colour_data, tmp_path / "cut", checkpoint_every=3), progress=False, on_step=interrupt)
    resumed = run(recipe(colour_data, tmp_path / "cut", checkpoint_every=3), resume="auto", progress=False)
    assert resumed["losses"] == full["losses"][3:]
    a = mx.load(str(tmp_path / "full/adapters/adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut/adapters/adapters.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_full_and_dora_methods_train(colour_data, tmp_path):
    full = run(recipe(colour_data, tmp_path / "full", method="full", steps=3, freeze=["vision_tower"],
                      optim={"lr": 1e-3, "lr_multipliers": {"multi_modal_projector": 0.2}}), progress=False)
    assert (tmp_path / "full/model/model.safetensors").exists() and len(full["losses"]) == 3
    base, _ = load(str(colour_data / "model"))
    tuned, _ = load(str(tmp_path / "full/model"))
    b, t = dict(tree_flatten(base.parameters())), dict(tree_flatten(tuned.parameters()))
    assert all(np.array_equal(np.array(b[k]), np.array(t[k])) for k in b if k.startswith("vision_tower."))
    assert not np.array_equal(np.array(b["language_model.lm_head.weight"]), np.array(t["language_model.lm_head.weight"]))
    dora = run(recipe(colour_data, tmp_path / "dora", method="dora", steps=2), progress=False)
    assert len(dora["losses"]) == 2
    load(str(colour_data / "model"), adapter_path=str(tmp_path / "dora/adapters"))


def test_padded_batch_loss_equals_token_weighted_singles(tmp_path):
    """Right padding plus per-sample M-RoPE positions (Qwen2-VL)."""
    model_dir = write_checkpoint(tmp_path / "qwen", "qwen2-vl-tiny")
    model, processor = load(str(model_dir))
    convs = []
    for i, (h, w) in enumerate([(60, 90), (140, 56), (30, 30)]):
        colour_image("red", i, h, w).save(tmp_path / f"{i}.png")
        convs.append(finetune.parse_record({"images": [f"{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nColour?" + " more" * i}, {"from": "gpt", "value": "Red" * (i + 1)}]},
            tmp_path))
    samples = [tokenize(processor, c) for c in convs]
    batch_loss, batch_count = answer_loss(model, samples)
    singles = [answer_loss(model, [s]) for s in samples]
    weighted = sum(l.item() * n.item() for l, n in singles) / sum(n.item() for _, n in singles)
    assert batch_count.item() == sum(n.item() for _, n in singles)
    assert abs(batch_loss.item() - weighted) <= 1e-5


def test_head_on_answer_rows_gives_the_full_loss_and_gradients(tmp_path):
    """The output head run on the target positions only (`head_on_rows`) gives
    the loss, count and LoRA gradients of the whole sequence's logits, on a
    padded batch and on a packed row (Qwen2-VL, M-RoPE)."""
    import mlx.nn as nn

    from mlx_vlm_native.adapters import adapt_linears

    model_dir = write_checkpoint(tmp_path / "qwen", "qwen2-vl-tiny")
    model, processor = load(str(model_dir))
    adapt_linears(model, [r"language_model\..*(q|v|down)_proj"], rank=4, scale=2.0)
    rng = np.random.default_rng(0)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, 0.1, m.lora_b.shape).astype(np.float32))
    finetune.set_trainable(model, "lora")
    samples = []
    for i, (h, w) in enumerate([(60, 90), (30, 30)]):
        colour_image("blue", i, h, w).save(tmp_path / f"{i}.png")
        samples.append(tokenize(processor, finetune.parse_record({"images": [f"{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nColour?" + " more" * i},
            {"from": "gpt", "value": "Blue" * (i + 2)}]}, tmp_path)))
    assert finetune.head_language_model(model) is not None
    for batch, forward in ((samples, finetune.forward_batch), (finetune.PackedBatch([samples]), finetune.forward_packed)):
        logits, _, _ = forward(model, batch, targets_only=True)
        assert logits.shape[1] == sum(int(m[1:].sum()) for _, m in samples)  # only the answer positions

        def full(m, b, forward=forward):
            return finetune.masked_cross_entropy(*forward(m, b))[0]

        rows_loss, rows_grad = nn.value_and_grad(model, lambda m, b: answer_loss(m, b)[0])(model, batch)
        full_loss, full_grad = nn.value_and_grad(model, full)(model, batch)
        assert abs(rows_loss.item() - full_loss.item()) <= 1e-5
        assert answer_loss(model, batch)[1].item() == finetune.masked_cross_entropy(*forward(model, batch))[1].item()
        for (k, a), (_, b) in zip(tree_flatten(rows_grad), tree_flatten(full_grad)):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-4, err_msg=k)
    assert type(model.language_model.model).__name__ == "Qwen2Model"  # the head is whole again after


@pytest.mark.slow
def test_two_process_ring_equals_one_process(colour_data, tmp_path):
    """mlx.launch, ring backend on localhost: 2 ranks x 1 micro-batch equals
    1 process x 2 accumulated micro-batches (fp32, <= 1e-5)."""
    launcher = shutil.which("mlx.launch") or os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    base = recipe(colour_data, tmp_path / "one", steps=3, grad_accumulation=2)
    (tmp_path / "one.json").write_text(json.dumps({"family": "finetune", **base}))
    two = recipe(colour_data, tmp_path / "two", steps=3, grad_accumulation=1)
    (tmp_path / "two.json").write_text(json.dumps({"family": "finetune", **two}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mlx_vlm_native.train", "--recipe", str(tmp_path / "one.json"),
                    "--no-progress"], check=True, env=env, timeout=600, capture_output=True)
    r = subprocess.run([launcher, "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--",
                        sys.executable, "-m", "mlx_vlm_native.train", "--recipe", str(tmp_path / "two.json"),
                        "--no-progress"], env=env, timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a = mx.load(str(tmp_path / "one/adapters/adapters.safetensors"))
    b = mx.load(str(tmp_path / "two/adapters/adapters.safetensors"))
    assert a.keys() == b.keys()
    assert max(np.abs(np.array(a[k]) - np.array(b[k])).max() for k in a) <= 1e-5


def test_qlora_on_a_quantized_base_and_fuse_keeps_it_quantized(colour_data, tmp_path):
    from mlx_vlm_native.convert import convert

    q4 = convert(str(colour_data / "model"), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    result = run(recipe(colour_data, tmp_path / "run", model=str(q4), steps=3,
                        lora={"targets": [r"language_model\..*(q|v)_proj"], "rank": 4, "scale": 10.0}),
                 progress=False)
    assert len(result["losses"]) == 3
    fused = fuse(str(q4), str(tmp_path / "run/adapters"), str(tmp_path / "fused"))
    assert "quantization" in json.loads((fused / "config.json").read_text())
    model, processor = load(str(fused))
    assert generate(model, processor, "Colour?", images=[colour_image("red", 1)], max_tokens=3).generation_tokens >= 1


def test_eval_loss_on_held_out_split(colour_data, tmp_path):
    result = run(recipe(colour_data, tmp_path / "run", steps=4, eval_every=2, eval_samples=4,
                        data={"train": str(colour_data / "train.jsonl"), "valid_fraction": 0.25}), progress=False)
    assert [step for step, _ in result["evals"]] == [2, 4]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in result["evals"])


def test_sigint_writes_a_checkpoint_and_resume_continues(colour_data, tmp_path):
    import signal
    import threading
    import time

    r = {"family": "finetune", **recipe(colour_data, tmp_path / "run", steps=100000, grad_accumulation=1)}
    (tmp_path / "r.json").write_text(json.dumps(r))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_vlm_native.train", "--recipe", str(tmp_path / "r.json")],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []  # tqdm redraws with "\r", so read chunks rather than lines
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(32), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and "loss=" not in "".join(seen):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(seen)[-2000:]
    assert "stopped at step" in out and "checkpoint " in out and "continue with --resume" in out
    latest = (tmp_path / "run/checkpoints/latest").read_text().strip()
    state = json.loads((tmp_path / "run/checkpoints" / latest / "state.json").read_text())
    assert state["step"] >= 1
    r["steps"] = state["step"] + 1
    (tmp_path / "r.json").write_text(json.dumps(r))
    done = subprocess.run([sys.executable, "-m", "mlx_vlm_native.train", "--recipe", str(tmp_path / "r.json"),
                           "--resume", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"step {state['step'] + 1}" in done.stdout


GOOD = {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}
BAD_LINES = [
    (json.dumps({"conversations": "x"}).encode(), "'conversations' must be a non-empty list"),
    (json.dumps({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]}).encode(),
     r"conversations\[0\]\.value must be a string, got int"),
    (b'{"conversations": [{"from": "human", "value": "\xff\xfe"}]}', "invalid UTF-8 at byte"),
    (json.dumps({"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}).encode(),
     "turn 1 is 'assistant' where 'user' was due"),
    (json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                              {"role": "system", "content": "S"}]}).encode(), "turn 3 is 'system'"),
    (json.dumps({"messages": [{"role": "robot", "content": "Q"}]}).encode(), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": {"text": "Q"}}]}).encode(),
     "content must be a string or a list of parts"),
    (json.dumps([1, 2]).encode(), "a record must be a JSON object, got list"),
    (b"{not json", "not valid JSON"),
]


@pytest.mark.parametrize("line, words", BAD_LINES)
def test_every_record_is_checked_up_front_naming_its_line(colour_data, tmp_path, line, words):
    shutil.copy(colour_data / "img0.png", tmp_path / "a.png")
    good = json.dumps(GOOD).encode()
    (tmp_path / "d.jsonl").write_bytes(b"\n".join([good, b"", good, line, good]) + b"\n")
    with pytest.raises(finetune.RecordError, match=rf"d\.jsonl, line 4: .*{words}"):
        ConversationFile(tmp_path / "d.jsonl")


def test_bad_records_can_be_skipped_and_counted(colour_data, tmp_path):
    shutil.copy(colour_data / "img0.png", tmp_path / "a.png")
    good = json.dumps(GOOD).encode()
    (tmp_path / "d.jsonl").write_bytes(b"\n".join([good] + [line for line, _ in BAD_LINES] + [good]) + b"\n")
    with pytest.warns(UserWarning, match=r"line \d+: .*skipped"):
        data = ConversationFile(tmp_path / "d.jsonl", shuffle=False, on_bad_record="skip")
    assert data.skipped == len(BAD_LINES) and len(data) == 2
    assert data.lines.tolist() == [1, len(BAD_LINES) + 2]
    assert data.read(1).messages[-1]["content"] == "A"
    with pytest.raises(ValueError, match="on_bad_record must be"):
        ConversationFile(tmp_path / "d.jsonl", on_bad_record="ignore")


def test_a_failing_run_checkpoints_before_it_exits(colour_data, tmp_path, monkeypatch):
    from mlx_vlm_native.training.checkpoint import latest_checkpoint

    calls, original = [], finetune.tokenize

    def failing(processor, conversation, *rest):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the disk went away")
        return original(processor, conversation, *rest)

    monkeypatch.setattr(finetune, "tokenize", failing)
    r = recipe(colour_data, tmp_path / "run", steps=6, grad_accumulation=1, checkpoint_every=100)
    with pytest.raises(RuntimeError, match="the disk went away"):
        run(r, progress=False)
    saved = latest_checkpoint(tmp_path / "run/checkpoints")
    assert saved is not None and json.loads((saved / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(finetune, "tokenize", original)
    resumed = run(r, resume="auto", progress=False)  # goes on from step 3
    assert resumed["step"] == 6 and len(resumed["losses"]) == 3
