"""Stage 1 of the default model: the ViT learns to see with the generator's exact
supervision, then a linear probe on its frozen tokens measures what it sees.

Every picture is generated on the fly (`shapes.random_scene` + `render`, seeded by
the step, so a resumed run sees the same batches). Each of the ViT's grid tokens
gets the labels of the object drawn over it: colour, shape and layout cell (or
"none"), the word when it lies on the printed word, and the picture's object count
from the mean token. Linear heads on the tokens read them; the loss is their mean
cross-entropy, object tokens weighted up. A curriculum starts with at most two
objects and one-shape pictures, then the full mix.

    python train/default_model/encoder.py --out runs/enc --steps 1500   # resumable
    probe(...)  # linear probe on frozen tokens: per-object colour/shape/cell, word, count
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_vlm_native.models.openvision import IMAGENET_MEAN, IMAGENET_STD, VisionConfig, VisionTransformer
from mlx_vlm_native.processors.image import resize_pixels

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: train/shapes_world.py
from train import shapes_world as shapes  # noqa: E402

VISION = {"image_size": 128, "patch_size": 16, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0,
          "stem_channels": [16, 32, 64, 128]}
COLOURS, SHAPES, WORDS = list(shapes.COLOURS), list(shapes.SHAPES), list(shapes.WORDS)
HEADS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "cell": 10, "word": len(WORDS) + 1}
WEIGHTS = {"colour": 1.0, "shape": 2.0, "cell": 1.0, "word": 1.0, "object_shape": 2.0}  # shape: the slowest


def object_region(scene: shapes.Scene, item: shapes.Item, grid: int) -> np.ndarray:
    """The tokens (of a grid x grid picture stretched to a square) an object covers:
    those whose centre is inside its box, and always the one holding its centre."""
    ys, xs = (np.mgrid[:grid, :grid] + 0.5) / grid
    tx, ty = xs.ravel() * scene.width, ys.ravel() * scene.height
    cx, cy, r = item.box
    cover = (np.abs(tx - cx) <= r) & (np.abs(ty - cy) <= r)
    cover[int(min(cy / scene.height, 0.999) * grid) * grid + int(min(cx / scene.width, 0.999) * grid)] = True
    return cover


def object_pooling(scene: shapes.Scene, grid: int) -> np.ndarray:
    """(MAX_OBJECTS, grid*grid) weights averaging each object's tokens (zero rows pad)."""
    out = np.zeros((shapes.MAX_OBJECTS, grid * grid), np.float32)
    for n, item in enumerate(scene.items):
        cover = object_region(scene, item, grid)
        out[n, cover] = 1.0 / cover.sum()
    return out


def token_labels(scene: shapes.Scene, grid: int) -> dict:
    """Per-token targets (0 = none) for a picture stretched to a grid x grid square,
    and per-object shape targets (-1 = no object) for the object-pooled head."""
    ys, xs = (np.mgrid[:grid, :grid] + 0.5) / grid
    tx, ty = xs.ravel() * scene.width, ys.ravel() * scene.height
    out = {k: np.zeros(grid * grid, np.int32) for k in HEADS}
    out["object_shape"] = np.full(shapes.MAX_OBJECTS, -1, np.int32)
    for n, item in enumerate(scene.items):
        cover = object_region(scene, item, grid)
        out["object_shape"][n] = SHAPES.index(item.shape)
        out["colour"][cover] = COLOURS.index(item.colour) + 1
        out["shape"][cover] = SHAPES.index(item.shape) + 1
        out["cell"][cover] = item.cell + 1
    if scene.word:
        x0, y0, x1, y1 = scene.word_box
        on = (tx >= x0) & (tx <= x1) & (ty >= y0) & (ty <= y1)
        on[int(min((y0 + y1) / 2 / scene.height, 0.999) * grid) * grid + int(min((x0 + x1) / 2 / scene.width, 0.999) * grid)] = True
        out["word"][on] = WORDS.index(scene.word) + 1
    return out


def make_batch(seed: int, size: int, image_size: int, grid: int, max_items: int):
    rng = np.random.default_rng(seed)
    pixels, labels, counts, pools = [], {k: [] for k in list(HEADS) + ["object_shape"]}, [], []
    for _ in range(size):
        scene = shapes.random_scene(rng, max_items=max_items)
        image = shapes.render(scene, rng)
        pixels.append(resize_pixels(image, image_size, IMAGENET_MEAN, IMAGENET_STD))
        for k, v in token_labels(scene, grid).items():
            labels[k].append(v)
        counts.append(len(scene.items))
        pools.append(object_pooling(scene, grid))
    return (mx.array(np.stack(pixels)), {k: mx.array(np.stack(v)) for k, v in labels.items()},
            mx.array(np.array(counts, np.int32)), mx.array(np.stack(pools)))


class Dense(nn.Module):
    """The ViT plus its training heads (the heads are not shipped)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vit = VisionTransformer(config)
        self.heads = {k: nn.Linear(config.width, n) for k, n in HEADS.items()}
        self.count = nn.Linear(config.width, shapes.MAX_OBJECTS + 1)
        self.object_shape = nn.Linear(config.width, len(SHAPES))

    def __call__(self, pixels, pools):
        tokens = self.vit(pixels)["tokens"]
        logits = {k: h(tokens) for k, h in self.heads.items()}
        logits["object_shape"] = self.object_shape(pools @ tokens)  # each object's mean token
        return logits, self.count(tokens.mean(axis=1))


def loss_fn(model, pixels, labels, counts, pools, weights=WEIGHTS):
    """Per-token colour/shape/cell/word (object tokens weighted 3x), each object's
    shape from its mean token, and the count from the mean of all tokens; each
    term scaled by its entry in `weights`."""
    logits, count_logits = model(pixels, pools)
    total = 0.0
    for k in HEADS:
        y = labels[k]
        w = mx.where(y > 0, 3.0, 1.0)
        total = total + weights[k] * (nn.losses.cross_entropy(logits[k], y) * w).sum() / w.sum()
    y = labels["object_shape"]
    valid = y >= 0
    ce = nn.losses.cross_entropy(logits["object_shape"], mx.maximum(y, 0)) * valid
    total = total + weights["object_shape"] * ce.sum() / mx.maximum(valid.sum(), 1)
    total = total + nn.losses.cross_entropy(count_logits, counts).mean()
    return total, batch_accuracy(logits, count_logits, labels, counts)


def batch_accuracy(logits, count_logits, labels, counts) -> dict:
    """Training-batch accuracy of each head where it has a target (a cheap
    learning curve between probes): object tokens, word tokens, objects, pictures."""
    out = {}
    for k in HEADS:
        y = labels[k]
        on = y > 0
        out[k] = ((mx.argmax(logits[k], axis=-1) == y) * on).sum() / mx.maximum(on.sum(), 1)
    y = labels["object_shape"]
    valid = y >= 0
    out["object_shape"] = ((mx.argmax(logits["object_shape"], axis=-1) == y) * valid).sum() / mx.maximum(valid.sum(), 1)
    out["count"] = (mx.argmax(count_logits, axis=-1) == counts).mean()
    return out


def save_checkpoint(out: Path, model, opt, step: int) -> None:
    tmp = out / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    final = out / "checkpoint"
    if final.exists():
        old = out / "checkpoint.old"
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def warm_start_weights(path: Path) -> dict:
    """A stage-1 checkpoint's weights (`vit.*`, heads), or the vision tower of a
    built model folder (`vision_tower.*` in its model.safetensors) as `vit.*`."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    weights = mx.load(str(path))
    tower = {"vit." + k[len("vision_tower."):]: v for k, v in weights.items() if k.startswith("vision_tower.")}
    return tower or weights


def build_model(vision: dict) -> Dense:
    return Dense(VisionConfig.from_dict(vision))


def train(out: Path, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0, vision: dict = VISION,
          log_every: int = 25, init: Path = None, warmup: int = None, weights: dict = None) -> Dense:
    """Train (or resume) stage 1 in `out`; `weights` overrides entries of WEIGHTS."""
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = build_model(vision)
    if init is not None and not (out / "checkpoint").exists():  # warm start (heads it lacks stay fresh)
        model.load_weights(list(warm_start_weights(init).items()), strict=False)
    config = model.vit.config
    warmup = warmup or min(50, max(steps // 10, 1))
    schedule = optim.join_schedules([optim.linear_schedule(lr / 20, lr, warmup),
                                     optim.cosine_decay(lr, max(steps - warmup, 1), lr / 50)], [warmup])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    start = 0
    if (out / "checkpoint" / "state.json").exists():
        ck = out / "checkpoint"
        model.load_weights(str(ck / "model.safetensors"))
        opt.init(model.trainable_parameters())
        opt.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
        start = json.loads((ck / "state.json").read_text())["step"]
        print(f"resumed at step {start}", flush=True)
    step_fn = nn.value_and_grad(model, functools.partial(loss_fn, weights={**WEIGHTS, **(weights or {})}))
    log = open(out / "log.txt", "a")
    tic, recent = time.time(), []
    for step in range(start, steps):
        curriculum = 2 if step < steps // 5 else shapes.MAX_OBJECTS
        (loss, accuracy), grads = step_fn(model, *make_batch(seed * 1_000_003 + step, batch, config.image_size,
                                                             config.grid, curriculum))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss, accuracy)
        recent.append({"loss": loss.item(), **{k: v.item() for k, v in accuracy.items()}})
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = {k: np.mean([r[k] for r in recent]) for k in recent[0]}
            line = (f"step {step + 1}/{steps} loss {mean.pop('loss'):.4f} {(time.time() - tic) / len(recent):.2f} s/step"
                    " | accuracy " + " ".join(f"{k} {v:.3f}" for k, v in mean.items()))
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            tic, recent = time.time(), []
        if (step + 1) % 100 == 0 or step + 1 == steps:
            save_checkpoint(out, model, opt, step + 1)
    (out / "vision_config.json").write_text(json.dumps(vision, indent=2))
    mx.save_safetensors(str(out / "vision.safetensors"), dict(tree_flatten(model.vit.parameters())))
    (out / "done").write_text("ok")
    return model


# ---------------------------------------------------------------- probe


def tokens_and_targets(vit: VisionTransformer, seed: int, pictures: int, batch: int = 64):
    """Frozen tokens of fresh pictures: per object (its centre token, the mean of
    the tokens it covers, colour, shape, cell, lone?), per word and per picture."""
    config = vit.config
    rng = np.random.default_rng(seed)
    centre, region, objects, pooled, words, counts = [], [], [], [], [], []
    g = config.grid
    for start in range(0, pictures, batch):
        pixels, scenes = [], []
        for _ in range(min(batch, pictures - start)):
            scene = shapes.random_scene(rng)
            pixels.append(resize_pixels(shapes.render(scene, rng), config.image_size, IMAGENET_MEAN, IMAGENET_STD))
            scenes.append(scene)
        t = vit(mx.array(np.stack(pixels)))["tokens"]
        mx.eval(t)
        t = np.array(t)
        for n, scene in enumerate(scenes):
            for item in scene.items:
                cx, cy, _ = item.box
                tok = int(min(cy / scene.height, 0.999) * g) * g + int(min(cx / scene.width, 0.999) * g)
                centre.append(t[n, tok])
                region.append(t[n, object_region(scene, item, g)].mean(0))
                objects.append((COLOURS.index(item.colour), SHAPES.index(item.shape), item.cell,
                                item.extent is not None))
            if scene.word:
                words.append((len(pooled), WORDS.index(scene.word)))
            pooled.append(np.concatenate([t[n].mean(0), t[n].max(0)]))
            counts.append(len(scene.items))
    return np.stack(centre), np.stack(region), np.array(objects), np.stack(pooled), np.array(words), np.array(counts)


def fit_linear(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 300, lr: float = 0.05):
    """Multinomial logistic regression (full batch Adam) on frozen features."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = mx.array((x - mean) / std)
    ys = mx.array(y)
    layer = nn.Linear(x.shape[1], classes)
    opt = optim.Adam(learning_rate=lr)
    fn = nn.value_and_grad(layer, lambda m, a, b: nn.losses.cross_entropy(m(a), b).mean() + 1e-4 * (m.weight ** 2).sum())
    for _ in range(steps):
        _, g = fn(layer, xs, ys)
        opt.update(layer, g)
        mx.eval(layer.parameters(), opt.state)
    return lambda z: np.array(mx.argmax(layer(mx.array((z - mean) / std)), axis=-1))


def probe(vit: VisionTransformer, train_pictures: int = 1500, test_pictures: int = 500, seed: int = 4242) -> dict:
    """Linear probes on the frozen tokens, fitted on one set of fresh pictures and
    scored on another: each object's colour, shape and cell from the mean of the
    tokens it covers (an attention probe with the object's region as its mask),
    and from the single token at its centre (`*_centre`); the word and the
    object count from the tokens' mean and max."""
    vit.eval()
    results, fitted = {}, {}
    for split, n, s in (("train", train_pictures, seed), ("test", test_pictures, seed + 1)):
        centre, region, obj, pooled, words, counts = tokens_and_targets(vit, s, n)
        targets = {"colour": (region, obj[:, 0], len(COLOURS)), "shape": (region, obj[:, 1], len(SHAPES)),
                   "cell": (region, obj[:, 2], 9), "colour_centre": (centre, obj[:, 0], len(COLOURS)),
                   "shape_centre": (centre, obj[:, 1], len(SHAPES)),
                   "word": (pooled[words[:, 0]], words[:, 1], len(WORDS)),
                   "count": (pooled, counts, shapes.MAX_OBJECTS + 1)}
        if split == "train":
            fitted = {k: fit_linear(x, y, c) for k, (x, y, c) in targets.items()}
            continue
        for k, (x, y, c) in targets.items():
            results[k] = float((fitted[k](x) == y).mean())
        lone = obj[:, 3].astype(bool)
        for k, col in (("colour", 0), ("shape", 1)):
            pred = fitted[k](region)
            results[f"{k}_lone"] = float((pred[lone] == obj[lone, col]).mean())
            results[f"{k}_scenes"] = float((pred[~lone] == obj[~lone, col]).mean())
        results["objects"] = int(len(obj))
    return results


def load_vit(out: Path) -> VisionTransformer:
    vit = VisionTransformer(VisionConfig.from_dict(json.loads((out / "vision_config.json").read_text())))
    vit.load_weights(str(out / "vision.safetensors"))
    return vit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/default_model/encoder")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: a tenth of the steps, at most 50)")
    p.add_argument("--probe-only", action="store_true")
    p.add_argument("--init", default=None,
                   help="warm-start weights: a checkpoint's model.safetensors, or a built model folder (its vision tower)")
    p.add_argument("--probe-pictures", type=int, default=1500)
    p.add_argument("--word-weight", type=float, default=WEIGHTS["word"], help="weight of the per-token word loss")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not a.probe_only and not (out / "done").exists():
        train(out, a.steps, a.batch, a.lr, init=a.init and Path(a.init), warmup=a.warmup,
              weights={"word": a.word_weight})
    tic = time.time()
    results = probe(load_vit(out), a.probe_pictures, a.probe_pictures // 3)
    results["seconds"] = time.time() - tic
    (out / "probe.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    from mlx_vlm_native.cli import ensure_fast_blas

    ensure_fast_blas()
    main()
