"""EVE v1 training: teacher, decoder hidden states, patch-aligning layer,
the CE + alignment loss, the stages and a small stage-1 run.

The loss is checked end to end against an independent computation: the numpy
patch-embedding layer of test_eve.py, transformers' LlamaForCausalLM and
CLIPVisionModel on torch, and a numpy patch-aligning layer reading the
reference checkpoint's `vision_tower_compressor.*` weights.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from conftest import make_image
import test_eve
from test_eve import eve_processor, np_layernorm, np_patch_embedding_layer, np_softmax

# the session fixtures of test_eve.py, shared (built once per session)
eve_loaded = test_eve.eve_loaded
eve_mlx_dir = test_eve.eve_mlx_dir
eve_ref_dir = test_eve.eve_ref_dir
eve_ref_weights = test_eve.eve_ref_weights
teacher_dir = test_eve.teacher_dir

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-4  # relative, fp32
FEATURE_TOL = 1e-4  # max abs


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from mlx_vlm_native.training.eve_align import load_teacher

    return load_teacher(teacher_dir)


@pytest.fixture(scope="module")
def torch_clip(teacher_dir):
    import torch
    from transformers import CLIPVisionModel

    torch.set_num_threads(1)
    return CLIPVisionModel.from_pretrained(teacher_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def torch_llama(eve_ref_dir, eve_ref_weights):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    cfg = json.loads((eve_ref_dir / "config.json").read_text())
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in fields}, attn_implementation="eager"))
    state = {k: torch.from_numpy(v) for k, v in eve_ref_weights.items()
             if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head")) and "inv_freq" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return model.eval()


@pytest.fixture()
def training_model(eve_mlx_dir, eve_ref_dir):
    from mlx_vlm_native import load
    from mlx_vlm_native.training import eve_align as A

    model, processor = load(str(eve_mlx_dir))
    train_model = A.EVETrainingModel(model, A.new_aligner(model, 32))
    assert A.load_aligner_weights(train_model.aligner, eve_ref_dir)
    return train_model, processor


# ------------------------------------------------------------------ oracle


def np_patch_aligner(W, states, start, grid, ratio):
    """The reference VisionCompressor on (L+1, T, D) hidden states of one sample."""
    pal = "model.vision_tower_compressor."
    L = states.shape[0] - 1
    h, w = grid
    feats = states[:, start + 1 : start + 1 + h * (w + 1)].reshape(L + 1, h, w + 1, -1)[:, :, :w]
    if ratio > 1:
        pooled = np.zeros((L + 1, h // ratio, w // ratio, feats.shape[-1]))
        for i in range(h // ratio):
            for j in range(w // ratio):
                pooled[:, i, j] = feats[:, i * ratio : (i + 1) * ratio, j * ratio : (j + 1) * ratio].mean(axis=(1, 2))
        feats = pooled
    feats = feats.reshape(L + 1, -1, feats.shape[-1]).transpose(1, 0, 2)  # (N, L+1, D)
    layers = list(range(L, -1, -4))
    v = np.stack([np_layernorm(feats[:, i], W[pal + f"norm_layer.{j}.0.weight"], W[pal + f"norm_layer.{j}.0.bias"])
                  @ W[pal + f"norm_layer.{j}.1.weight"].T for j, i in enumerate(layers)], axis=1)
    N, J, C = v.shape
    q, kv = v[:, 0].reshape(N, 8, C // 8), v[:, 1:].reshape(N, J - 1, 8, C // 8)
    attn = np_softmax(np.einsum("nhd,njhd->nhj", q, kv) * C**-0.5, -1)
    fused = np.einsum("nhj,njhd->nhd", attn, kv).reshape(N, C)
    return (feats[:, -1] @ W[pal + "input_layer.weight"].T + W[pal + "input_layer.bias"]
            + fused @ W[pal + "output_layer.weight"].T + W[pal + "output_layer.bias"])


def reference_loss(sample, W, torch_llama, torch_clip, ratio):
    """(CE sum, CE count, alignment) of one plain sample, computed without the code under test."""
    import torch

    ids = sample.input_ids
    image = np.nonzero(ids == -200)[0]
    expected_labels = np.where(np.arange(len(ids)) > image[-1], ids, -100)
    np.testing.assert_array_equal(sample.labels, expected_labels)  # loss on the caption only
    tokens, grid = np_patch_embedding_layer(W, sample.pixel_values.astype(np.float64))
    embeds = W["model.embed_tokens.weight"][np.maximum(ids, 0)].astype(np.float64)
    embeds[image] = tokens
    with torch.no_grad():
        out = torch_llama(inputs_embeds=torch.tensor(embeds[None], dtype=torch.float32), output_hidden_states=True)
        logits = out.logits[0, :-1]
        targets = torch.tensor(sample.labels[1:], dtype=torch.long)
        ce_sum = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        states = torch.stack(out.hidden_states)[:, 0].numpy().astype(np.float64)
        px = torch.tensor(sample.teacher_pixels[None, :3])
        teacher = torch_clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][0, 1:].numpy()
    pred = np_patch_aligner(W, states, image[0], grid, ratio)
    p = 14
    g = sample.teacher_pixels.shape[1] // p
    valid = np.array([[sample.teacher_pixels[3, i * p : (i + 1) * p, j * p : (j + 1) * p].min() == 1
                       for j in range(g)] for i in range(g)]).reshape(-1)
    target = teacher[valid]
    cos = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
    return ce_sum, int((sample.labels[1:] != -100).sum()), 1 - cos.mean(), states, pred


# ------------------------------------------------------------------- tests


def test_clip_teacher_matches_transformers(teacher, torch_clip, eve_loaded):
    import torch

    _, processor = eve_loaded
    px = np.stack([processor.image_processor.teacher_pixels(make_image(60, 100, seed=s)) for s in (1, 2)])
    assert px.shape == (2, 4, 56, 56) and np.nonzero(px[0, 3].any(axis=1))[0].size == 42
    with torch.no_grad():
        ref = torch_clip(pixel_values=torch.tensor(px[:, :3]), output_hidden_states=True).hidden_states[-2][:, 1:]
    got = np.array(teacher.features(px))
    assert got.shape == (2, 16, 32)
    assert np.abs(got - ref.numpy()).max() < FEATURE_TOL
    assert teacher.valid_patches(px)[0].tolist() == [True] * 12 + [False] * 4


def test_teacher_inside_a_reference_checkpoint(teacher, eve_ref_dir, eve_mlx_dir, eve_loaded):
    from convert.write_eve_release import TINY_CLIP
    from mlx_vlm_native.training.eve_align import load_teacher

    inside = load_teacher(eve_ref_dir, TINY_CLIP)  # model.vision_clip.backbone.vision_model.*
    px = eve_loaded[1].image_processor.teacher_pixels(make_image(60, 100))[None]
    np.testing.assert_array_equal(np.array(inside.features(px)), np.array(teacher.features(px)))
    with pytest.raises(ValueError, match="no 'vision_clip.backbone.vision_model"):
        load_teacher(eve_mlx_dir)


def test_siglip_teacher_matches_transformers(tmp_path):
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from mlx_vlm_native.training.eve_align import load_teacher

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14, attn_implementation="eager")
    ref = SiglipVisionModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path)
    px = np.random.default_rng(0).standard_normal((1, 4, 56, 56)).astype(np.float32)
    with torch.no_grad():
        expected = ref(pixel_values=torch.tensor(px[:, :3]), output_hidden_states=True).hidden_states[-2]
    assert not teacher.has_cls and teacher.image_mean == (0.5, 0.5, 0.5)
    assert np.abs(np.array(teacher.features(px)) - expected.numpy()).max() < FEATURE_TOL


@pytest.mark.parametrize("image_size, ratio", [(112, 1), (224, 2)])
def test_loss_matches_independent_computation(image_size, ratio, training_model, teacher, eve_ref_weights,
                                              torch_llama, torch_clip):
    from mlx_vlm_native.training import eve_align as A

    train_model, processor = training_model
    processor = eve_processor(processor, image_size)
    assert A.grid_ratio(train_model.eve, processor, teacher) == ratio
    batch = [A.plain_sample(processor, make_image(60, 100, seed=4), "a photo of a red circle.", teacher),
             A.plain_sample(processor, make_image(130, 70, seed=5), "a blue square on the left.", teacher)]
    assert len(batch[0].input_ids) != len(batch[1].input_ids)  # padding is exercised
    refs = [reference_loss(s, eve_ref_weights, torch_llama, torch_clip, ratio) for s in batch]
    ce_ref = sum(r[0] for r in refs) / sum(r[1] for r in refs)
    align_ref = float(np.mean([r[2] for r in refs]))

    total, (ce, align) = A.eve_loss(train_model, batch, A.teacher_targets(teacher, batch), ratio, 0.5)
    assert abs(ce.item() - ce_ref) < LOSS_TOL * ce_ref
    assert abs(align.item() - align_ref) < LOSS_TOL * align_ref
    assert abs(total.item() - (ce_ref + 0.5 * align_ref)) < LOSS_TOL * (ce_ref + align_ref)

    # the aligning layer's output and the decoder's hidden states on their own
    s = batch[0]
    x = train_model.eve.get_input_embeddings(s.inputs())[0]
    _, states = train_model.eve.logits_and_hidden_states(x)
    got_states = np.stack([np.array(h[0]) for h in states])
    assert np.abs(got_states - refs[0][3]).max() < FEATURE_TOL * np.abs(refs[0][3]).max()
    start = int(np.argmax(s.input_ids == -200))
    feats = A.image_grid_features(states, 0, start, s.grid, ratio, train_model.aligner.layer_indices)
    pred = np.array(train_model.aligner(feats))
    assert pred.shape == refs[0][4].shape == ((s.grid[0] // ratio) * (s.grid[1] // ratio), 32)
    assert np.abs(pred - refs[0][4]).max() < FEATURE_TOL * np.abs(refs[0][4]).max()


def test_aligner_oracle_catches_a_missing_split_column(training_model, eve_ref_weights):
    """Seeded bug: keeping the <SPL> column instead of dropping it must show."""
    from mlx_vlm_native.training import eve_align as A

    train_model, _ = training_model
    h, w = 3, 4
    rng = np.random.default_rng(0)
    states = rng.standard_normal((9, 1 + 1 + h * (w + 1) + 2, 64)).astype(np.float32)
    feats = A.image_grid_features([mx.array(s[None]) for s in states], 0, 1, (h, w), 1,
                                  train_model.aligner.layer_indices)
    got = np.array(train_model.aligner(feats))
    right = np_patch_aligner(eve_ref_weights, states.astype(np.float64), 1, (h, w), 1)
    assert np.abs(got - right).max() < FEATURE_TOL * np.abs(right).max()
    shifted = np_patch_aligner(eve_ref_weights, states.astype(np.float64), 0, (h, w), 1)
    assert np.abs(got - shifted).max() > 0.1


def test_sft_labels_cover_answers_only(eve_loaded, teacher):
    from mlx_vlm_native.training.eve_align import conversation_sample

    _, processor = eve_loaded
    turns = [("<image>\nWhat is it?", "A red square."), ("Where?", "On the left.")]
    s = conversation_sample(processor, make_image(60, 100), turns, teacher)
    tok = processor.tokenizer
    labelled = s.labels[s.labels != -100].tolist()
    # each answer is followed by </s> (id 2); the two answers are the only labelled spans
    assert labelled.count(2) == 2
    first, second = labelled[: labelled.index(2)], labelled[labelled.index(2) + 1 : -1]
    assert tok.decode(first).strip() == "A red square." and tok.decode(second).strip() == "On the left."
    assert (s.labels[s.input_ids == -200] == -100).all() and (s.input_ids == -200).sum() == 16


def test_stage_definitions_and_recipes(training_model):
    from mlx_vlm_native.training import eve_align as A

    train_model, _ = training_model
    names = lambda: {k for k, _ in tree_flatten(train_model.trainable_parameters())}
    all_names = {k for k, _ in tree_flatten(train_model.parameters())}
    A.apply_stage(train_model, 1)
    stage1 = names()
    assert stage1 and all(k.startswith(("eve.vision_tower.", "eve.multi_modal_projector.", "aligner.")) for k in stage1)
    assert {k for k in all_names if not k.startswith("eve.language_model.")} == stage1
    for stage in (2, 3):
        A.apply_stage(train_model, stage)
        assert names() == all_names
    with pytest.raises(ValueError, match="stages 1, 2 and 3"):
        A.apply_stage(train_model, 4)
    recipe_names = {"vision_tower": "eve.vision_tower", "mm_projector": "eve.multi_modal_projector",
                    "language_model": "eve.language_model", "aligner": "aligner"}
    expected_lr = {1: 4e-4, 2: 4e-5, 3: 2e-5}
    for stage in (1, 2, 3):
        recipe = json.loads((ROOT / "train" / "eve" / f"stage{stage}.json").read_text())
        assert recipe["stage"] == stage and recipe["align_loss_weight"] == 1.0
        assert recipe["reference"]["learning_rate"] == recipe["laptop"]["learning_rate"] == expected_lr[stage]
        covered = {recipe_names[n] for n in recipe["trainable"]}
        modules = set(A.trainable_modules(stage))
        assert covered == modules or (modules == {"eve", "aligner"} and covered >= {"eve.language_model"})
    assert json.loads((ROOT / "train/eve/stage3.json").read_text())["prompt_format"] == "vicuna_v1"


def colour_captions(n=32, seed=0):
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
    out = []
    for i in range(n):
        name = list(colours)[i % 4]
        w, h = rng.integers(50, 160, 2)
        pixels = np.clip(np.array(colours[name]) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append((Image.fromarray(pixels), f"a photo of a {name} square."))
    return out


def test_stage1_run_lowers_the_loss_and_keeps_frozen_weights(training_model, teacher):
    from mlx_vlm_native.training import eve_align as A
    from mlx_vlm_native.training import eve
    from mlx_vlm_native.training.loop import TrainConfig, make_step
    from mlx_vlm_native.training.optim import build_optimizer

    train_model, processor = training_model
    samples = [A.plain_sample(processor, img, cap, teacher) for img, cap in colour_captions()]
    before = {k: np.array(v) for k, v in tree_flatten(train_model.parameters())}
    teacher_before = {k: np.array(v) for k, v in tree_flatten(teacher.tower.parameters())}
    A.apply_stage(train_model, 1)
    steps, bs = 24, 4
    ratio = A.grid_ratio(train_model.eve, processor, teacher)
    probe = samples[:bs], A.teacher_targets(teacher, samples[:bs])

    def align_loss():
        return A.eve_loss(train_model, *probe, ratio)[1][1].item()

    align_before = align_loss()
    step = make_step(train_model, eve.batch_loss(ratio, 1.0), build_optimizer({"lr": 1e-3, "warmup_steps": 1}, steps),
                     TrainConfig(steps=steps))
    losses = []
    for i in range(steps):
        batch = [samples[(i * bs + j) % len(samples)] for j in range(bs)]
        losses.append(step([(batch, A.teacher_targets(teacher, batch))], mx.random.key(i)))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.85 * first, [round(x, 3) for x in losses]
    assert align_loss() < 0.5 * align_before
    after = {k: np.array(v) for k, v in tree_flatten(train_model.parameters())}
    for k, v in before.items():
        if k.startswith("eve.language_model."):
            assert np.array_equal(v, after[k]), f"frozen {k} changed"
        else:
            assert not np.array_equal(v, after[k]), f"trainable {k} did not change"
    for k, v in tree_flatten(teacher.tower.parameters()):
        assert np.array_equal(teacher_before[k], np.array(v)), f"teacher {k} changed"


def test_mismatched_teacher_grid_is_refused(training_model, teacher):
    from dataclasses import replace

    from mlx_vlm_native.training import eve_align as A

    train_model, processor = training_model
    wrong = eve_processor(processor, 112)
    wrong.image_processor = replace(wrong.image_processor, image_size=224, image_size_clip=112)
    with pytest.raises(ValueError, match="teacher sees 56px"):
        A.grid_ratio(train_model.eve, wrong, teacher)


def test_training_script_stage3_writes_a_loadable_folder(eve_ref_dir, tmp_path):
    """Stage 3 through the script, with the teacher read from the reference checkpoint."""
    from convert.write_eve_release import TINY_CLIP

    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    records = []
    for i, (img, cap) in enumerate(colour_captions(4)):
        img.save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": cap}]})
    records.append({"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]})
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, str(ROOT / "train/eve/train.py"), "--recipe", str(ROOT / "train/eve/stage3.json"),
         "--model", str(eve_ref_dir), "--teacher-config", str(tmp_path / "clip.json"),
         "--data", str(tmp_path / "sft.jsonl"),
         "--out", str(out), "--steps", "3", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3] and all(np.isfinite(x["loss"]) for x in log)
    from mlx_vlm_native import generate, load

    model, processor = load(str(out))
    assert generate(model, processor, "What?", images=[make_image(60, 100)], max_tokens=2).prompt_tokens > 16
    from mlx_vlm_native.training import eve_align as A

    assert A.load_aligner_weights(A.new_aligner(model, 32), out)  # the saved aligner reloads


def eve_recipe(tmp_path, name, records, **fields):
    """A stage-1 recipe on `records` (image, caption) in its own run folder."""
    from convert.write_eve_release import TINY_CLIP
    from mlx_vlm_native.train import load_recipe

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "clip.json").write_text(json.dumps(TINY_CLIP))
    lines = []
    for i, (img, cap) in enumerate(records):
        img.save(data / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": cap}))
    (data / "captions.jsonl").write_text("\n".join(lines))
    return dict(load_recipe(ROOT / "train/eve/stage1.json"), teacher_config=str(data / "clip.json"),
                data={"jsonl": str(data / "captions.jsonl")}, output=str(tmp_path / name), **fields)


def trained_weights(run: Path) -> dict:
    weights = dict(mx.load(str(run / "model.safetensors")))
    weights.update({"aligner." + k: v for k, v in mx.load(str(run / "aligner/aligner.safetensors")).items()})
    return weights


def test_eve_task_resumes_exactly(eve_ref_dir, tmp_path):
    """4 steps in one go = 2 steps, then a new run resumed from the step-2 checkpoint:
    same losses, bit-identical weights (data order, RNG key and optimizer state restored)."""
    from mlx_vlm_native.training import eve

    records = colour_captions(6)
    whole = eve_recipe(tmp_path, "whole", records, model=str(eve_ref_dir), steps=4, batch_size=2,
                       checkpoint_every=2, keep_checkpoints=0)
    first = eve.run(whole, progress=False)
    resumed = dict(whole, output=str(tmp_path / "resumed"))
    second = eve.run(resumed, resume=str(tmp_path / "whole/checkpoints/step_00000002"), progress=False)
    assert second["losses"] == first["losses"][2:]
    a, b = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    log = [json.loads(x) for x in (tmp_path / "resumed/train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [3, 4]


def test_eve_task_accumulation_equals_the_whole_batch(eve_ref_dir, tmp_path):
    """Two micro-batches of one = one batch of two, when the samples have the same
    length (the loss is a token mean per micro-batch, as in the reference)."""
    from mlx_vlm_native.training import eve

    records = [(img, "a photo of a square.") for img, _ in colour_captions(2)]
    records = [(img.resize((80, 60)), cap) for img, cap in records]
    whole = eve.run(eve_recipe(tmp_path, "whole", records, model=str(eve_ref_dir), steps=1, batch_size=2),
                    progress=False)
    micro = eve.run(eve_recipe(tmp_path, "micro", records, model=str(eve_ref_dir), steps=1, batch_size=1,
                               grad_accumulation=2), progress=False)
    assert abs(whole["losses"][0] - micro["losses"][0]) <= 1e-5
    a, b = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "micro")
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-5


def test_eve_records_are_checked_before_training(tmp_path):
    from mlx_vlm_native.training.eve import read_records

    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: a stage 1-2 record needs a \"caption\" string"):
        read_records(path, "plain")
    path.write_text('{"conversations": [{"from": "gpt", "value": "Hi."}]}\n')
    with pytest.raises(ValueError, match="line 1: conversations must alternate"):
        read_records(path, "vicuna_v1")
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: a record must be a JSON object"):
        read_records(path, "plain")


DISTRIBUTED_SCRIPT = """
import sys
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_vlm_native import load
from mlx_vlm_native.training import eve_align as A
from mlx_vlm_native.training import eve
from mlx_vlm_native.training.loop import TrainConfig, make_step
from mlx_vlm_native.training.optim import build_optimizer
sys.path.insert(0, {tests!r})
from test_eve_train import colour_captions

group = mx.distributed.init()
model, processor = load({model!r})
teacher = A.load_teacher({teacher!r})
train_model = A.EVETrainingModel(model, A.new_aligner(model, 32))  # a different init on each rank
A.broadcast_parameters(train_model)
A.apply_stage(train_model, 1)
samples = [A.plain_sample(processor, img, cap, teacher) for img, cap in colour_captions(8)]
step = make_step(train_model, eve.batch_loss(1, 1.0), build_optimizer({{"lr": 1e-3}}, 3), TrainConfig(steps=3))
for i in range(3):
    batch = samples[group.rank() * 4 + i : group.rank() * 4 + i + 2]  # different data per rank
    loss = step([(batch, A.teacher_targets(teacher, batch))], mx.random.key(i))
flat = mx.concatenate([v.reshape(-1) for _, v in tree_flatten(train_model.trainable_parameters())])
both = mx.distributed.all_gather(flat[None])
# one file per rank: the launcher interleaves the ranks' stdout
with open({out!r} + f"/rank{{group.rank()}}.txt", "w") as f:
    f.write(f"RANKS {{group.size()}} SYNCED {{bool(mx.array_equal(both[0], both[1]).item())}} LOSS {{loss}}")
"""


@pytest.mark.slow
def test_two_process_training_keeps_replicas_in_sync(eve_mlx_dir, teacher_dir, tmp_path):
    """The aligner's random init is broadcast from rank 0 and gradients are
    averaged over `mx.distributed`: two ranks fed different batches end with
    bit-identical weights."""
    import shutil

    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    script = tmp_path / "dist.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(tests=str(ROOT / "tests"), model=str(eve_mlx_dir),
                                                teacher=str(teacher_dir), out=str(tmp_path)))
    r = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
    assert all(x.startswith("RANKS 2 SYNCED True") for x in lines), lines
    assert lines[0].split("LOSS")[1] == lines[1].split("LOSS")[1]  # the logged loss is the group mean


@pytest.mark.parametrize("tower, ratio, max_tokens", [
    ("openai/eve-patch14-anypixel-672", 1, 1 + 24 * 25),
    ("openai/eve-patch14-anypixel-1344", 2, 1 + 48 * 49),
])
def test_released_geometries(tower, ratio, max_tokens, eve_loaded):
    """Without a preprocessor json the canvas comes from the tower name; the
    HD model's 48x48 grid pools 2x2 onto the 24x24 CLIP-L/336 grid."""
    from mlx_vlm_native.training import eve_align as A
    from mlx_vlm_native.processors.eve import EVEImageProcessor, EVEProcessor

    model, processor = eve_loaded
    ip = EVEImageProcessor.from_dict({}, tower)
    clip_l = A.Teacher(None, 336, 14, (0.5,) * 3, (0.5,) * 3, True)
    assert A.grid_ratio(model, EVEProcessor(ip, processor.tokenizer), clip_l) == ratio
    assert ip.num_tokens((1000, 1000)) == max_tokens
