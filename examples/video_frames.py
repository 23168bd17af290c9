"""Video as sampled frames. Makes a short clip of a shape moving across the
picture (examples/images/moving.gif), samples frames from it, then:

- with a video model (LLaVA-OneVision, Qwen2-VL family) passes them as one video;
- with an image-only model (the embedded default) asks about each frame and
  prints how the answer changes over time.

    python examples/video_frames.py
    python examples/video_frames.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --prompt "Describe the video."
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from mlx_vlm_native import generate, load
from mlx_vlm_native.processors.image import load_video_frames
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: train/shapes_world.py
from train.shapes_world import Item, Scene, render  # noqa: E402

CLIP = Path(__file__).parent / "images" / "moving.gif"


def make_clip(path: Path, frames: int = 9) -> Path:
    """A blue star walking through the 3x3 cells, left to right, row by row."""
    images = [render(Scene(240, 180, "plain", [Item("star", "blue", "large", cell)]), np.random.default_rng(1))
              for cell in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=300, loop=0)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--video", default=None, help="a GIF/WebP or a folder of frames (default: a generated clip)")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()

    video = a.video or (CLIP if CLIP.exists() else make_clip(CLIP))
    frames = load_video_frames(video, a.frames)
    model, processor = load(a.model)
    if processor.video_token_id is not None:
        prompt = a.prompt or "Describe the video."
        print(f"> {prompt} ({len(frames)} frames as one video)")
        print(generate(model, processor, prompt, videos=[frames], max_tokens=a.max_tokens).text)
    else:
        prompt = a.prompt or "Where is the blue star?"
        print(f"> {prompt} (image-only model: asked frame by frame)")
        for i, frame in enumerate(frames):
            print(f"frame {i}: {generate(model, processor, prompt, images=[frame], max_tokens=a.max_tokens).text}")
