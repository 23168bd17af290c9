"""Answer several prompts, each about its own images, with ONE vision-encoder
call for all of them: a packed variable-length call for the NaViT models
(Qwen2-VL / Qwen2.5-VL / POINTS1.5), a batched call for the embedded model.

    python examples/batch_images.py
    python examples/batch_images.py --model PATH_OR_HUB_ID
"""

import argparse
from pathlib import Path

from mlx_vlm_native import batch_generate, load

IMAGES = Path(__file__).parent / "images"

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()

    model, processor = load(a.model)
    circle, scene, scene2, word = (str(IMAGES / n) for n in ("circle.png", "scene.png", "scene2.png", "word.png"))
    prompts = ["What colour is the circle?", "Which image has a star?", "What word is written in the image?",
               "How many shapes are there?"]
    images = [[circle], [scene, scene2], [word], [scene2]]
    for prompt, result in zip(prompts, batch_generate(model, processor, prompts, images, max_tokens=a.max_tokens)):
        print(f"> {prompt}\n{result.text}\n({result.prompt_tokens} prompt tokens)")
