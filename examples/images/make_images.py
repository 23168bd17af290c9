"""Re-create the generated example images (scene.png, scene2.png, circle.png, word.png;
moving.gif comes from examples/video_frames.py)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: train/shapes_world.py
from train.shapes_world import Item, Scene, render  # noqa: E402

HERE = Path(__file__).parent
SCENES = {
    "scene.png": Scene(280, 190, "gradient", [Item("circle", "red", "large", 0), Item("star", "blue", "large", 5),
                                              Item("triangle", "yellow", "small", 7)]),
    "scene2.png": Scene(200, 230, "plain", [Item("square", "green", "large", 1), Item("cross", "purple", "small", 6)]),
    "circle.png": Scene(260, 180, "gradient", [Item("circle", "green", "large", 4)]),
    "word.png": Scene(240, 200, "noise", [Item("circle", "orange", "small", 0)], word="owl", word_cell=1),
}

if __name__ == "__main__":
    for (name, scene), seed in zip(SCENES.items(), (0, 5, 4, 2)):
        render(scene, np.random.default_rng(seed)).save(HERE / name)
