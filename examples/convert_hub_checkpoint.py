"""Convert a Hugging Face checkpoint to MLX (optionally 4-bit) and ask it about an image.
Needs network access for a Hub id; a local HF-layout folder works offline.

    python examples/convert_hub_checkpoint.py --hf-path llava-hf/llava-onevision-qwen2-0.5b-ov-hf \
        --mlx-path llava-ov-0.5b-4bit --quantize
    # same as: mlx-vlm-native convert --hf-path ... --mlx-path ... -q
"""

import argparse
from pathlib import Path

from mlx_vlm_native import generate, load
from mlx_vlm_native.convert import convert

IMAGES = Path(__file__).parent / "images"

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--hf-path", default="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    p.add_argument("--mlx-path", default="mlx_model")
    p.add_argument("--quantize", "-q", action="store_true")
    p.add_argument("--image", default=str(IMAGES / "shapes.png"))
    p.add_argument("--prompt", default="What is in this image?")
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()

    if not (Path(a.mlx_path) / "config.json").exists():
        convert(a.hf_path, a.mlx_path, quantize=a.quantize)
    model, processor = load(a.mlx_path)
    result = generate(model, processor, a.prompt, images=[a.image], max_tokens=a.max_tokens)
    print(f"> {a.prompt}\n{result.text}\n({result.generation_tps:.1f} tokens/s)")
