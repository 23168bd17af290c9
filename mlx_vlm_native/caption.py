"""`mlx-vlm-native caption --model <folder or Hub id> --image photo.jpg`: caption
images with an OpenVision 2 encoder + caption decoder, from a converted MLX
folder or a released `*-vision-only` repo (open_clip weights +
caption_decoder.safetensors). The image tokens never attend to text (either
mask), so their KV cache stays valid as the text grows."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from .models import openvision_checkpoint as ovc
from .models.openvision import mask_image_tokens
from .processors.image import ImageInput
from .utils import get_model_path, load_processor

class CaptionModel(nn.Module):
    """The caption decoder as mlx-lm's `generate_step` calls it: the image's
    tokens go in with the first call (the prefill), text alone after it."""

    def __init__(self, decoder, image_tokens: mx.array):
        super().__init__()
        self.decoder, self.image_tokens = decoder, image_tokens

    @property
    def layers(self):
        return self.decoder.blocks

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        image = self.image_tokens if cache[0].offset == 0 else None
        return self.decoder(image, inputs, cache=cache)


def generate_captions(model, pixels: mx.array, max_tokens: int = 64, temperature: float = 0.0,
                      top_p: float = 1.0, keep_ratio: float = 1.0, seed: Optional[int] = None) -> List[List[int]]:
    """Token ids (without bos/eos) for each image of the batch, each decoded by mlx-lm's `generate_step`."""
    if "decoder" not in model:
        raise ValueError("this checkpoint has no caption decoder (caption_decoder.safetensors)")
    if seed is not None:
        mx.random.seed(seed)
    cfg = model.decoder.config
    sampler = make_sampler(temp=temperature, top_p=top_p)
    tokens = mask_image_tokens(model.vision(pixels)["tokens"], keep_ratio)
    out = []
    for b in range(tokens.shape[0]):
        ids = []
        for token, _ in generate_step(mx.array([cfg.bos_token_id]), CaptionModel(model.decoder, tokens[b : b + 1]),
                                      max_tokens=max_tokens, sampler=sampler):
            if token == cfg.eos_token_id:
                break
            ids.append(token)
        out.append(ids)
    return out


def caption(model: Union[str, Path, "object"], images: Union[ImageInput, Sequence[ImageInput]], max_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
            attention_mask: Optional[str] = None, processor=None) -> Union[str, List[str]]:
    """Caption one image (a str) or a list of them (a list of str); `model` is a
    folder / Hub id, or a model from `load()` with its `processor`."""
    if isinstance(model, (str, Path)):
        path = get_model_path(str(model))
        model = ovc.load(path, attention_mask=attention_mask)
        processor = processor or load_processor(path, model)
    if processor is None:
        raise ValueError("pass the processor that load() returned along with a loaded model")
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    ids = generate_captions(model, processor.pixels(images), max_tokens, temperature, top_p, seed=seed)
    texts = [processor.decode(i) for i in ids]
    return texts[0] if single else texts


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Caption images with an OpenVision 2 encoder + decoder.")
    p.add_argument("--model", required=True, help="MLX or released open_clip folder, or Hub id")
    p.add_argument("--image", nargs="+", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", "--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--attention-mask", choices=["prefix", "causal"], default=None,
                   help="override the decoder's image/text mask (default: the checkpoint's, prefix)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = configure_parser().parse_args(argv)
    try:
        texts = caption(args.model, list(args.image), args.max_tokens, args.temperature,
                        args.top_p, args.seed, args.attention_mask)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    for image, text in zip(args.image, texts):
        print(f"{image}: {text}" if len(args.image) > 1 else text)


if __name__ == "__main__":
    from .cli import ensure_fast_blas

    ensure_fast_blas()
    main()
