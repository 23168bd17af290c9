"""A procedurally generated visual question-answering world: coloured shapes of
two sizes in a 3x3 layout, short rendered words, varied backgrounds and aspect
ratios, with captions and question-answer pairs whose answers are known.

It is what the embedded default model is trained and measured on
(`train/default_model/`), and what the examples finetune on. Everything is a
pure function of a seed.

    scene = random_scene(rng)            # what is in the picture
    image = render(scene, rng)           # a PIL image of it
    qa = ask(scene, "colour", rng)       # (question, answer, expected value)
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (30, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 50, 180),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
WORDS = ("cat", "dog", "sun", "fish", "bird", "moon", "book", "cake", "lamp", "ship", "rain", "snow",
         "frog", "king", "box", "cup", "hat", "key", "map", "pen", "owl", "fox", "bee", "egg",
         "tea", "car", "bus", "jam", "mlx", "art")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("colour", "shape", "count", "position", "word", "caption", "multi_image")
MAX_OBJECTS = 5


@dataclass
class Item:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major in the 3x3 layout

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    background: str  # plain, gradient or noise
    items: List[Item] = field(default_factory=list)
    word: Optional[str] = None
    word_cell: Optional[int] = None  # the row (0..2) the word is centred on


def position_phrase(position: str) -> str:
    return "in the centre" if position == "centre" else (
        f"on the {position}" if position in ("left", "right") else f"at the {position}")


def random_scene(rng: np.random.Generator, with_word: Optional[bool] = None, min_items: int = 0) -> Scene:
    """Random size and aspect ratio (1:2 .. 2:1), 0-5 objects in distinct cells,
    and in about a third of the scenes a word across one row."""
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    area = rng.uniform(140, 260) ** 2
    width, height = int(np.sqrt(area * aspect)), int(np.sqrt(area / aspect))
    if with_word is None:
        with_word = rng.random() < 0.33
    scene = Scene(width, height, str(rng.choice(["plain", "gradient", "noise"])))
    cells = list(range(9))
    if with_word:
        scene.word = str(rng.choice(WORDS))
        scene.word_cell = int(rng.integers(0, 3))
        cells = [c for c in cells if c // 3 != scene.word_cell]
    count = int(rng.integers(max(min_items, 0 if with_word else 1), (2 if with_word else MAX_OBJECTS) + 1))
    for cell in rng.choice(cells, size=count, replace=False):
        scene.items.append(Item(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))),
                                str(rng.choice(SIZES)), int(cell)))
    return scene


# ---------------------------------------------------------------- drawing


def background(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Mid-tone, low-saturation backgrounds, so black, white and every colour show."""
    base = rng.uniform(85, 175) + rng.uniform(-25, 25, size=3)
    h, w = scene.height, scene.width
    if scene.background == "gradient":
        other = rng.uniform(85, 175) + rng.uniform(-25, 25, size=3)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
        ramp = base[None] * (1 - t[:, None]) + other[None] * t[:, None]
        pixels = ramp[None, :, :].repeat(h, 0) if len(t) == w else ramp[:, None, :].repeat(w, 1)
    else:
        pixels = np.broadcast_to(base, (h, w, 3)).astype(np.float64)
    if scene.background == "noise":
        pixels = pixels + rng.normal(0, 12, size=(h, w, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def cell_box(scene: Scene, cell: int) -> Tuple[float, float, float, float]:
    cw, ch = scene.width / 3, scene.height / 3
    x0, y0 = (cell % 3) * cw, (cell // 3) * ch
    return x0, y0, x0 + cw, y0 + ch


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    if shape == "triangle":
        k, radii = 3, [r]
    elif shape == "square":
        k, radii, angle = 4, [r * 0.95], angle + np.pi / 4
    elif shape == "diamond":
        k, radii = 4, [r]
    elif shape == "star":
        k, radii = 10, [r, r * 0.45]
    else:  # cross: a plus sign of width r * 0.6
        a = r * 0.3
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        return [(cx + x, cy + y) for x, y in pts]
    return [(cx + radii[i % len(radii)] * np.sin(angle + 2 * np.pi * i / k),
             cy - radii[i % len(radii)] * np.cos(angle + 2 * np.pi * i / k)) for i in range(k)]


def draw_item(draw: ImageDraw.ImageDraw, scene: Scene, item: Item, rng: np.random.Generator, box=None) -> None:
    x0, y0, x1, y1 = box or cell_box(scene, item.cell)
    side = min(x1 - x0, y1 - y0)
    r = side / 2 * (rng.uniform(0.72, 0.9) if item.size == "large" else rng.uniform(0.38, 0.5))
    cx = rng.uniform(x0 + r, x1 - r) if x1 - x0 > 2 * r else (x0 + x1) / 2
    cy = rng.uniform(y0 + r, y1 - r) if y1 - y0 > 2 * r else (y0 + y1) / 2
    fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[item.colour])
    if item.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        tilt = 0.0 if item.shape in ("square", "cross") else rng.uniform(-0.15, 0.15)
        draw.polygon(polygon(item.shape, cx, cy, r, tilt), fill=fill)


def draw_word(image: Image.Image, scene: Scene, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(image)
    row_h = scene.height / 3
    size = int(min(row_h * 0.8, scene.width / (0.62 * len(scene.word) + 0.5)))
    font = ImageFont.load_default(size=max(size, 10))
    left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
    tw, th = right - left, bottom - top
    x = rng.uniform(0, max(scene.width - tw, 0)) - left
    y = scene.word_cell * row_h + (row_h - th) / 2 - top
    mean = np.asarray(image.crop((0, int(scene.word_cell * row_h), scene.width, int((scene.word_cell + 1) * row_h)))).mean()
    draw.text((x, y), scene.word, fill=(10, 10, 10) if mean > 128 else (250, 250, 250), font=font)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    image = background(scene, rng)
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        draw_item(draw, scene, item, rng)
    if scene.word:
        draw_word(image, scene, rng)
    return image


def lone_shape(rng: np.random.Generator) -> Tuple[Image.Image, Item]:
    """One shape filling most of a picture of random size and aspect ratio
    (1:2 .. 2:1, sides 100-370 px) and background: a classification example
    whose label (`item.shape`, `item.colour`) is exact."""
    probe = random_scene(rng, with_word=False)
    scene = Scene(probe.width, probe.height, probe.background)
    item = Item(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(SIZES)), 4)
    image = background(scene, rng)
    draw_item(ImageDraw.Draw(image), scene, item, rng, box=(0, 0, scene.width, scene.height))
    return image, item


# ---------------------------------------------------------------- language


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "es" if shape.endswith("s") else shape + "s"


def caption(scene: Scene) -> str:
    parts = [f"{item.phrase()} {position_phrase(item.position)}" for item in sorted(scene.items, key=lambda i: i.cell)]
    if scene.word:
        row = ("top", "middle", "bottom")[scene.word_cell]
        parts.append(f'the word "{scene.word}" across the {row}')
    if not parts:
        return "An empty background."
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def unique(items: Sequence[Item], key) -> List[Item]:
    values = [key(i) for i in items]
    return [i for i in items if values.count(key(i)) == 1]


NAMED_BY = {"colour": lambda i: i.shape, "shape": lambda i: i.colour,
            "position": lambda i: (i.colour, i.shape), "size": lambda i: i.shape}


def ask(scene: Scene, kind: str, rng: np.random.Generator, other: Optional[Scene] = None):
    """(question, answer, expected value) of one type about the scene, or None
    when the scene cannot answer it unambiguously (e.g. two circles)."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if kind in NAMED_BY:  # questions about one object, named by what makes it unique
        items = unique(scene.items, NAMED_BY[kind])
        if not items:
            return None
        item = pick(items)
    if kind == "colour":
        q = pick([f"What colour is the {item.shape}?", f"What color is the {item.shape}?",
                  f"Which colour is the {item.shape}?"])
        return q, f"The {item.shape} is {item.colour}.", item.colour
    if kind == "shape":
        q = pick([f"What shape is the {item.colour} object?", f"Which shape is {item.colour}?",
                  f"What is the {item.colour} shape?"])
        return q, f"The {item.colour} shape is a {item.shape}.", item.shape
    if kind == "count":
        n = len(scene.items)
        q = pick(["How many shapes are there?", "How many objects are in the image?", "Count the shapes."])
        return q, f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {plural('shape', n)}.", NUMBERS[n]
    if kind == "position":
        name = f"{item.colour} {item.shape}"
        q = pick([f"Where is the {name}?", f"Where is the {name} in the image?"])
        return q, f"The {name} is {position_phrase(item.position)}.", item.position
    if kind == "size":  # not in the default model's training mix: the LoRA example teaches it
        return f"What size is the {item.shape}?", f"The {item.shape} is {item.size}.", item.size
    if kind == "word":
        if not scene.word:
            return None
        q = pick(["What word is written in the image?", "What does the text say?", "Read the word in the image."])
        return q, f'The word is "{scene.word}".', scene.word
    if kind == "caption":
        q = pick(["Describe the image.", "What is in this image?", "Describe the picture."])
        text = caption(scene)
        return q, text, text
    if kind == "multi_image":
        return ask_two(scene, other, rng)
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(QUESTION_TYPES + ('size',))}")


def ask_two(first: Scene, second: Scene, rng: np.random.Generator):
    """Which of two images has a shape the other lacks."""
    a, b = {i.shape for i in first.items}, {i.shape for i in second.items}
    only = [(s, "first") for s in sorted(a - b)] + [(s, "second") for s in sorted(b - a)]
    if not only:
        return None
    shape, which = only[int(rng.integers(len(only)))]
    return f"Which image has a {shape}?", f"The {which} image has a {shape}.", which


# ---------------------------------------------------------------- scoring


VOCABULARY = {
    "colour": list(COLOURS), "shape": list(SHAPES), "count": list(NUMBERS), "position": list(POSITIONS),
    "word": list(WORDS), "multi_image": ["first", "second"], "size": list(SIZES),
}


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())


def answer_value(kind: str, answer: str) -> Optional[str]:
    """The value an answer gives for its question type: the known term
    mentioned last (longer terms first, so "top left" is not read as "left")."""
    text = answer.lower().replace("color", "colour").replace("center", "centre")
    if kind == "caption":
        return " ".join(text.split())
    text = f" {words(text)} "
    if kind == "shape":
        for shape in SHAPES:
            text = text.replace(f" {plural(shape, 2)} ", f" {shape} ")
    found = []
    for term in sorted(VOCABULARY[kind], key=len, reverse=True):
        at = text.rfind(f" {term} ")
        if at >= 0:
            found.append((at, term))
            text = text.replace(f" {term} ", " " + "#" * len(term) + " ")
    return max(found)[1] if found else None


# ---------------------------------------------------------------- datasets


TRAIN_MIX = {"colour": 0.2, "shape": 0.2, "count": 0.15, "position": 0.2, "word": 0.15, "caption": 0.1}


def conversation(scene: Scene, image: str, rng: np.random.Generator, turns: int = 3,
                 mix: Optional[Dict[str, float]] = None) -> Optional[dict]:
    """An OpenAI-form conversation of `turns` questions about one image; the
    image goes with the first question. Types are drawn from `mix` (TRAIN_MIX).
    A question whose answer an earlier answer already gives ("The circle is
    red." then "What shape is the red object?") is skipped: the model must read
    every answer off the image, as it must when asked once."""
    mix = mix or TRAIN_MIX
    kinds, probs = list(mix), np.array(list(mix.values()))
    messages, asked, answered = [], set(), ""
    for _ in range(turns * 4):
        if len(messages) == 2 * turns:
            break
        kind = kinds[rng.choice(len(kinds), p=probs / probs.sum())]
        qa = ask(scene, kind, rng)
        if qa is None or qa[0] in asked:
            continue
        value = answer_value(kind, qa[1])
        if value and f" {words(value)} " in answered:
            continue
        asked.add(qa[0])
        answered += f" {words(qa[1])} "
        content = [{"type": "text", "text": qa[0]}]
        if not messages:
            content = [{"type": "image", "image": image}] + content
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": qa[1]}]
    return {"messages": messages} if messages else None


def two_image_conversation(first: str, second: str, qa) -> dict:
    content = [{"type": "image", "image": first}, {"type": "image", "image": second},
               {"type": "text", "text": qa[0]}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": qa[1]}]}


def write_dataset(dst, count: int, seed: int, turns: int = 3, two_image_fraction: float = 0.08,
                  mix: Optional[Dict[str, float]] = None, progress: bool = False) -> Path:
    """`count` training conversations (images under dst/images, conversations
    in dst/conversations.jsonl, captions in dst/captions.jsonl)."""
    from tqdm import tqdm

    dst = Path(dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(dst / "conversations.jsonl", "w") as conv, open(dst / "captions.jsonl", "w") as caps:
        for n in tqdm(range(count), disable=not progress, desc="generating"):
            scene = random_scene(rng)
            name = f"images/{n:06d}.png"
            render(scene, rng).save(dst / name)
            caps.write(json.dumps({"image": name, "caption": caption(scene)}) + "\n")
            record = None
            if rng.random() < two_image_fraction:
                other = random_scene(rng, with_word=False)
                other_name = f"images/{n:06d}b.png"
                render(other, rng).save(dst / other_name)
                qa = ask_two(scene, other, rng)
                if qa is not None:
                    record = two_image_conversation(name, other_name, qa)
            if record is None:
                record = conversation(scene, name, rng, turns, mix)
            if record is not None:
                conv.write(json.dumps(record) + "\n")
    return dst


@dataclass
class Question:
    kind: str
    question: str
    answer: str
    expected: str
    images: List[Image.Image]


def held_out_questions(per_type: int, seed: int, kinds: Sequence[str] = QUESTION_TYPES) -> List[Question]:
    """`per_type` single-turn questions of each type on fresh scenes (a seed
    disjoint from training's gives scenes the model has not seen)."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        made = 0
        while made < per_type:
            scene = random_scene(rng, with_word=True if kind == "word" else None,
                                 min_items=1 if kind in ("colour", "shape", "position", "size") else 0)
            other = random_scene(rng, with_word=False) if kind == "multi_image" else None
            qa = ask(scene, kind, rng, other)
            if qa is None:
                continue
            images = [render(scene, rng)] + ([render(other, rng)] if other is not None else [])
            out.append(Question(kind, qa[0], qa[1], qa[2], images))
            made += 1
    return out


def evaluate(model, processor, questions: Sequence[Question], max_tokens: int = 48, progress: bool = False) -> dict:
    """Greedy answers to held-out questions, scored by the value they name:
    {type: {"accuracy", "correct", "total", "examples"}} (captions: exact match)."""
    from tqdm import tqdm

    from .generate import generate as run

    scores: Dict[str, dict] = {}
    for q in tqdm(questions, disable=not progress, desc="evaluating"):
        text = run(model, processor, q.question, images=q.images, max_tokens=max_tokens).text
        value = answer_value(q.kind, text)
        expected = answer_value(q.kind, q.expected) if q.kind == "caption" else q.expected
        s = scores.setdefault(q.kind, {"correct": 0, "total": 0, "examples": []})
        s["correct"] += int(value == expected)
        s["total"] += 1
        if len(s["examples"]) < 3:
            s["examples"].append({"question": q.question, "expected": q.answer, "answer": text})
    for s in scores.values():
        s["accuracy"] = s["correct"] / s["total"]
    return scores


def lone_colour_accuracy(model, processor, count: int, seed: int) -> float:
    """Colour questions about fresh pictures that hold a single shape."""
    from .generate import generate as run

    rng, right = np.random.default_rng(seed), 0
    for _ in range(count):
        scene = random_scene(rng, with_word=False)
        scene.items = scene.items[:1]
        item = scene.items[0]
        answer = run(model, processor, f"What colour is the {item.shape}?", images=[render(scene, rng)],
                     max_tokens=12).text
        right += answer_value("colour", answer) == item.colour
    return right / count
