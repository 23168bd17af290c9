"""OpenVision 2's captioner: images to pixels, caption ids to text. It takes
images only (no prompt): `caption` is its command and API."""

from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..models import openvision_checkpoint as ovc
from .base import Processor as BaseProcessor
from .image import ImageInput, center_crop_pixels, load_image


class Processor(BaseProcessor):
    def __init__(self, tokenizer, image_size: int, mean=ovc.IMAGE_MEAN, std=ovc.IMAGE_STD):
        self.tokenizer, self.image_size, self.mean, self.std = tokenizer, image_size, mean, std

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, args) -> "Processor":
        """`tokenizer`: the caption tokenizer (`openvision_checkpoint.load_tokenizer`)."""
        return cls(tokenizer, args.vision_config.image_size)

    def pixels(self, images: Sequence[ImageInput]) -> mx.array:
        """Short side to `image_size`, center crop, ImageNet normalisation: (B, S, S, 3)."""
        return mx.array(np.stack([center_crop_pixels(load_image(i), self.image_size, self.mean, self.std)
                                  for i in images]))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        raise ValueError("an OpenVision 2 captioner takes no prompt: use `mlx-vlm-native caption` "
                         "(Python: mlx_vlm_native.caption.caption)")

    format_messages = format_prompt
