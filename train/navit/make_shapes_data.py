"""Write the NaViT shapes data set: lone-shape pictures (`train/shapes_world.py`'s
`lone_shape`: one shape filling most of a picture of 100-370 px, aspect 1:2-2:1,
varied backgrounds) as PNGs with exact labels, one JSONL per split of
`{"image": "train/000000.png", "label": "red"}` lines, which `train/navit/shapes.json` reads.

    python train/navit/make_shapes_data.py                    # runs/navit_shapes/data/{train,valid}.jsonl
    python train/navit/make_shapes_data.py --label shape --train 2000 --out /tmp/shapes

Picture n of a split is a pure function of (seed, n); the valid split uses another seed.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: train/shapes_world.py
from train import shapes_world as shapes  # noqa: E402

LABELS = ("shape", "colour", "colour_shape")


def classes(label: str) -> list:
    """Every class of a label kind, in the world's order (a recipe's `classes`)."""
    if label not in LABELS:
        raise ValueError(f"unknown shapes label {label!r}; use one of {', '.join(LABELS)}")
    return {"shape": list(shapes.SHAPES), "colour": list(shapes.COLOURS),
            "colour_shape": [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]}[label]


def write_split(out: Path, split: str, count: int, seed: int, label: str = "colour") -> Path:
    """`count` pictures under out/split/ and out/split.jsonl (paths relative to out)."""
    classes(label)  # checks the label kind
    out = Path(out)
    (out / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(count):
        image, item = shapes.lone_shape(np.random.default_rng((seed, n)))
        name = {"shape": item.shape, "colour": item.colour}.get(label, f"{item.colour} {item.shape}")
        image.save(out / split / f"{n:06d}.png")
        lines.append(json.dumps({"image": f"{split}/{n:06d}.png", "label": name}))
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/navit_shapes/data")
    p.add_argument("--label", default="colour", choices=LABELS)
    p.add_argument("--train", type=int, default=8000, help="training pictures")
    p.add_argument("--valid", type=int, default=384, help="held-out pictures")
    p.add_argument("--seed", type=int, default=0, help="train seed; valid uses seed + 10000")
    a = p.parse_args(argv)
    for split, count, seed in (("train", a.train, a.seed), ("valid", a.valid, a.seed + 10_000)):
        print(f"{write_split(Path(a.out), split, count, seed, a.label)}: {count} pictures")
    print(f"classes ({a.label}): {json.dumps(classes(a.label))}")


if __name__ == "__main__":
    main()
