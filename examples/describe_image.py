"""Ask a model about one or more images through the Python API.

    python examples/describe_image.py --image examples/images/circle.png --prompt "What colour is the circle?"
    python examples/describe_image.py --model PATH_OR_HUB_ID --image photo.jpg

Without --model it uses the small model embedded in the package.
"""

import argparse

from mlx_vlm_native import generate, load

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()

    model, processor = load(a.model)
    result = generate(model, processor, a.prompt, images=a.image, max_tokens=a.max_tokens)
    print(result.text)
    print(f"{result.prompt_tokens} prompt tokens at {result.prompt_tps:.1f} tok/s, "
          f"{result.generation_tokens} generated at {result.generation_tps:.1f} tok/s")
