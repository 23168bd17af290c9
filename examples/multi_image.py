"""Several images in one prompt: the images come first, in order, then the question.

    python examples/multi_image.py
    python examples/multi_image.py --model PATH_OR_HUB_ID --image a.jpg b.jpg --prompt "Compare the two images."
"""

import argparse
from pathlib import Path

from mlx_vlm_native import generate, load

IMAGES = Path(__file__).parent / "images"

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--image", nargs="+", default=[str(IMAGES / "scene.png"), str(IMAGES / "scene2.png")])
    p.add_argument("--prompt", default="Which image has a star?")
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args()

    model, processor = load(a.model)
    result = generate(model, processor, a.prompt, images=a.image, max_tokens=a.max_tokens)
    print(f"> {a.prompt} ({len(a.image)} images)\n{result.text}")
