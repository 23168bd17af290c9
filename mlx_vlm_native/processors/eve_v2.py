"""EVEv2 preprocessing: no canvas and no mask; the image is scaled to about
`max_size`² pixels with both sides rounded up to multiples of 32
(`patch_stride * dense_stride`). Prompts and placeholders are EVE v1's.
"""

import math
import re
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image

from .eve import EVEProcessor
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, rescale_and_normalize


@dataclass
class EVEv2ImageProcessor:
    max_size: int = 800
    patch_stride: int = 16
    dense_stride: int = 2
    image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, cfg: dict, vision_tower: str = "") -> "EVEv2ImageProcessor":
        # without the preprocessor json, the size comes from the tower name:
        # the HD release names "openai/eve-anyratio-res1600-patch16"
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        named = re.search(r"-res(\d+)", vision_tower)
        if named:
            fields.setdefault("max_size", int(named.group(1)))
        for k in ("image_mean", "image_std"):
            if k in fields:
                fields[k] = tuple(fields[k])
        return cls(**fields)

    def size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(width, height) -> resized (width, height): area about max_size²."""
        w, h = image_size
        cell = self.patch_stride * self.dense_stride
        scale = math.sqrt(w * h) / self.max_size
        return tuple(max(math.ceil(side / scale / cell) * cell, cell) for side in (w, h))

    @property
    def strides(self) -> Tuple[int, int]:
        """(patch, dense) strides, which the model's (patch, conv) must equal."""
        return self.patch_stride, self.dense_stride

    def grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        w, h = self.size(image_size)
        cell = self.patch_stride * self.dense_stride
        return h // cell, w // cell

    def num_tokens(self, image_size: Tuple[int, int]) -> int:
        h, w = self.grid(image_size)
        return 1 + h * (w + 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """-> (3, H, W) float32, normalised."""
        resized = image.resize(self.size(image.size))  # PIL's default filter, as the reference
        return rescale_and_normalize(np.asarray(resized).transpose(2, 0, 1), 1 / 255, self.image_mean, self.image_std)


class Processor(EVEProcessor):
    image_processor_class = EVEv2ImageProcessor
