"""Answer several prompts, each about its own images, with one packed vision
encoder call for all of them (Qwen2-VL / Qwen2.5-VL / POINTS1.5).

    python examples/batch_images.py --model PATH_OR_HUB_ID
"""

import argparse
from pathlib import Path

from mlx_vlm_native import batch_generate, load

IMAGES = Path(__file__).parent / "images"

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()

    model, processor = load(a.model)
    shapes = str(IMAGES / "shapes.png")
    prompts = ["What shapes do you see?", "Describe the colours.", "Say hello."]
    images = [[shapes], [shapes, shapes], []]
    for prompt, result in zip(prompts, batch_generate(model, processor, prompts, images, max_tokens=a.max_tokens)):
        print(f"> {prompt}\n{result.text}\n({result.prompt_tokens} prompt tokens)")
