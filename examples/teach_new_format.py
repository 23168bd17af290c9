"""Teach the embedded default model something new: a reply format it has never
seen. The pictures are drawn here with plain PIL (not the package's shapes
renderer): one circle, square or triangle in one of four colours, anywhere on
a white, grey or cream canvas. The question is "Tag this picture." and the
answer is the new form `shape=circle colour=red`.

    python examples/teach_new_format.py write runs/tags      # 100 train + 50 held-out
    mlx-vlm-native train --data runs/tags/train.jsonl --adapter-path runs/tags/adapters
    python examples/teach_new_format.py score runs/tags --adapter-path runs/tags/adapters

`score` prints the share of held-out pictures whose greedy answer is exactly
the expected tag line (and a few answers).
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CANVASES = ((255, 255, 255), (200, 200, 200), (245, 235, 210))
QUESTION = "Tag this picture."


def draw(shape: str, colour: str, rng: random.Random, size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), rng.choice(CANVASES))
    d = ImageDraw.Draw(image)
    r = rng.randint(18, 40)
    cx, cy = rng.randint(r + 2, size - r - 2), rng.randint(r + 2, size - r - 2)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def tag(shape: str, colour: str) -> str:
    return f"shape={shape} colour={colour}"


def write_split(root: Path, name: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        rel = f"images/{name}{i}.png"
        draw(shape, colour, rng).save(root / rel)
        lines.append({"images": [rel], "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": tag(shape, colour)}]})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def score(root: Path, model=None, adapter_path=None, show: int = 3) -> float:
    from mlx_vlm_native import generate, load

    model, processor = load(model, adapter_path=adapter_path)
    right, total = 0, 0
    for line in (root / "heldout.jsonl").read_text().splitlines():
        record = json.loads(line)
        expected = record["conversations"][1]["value"]
        text = generate(model, processor, QUESTION, images=[str(root / record["images"][0])], max_tokens=16).text
        right += int(text.strip() == expected)
        total += 1
        if total <= show:
            print(f"expected {expected!r}, got {text.strip()!r}")
    print(f"held-out: {right}/{total} right ({right / total:.0%})")
    return right / total


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["write", "score"])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=100)
    p.add_argument("--heldout", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="pictures' seed (held-out: seed + 1000)")
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--adapter-path", default=None)
    a = p.parse_args()
    root = Path(a.root)
    if a.action == "write":
        write_split(root, "train", a.train, seed=a.seed)
        write_split(root, "heldout", a.heldout, seed=a.seed + 1000)
        print(f"wrote {root / 'train.jsonl'} ({a.train}) and {root / 'heldout.jsonl'} ({a.heldout})")
    else:
        score(root, a.model, a.adapter_path)
