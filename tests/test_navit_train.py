"""NaViT training task: packed batches, exact token dropping, packed loss equal
to the per-image loss, the loss falling, inference at unseen resolutions, and a
CLI run interrupted and resumed bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from mlx_vlm_native.models.navit import Model
from mlx_vlm_native.native.packing import Pack
from mlx_vlm_native.training import navit
from mlx_vlm_native.training.navit import batch_stream, classification_loss, drop_rate
from train.navit.make_shapes_data import classes, write_split

REPO = Path(__file__).resolve().parents[1]
COLOURS = classes("colour")


@pytest.fixture(scope="module", autouse=True)
def shapes_data(tmp_path_factory):
    """Lone-shape pictures with colour labels (train/navit/make_shapes_data.py), read in
    file order: 400 to train on, 48 held out."""
    global DATA
    out = tmp_path_factory.mktemp("navit_shapes")
    DATA = {"jsonl": str(write_split(out, "train", 400, 0)), "valid": str(write_split(out, "valid", 48, 10_000)),
            "shuffle": False}
    return DATA


def tiny_recipe(out, steps=4, **kw):
    r = {"family": "navit", "data": dict(DATA), "classes": COLOURS,
         "model": {"patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "position_table": 8},
         "image": {"min_side": 32, "max_side": 64},
         "batching": {"mode": "packed", "seq_len": 48, "sequences": 2},
         "token_drop": {"max_rate": 0.5, "beta": [2.0, 2.0]},
         "steps": steps, "optim": {"lr": 3e-3, "warmup_steps": 2}, "seed": 0, "output": str(out)}
    r.update(kw)
    return r


def stream_of(recipe, position=None, start=0, stats=None):
    data = navit.open_data(recipe["data"], recipe.get("seed", 0), recipe.get("classes"))
    args = navit.model_args(recipe, data.classes)
    return data, args, batch_stream(recipe, data, args, position, start, stats)


def segments(batch):
    lengths = np.diff(batch.pack.cu_seqlens)
    return [(int(n), int(label)) for n, label in zip(lengths, batch.labels)]


def test_rows_are_packed_in_order_and_padded_at_their_end_only(tmp_path):
    stats = {}
    recipe = tiny_recipe(tmp_path, token_drop=None)
    data, _, stream = stream_of(recipe, stats=stats)
    batches = [next(stream) for _ in range(5)]
    seen = 0
    for batch, position in batches:
        segs = segments(batch)
        # two rows of exactly 48 tokens; a padding segment (label -1) only closes a row
        total, row_ends = 0, []
        for n, label in segs:
            total += n
            if label < 0:
                assert total % 48 == 0
            row_ends.append(total)
        assert total == 2 * 48 and batch.tokens + batch.padding == total
        images = [label for _, label in segs if label >= 0]
        seen += len(images)
        assert position == {"epoch": 0, "index": seen}  # none lost, none repeated
    assert stats["images"] == seen and stats["padding"] == sum(b.padding for b, _ in batches)
    # every image at a sampled resolution, aspect kept: h*w tokens of its own grid
    assert all(g[1] * g[2] == n for b, _ in batches for g, (n, l) in zip(b.pack.grids, segments(b)) if l >= 0)


def test_drop_counts_are_exact(tmp_path):
    # one row, so images keep data order; native size (no sampling) so the full count is known
    recipe = tiny_recipe(tmp_path, image={"max_side": 64}, batching={"seq_len": 64, "sequences": 1},
                         token_drop={"rate": 0.5})
    data, _, stream = stream_of(recipe)
    n = 0
    for _ in range(3):
        batch, _ = next(stream)
        for length, label in segments(batch):
            if label < 0:
                continue
            im = data.get(n, ()).image
            scale = 64 / max(im.size) if max(im.size) > 64 else 1.0
            h = max(16, round(im.height * scale / 16) * 16) // 16
            w = max(16, round(im.width * scale / 16) * 16) // 16
            assert length == max(1, int(round(h * w * 0.5))), (n, length, h, w)
            n += 1
    # rates drawn per image from max_rate * Beta(2, 2), and a linear schedule
    rng = np.random.default_rng(0)
    rates = [drop_rate({"max_rate": 0.5, "beta": [2, 2]}, rng, 0.0) for _ in range(500)]
    assert 0 <= min(rates) and max(rates) < 0.5 and len(set(rates)) == 500
    sched = {"rate": 0.5, "schedule": {"to": 0.1}}
    assert drop_rate(sched, rng, 0.0) == 0.5 and drop_rate(sched, rng, 1.0) == pytest.approx(0.1)
    assert drop_rate(sched, rng, 0.5) == pytest.approx(0.3)


def test_packed_loss_equals_the_per_image_loss(tmp_path):
    recipe = tiny_recipe(tmp_path)
    data, args, stream = stream_of(recipe)
    mx.random.seed(0)
    model = Model(args)
    batch, _ = next(stream)
    packed_loss, count = classification_loss(model, batch)
    logits = np.array(model(batch.pack))
    alone, alone_logits = [], []
    cu = batch.pack.cu_seqlens
    for s, label in enumerate(batch.labels):
        if label < 0:
            continue
        a, b = cu[s], cu[s + 1]
        one = Pack(batch.pack.patches[a:b], [batch.pack.grids[s]], np.array([0, b - a], np.int32),
                   batch.pack.positions[a:b])
        single = navit.Batch(one, np.array([label]), 1, b - a, 0)
        alone.append(classification_loss(model, single)[0].item())
        alone_logits.append(np.array(model(one))[0])
        assert np.abs(alone_logits[-1] - logits[s]).max() <= 1e-5
    assert count.item() == len(alone) >= 3
    assert abs(packed_loss.item() - np.mean(alone)) <= 1e-5


def test_loss_falls_and_classifies_at_unseen_resolutions(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", steps=50, optim={"lr": 1e-2, "warmup_steps": 4},
                         batching={"seq_len": 96, "sequences": 2}, token_drop=None,
                         model={"patch_size": 16, "hidden_size": 48, "num_layers": 2, "num_heads": 2,
                                "position_table": 8},
                         eval={"count": 48, "sides": [96, 128]})
    result = navit.run(recipe, progress=False)
    losses = result["losses"]
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:4]), losses
    curve = json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"]
    assert set(curve) == {"native", "96", "128"}
    # trained on long sides 32..64 only; 8 colours, chance 0.125
    assert curve["96"] > 0.3 and curve["128"] > 0.3, curve
    model = navit.load_model(tmp_path / "run" / "model")
    assert model.args.classes == COLOURS
    im = navit.LabelledFiles({"jsonl": DATA["valid"], "shuffle": False}, classes=COLOURS).get(0, ())
    for kw in ({}, {"long_side": 200}, {"side": 40}):
        assert navit.predict(model, [im.image, im.image.resize((30, 90))], **kw).shape == (2,)


def test_baseline_batchings(tmp_path):
    padded = tiny_recipe(tmp_path, batching={"mode": "padded", "images": 4}, token_drop=None)
    batch, position = next(stream_of(padded)[2])
    segs = segments(batch)
    lengths = [n for n, label in segs if label >= 0]
    assert len(lengths) == 4 and position == {"epoch": 0, "index": 4}
    assert batch.tokens + batch.padding == 4 * max(lengths)
    square = tiny_recipe(tmp_path, batching={"mode": "square", "images": 3, "side": 48}, token_drop=None)
    batch, _ = next(stream_of(square)[2])
    assert batch.padding == 0 and all(g == (1, 3, 3) for g in batch.pack.grids)


def test_labelled_files_jsonl_and_folder(tmp_path):
    for i, (name, colour) in enumerate([("red", (220, 20, 20)), ("blue", (20, 20, 220))] * 3):
        (tmp_path / "by_class" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 8 * i, 30), colour).save(tmp_path / "by_class" / name / f"{i}.png")
    lines = [{"image": f"by_class/{p.parent.name}/{p.name}", "label": p.parent.name}
             for p in sorted((tmp_path / "by_class").glob("*/*.png"))]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    from mlx_vlm_native.train import apply_overrides, configure_parser

    for path in ("by_class", "labels.jsonl"):  # `--data` takes either
        args = configure_parser().parse_args(["--recipe", "r.json", "--data", str(tmp_path / path)])
        assert apply_overrides({}, args)["data"] == {"folder" if path == "by_class" else "jsonl": str(tmp_path / path)}
    for data in ({"folder": str(tmp_path / "by_class")}, {"jsonl": str(tmp_path / "labels.jsonl")}):
        result = navit.run(tiny_recipe(tmp_path / "out", steps=2, data=data, classes=None), progress=False)
        assert len(result["losses"]) == 2 and result["model"].args.classes == ["blue", "red"]
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line needs 'image' and 'label'"):
        navit.run(tiny_recipe(tmp_path / "o2", data={"jsonl": str(tmp_path / "bad.jsonl")}), progress=False)
    (tmp_path / "missing.jsonl").write_text('{"image": "nope.png", "label": "red"}\n')
    with pytest.raises(FileNotFoundError, match="missing.jsonl:1: image not found"):
        navit.run(tiny_recipe(tmp_path / "o3", data={"jsonl": str(tmp_path / "missing.jsonl")}), progress=False)
    with pytest.raises(ValueError, match="not one of the recipe's classes"):
        navit.run(tiny_recipe(tmp_path / "o4", data={"jsonl": str(tmp_path / "labels.jsonl")}, classes=["red"]),
                  progress=False)


def test_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown batching mode 'ragged'"):
        navit.run(tiny_recipe(tmp_path, batching={"mode": "ragged"}), progress=False)
    with pytest.raises(ValueError, match="seq_len 8 is below the 16 tokens"):
        navit.run(tiny_recipe(tmp_path, batching={"seq_len": 8}), progress=False)
    with pytest.raises(ValueError, match="unknown shapes label 'size'"):
        write_split(tmp_path / "data", "train", 1, 0, label="size")
    with pytest.raises(ValueError, match=r"data needs 'jsonl' \(\+ 'images'\) or 'folder', got \['shapes'\]"):
        navit.run(tiny_recipe(tmp_path, data={"shapes": {"label": "colour"}}), progress=False)


def test_cli_run_interrupted_and_resumed_is_bit_identical(tmp_path):
    steps = 6
    full = navit.run(tiny_recipe(tmp_path / "full", steps), progress=False)
    recipe = tiny_recipe(tmp_path / "cut", steps, checkpoint_every=3)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))

    class Interrupted(Exception):
        pass

    def interrupt(step, loss):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        navit.run(recipe, progress=False, on_step=interrupt)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mlx_vlm_native", "train", "--recipe", str(tmp_path / "recipe.json"),
                           "--resume", "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "saved to" in proc.stdout
    want = dict(tree_flatten(full["model"].parameters()))
    got = dict(tree_flatten(navit.load_model(tmp_path / "cut" / "model").parameters()))
    assert want.keys() == got.keys()
    assert all(np.array_equal(np.array(want[k]), np.array(got[k])) for k in want)
    other = navit.run(tiny_recipe(tmp_path / "other", steps, seed=1), progress=False)
    assert not all(np.array_equal(np.array(want[k]), np.array(v))
                   for k, v in tree_flatten(other["model"].parameters()))


def test_shipped_recipe_builds_its_batches():
    from mlx_vlm_native.train import load_recipe

    recipe = load_recipe(REPO / "train/navit/shapes.json")
    assert recipe["data"] == {"jsonl": "runs/navit_shapes/data/train.jsonl", "valid": "runs/navit_shapes/data/valid.jsonl"}
    recipe["data"] = dict(DATA)  # the same pictures, written by make_shapes_data.py under tmp
    data, args, stream = stream_of(recipe)
    batch, _ = next(stream)
    rows = recipe["batching"]["sequences"] * recipe["batching"]["seq_len"]
    assert batch.tokens + batch.padding == rows and batch.padding < 0.2 * rows
    assert args.classes == COLOURS and args.num_classes == 8
    assert min(recipe["eval"]["sides"]) < recipe["image"]["min_side"] < recipe["image"]["max_side"] < max(recipe["eval"]["sides"])
