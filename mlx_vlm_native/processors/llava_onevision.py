"""LLaVA-OneVision preprocessing: AnyRes tiling, multi-image, video, prompts.

Mirrors transformers' `LlavaOnevisionImageProcessor` (Pillow backend) and
`LlavaOnevisionProcessor` pixel for pixel and token for token.
"""

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..models.base import ProcessedInputs
from ..models.llava_onevision import AnyResLayout, anyres_layout, parse_max_tiles, select_best_resolution
from .image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInput,
    load_image,
    pad_to_square,
    rescale_and_normalize,
    resize,
    to_chw,
)
from .prompt import ChatTemplateMessages, expand_placeholders, load_chat_template, user_turn

DEFAULT_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def fit_inside(size: Tuple[int, int], target: Tuple[int, int]) -> Tuple[int, int]:
    """Aspect-preserving size that fits `target`, touching it on one side."""
    h, w = size
    th, tw = target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


class LlavaOnevisionImageProcessor:
    def __init__(
        self,
        size: int = 384,
        image_grid_pinpoints=None,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        rescale_factor: float = 1 / 255,
    ):
        self.size = size
        self.image_grid_pinpoints = image_grid_pinpoints or DEFAULT_PINPOINTS
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.rescale_factor = rescale_factor

    @classmethod
    def from_dict(cls, cfg: dict) -> "LlavaOnevisionImageProcessor":
        size = cfg.get("size", {"height": 384})
        size = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        return cls(
            size=int(size),
            image_grid_pinpoints=cfg.get("image_grid_pinpoints"),
            image_mean=cfg.get("image_mean", OPENAI_CLIP_MEAN),
            image_std=cfg.get("image_std", OPENAI_CLIP_STD),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
        )

    def _finish(self, chw: np.ndarray) -> np.ndarray:
        chw = resize(chw, (self.size, self.size))
        return rescale_and_normalize(chw, self.rescale_factor, self.image_mean, self.image_std)

    def anyres_crops(self, chw: np.ndarray) -> np.ndarray:
        """[base image] + row-major tile crops of the best-fitting grid, (N, 3, S, S)."""
        size = chw.shape[1:]
        target = select_best_resolution(size, self.image_grid_pinpoints)
        fitted = resize(chw, fit_inside(size, target))
        fh, fw = fitted.shape[1:]
        top, left = (target[0] - fh) // 2, (target[1] - fw) // 2
        canvas = np.zeros((3, *target), dtype=np.uint8)
        canvas[:, top : top + fh, left : left + fw] = fitted
        s = self.size
        crops = [
            canvas[:, i : i + s, j : j + s]
            for i in range(0, target[0], s)
            for j in range(0, target[1], s)
        ]
        return np.stack([self._finish(c) for c in [chw] + crops])

    def square(self, chw: np.ndarray) -> np.ndarray:
        """Multi-image path: pad to a square with the mean colour, one tile."""
        fill = [int(m * 255) for m in self.image_mean]
        return self._finish(pad_to_square(chw, fill))[None]

    def video_frames(self, frames: Sequence[ImageInput]) -> np.ndarray:
        return np.stack([self._finish(to_chw(load_image(f))) for f in frames])


class LlavaOnevisionProcessor(ChatTemplateMessages):
    """Images/video + text -> token ids with placeholders expanded, and pixels."""

    def __init__(self, image_processor, tokenizer, config, chat_template=None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size
        self.max_tiles = parse_max_tiles(config.vision_aspect_ratio)
        self.image_token_id = config.image_token_index
        self.video_token_id = config.video_token_index

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "LlavaOnevisionProcessor":
        path = Path(path)
        cfg_file = path / "preprocessor_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        cfg.setdefault("size", {"height": config.vision_config.image_size})
        cfg.setdefault("image_grid_pinpoints", config.image_grid_pinpoints)
        return cls(
            LlavaOnevisionImageProcessor.from_dict(cfg),
            tokenizer,
            config,
            chat_template=load_chat_template(path),
        )

    def image_layout(self, image_size: Tuple[int, int]) -> AnyResLayout:
        ip = self.image_processor
        return anyres_layout(
            image_size, ip.image_grid_pinpoints, ip.size, self.side, self.max_tiles
        )

    def num_image_tokens(self, image_size, multi_image: bool) -> int:
        if multi_image:
            return self.side * self.side + 1
        return self.image_layout(image_size).num_tokens(self.side)

    def num_prompt_tokens(self, text: str, image_sizes: Sequence[Tuple[int, int]]) -> int:
        """The prompt's length with images of these (width, height), before any is decoded."""
        multi = len(image_sizes) > 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        counts = [self.num_image_tokens((h, w), multi) for w, h in image_sizes]
        return len(expand_placeholders(ids, {self.image_token_id: ("image", counts)}))

    def num_video_tokens(self, num_frames: int) -> int:
        pooled = math.ceil(self.side / 2)
        return num_frames * pooled * pooled + 1

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        """A user turn with the images/videos placed as the chat template puts them."""
        fallback = "<image>\n" * num_images + "<video>\n" * num_videos + prompt
        return user_turn(self.tokenizer, self.chat_template, prompt, num_images, num_videos, fallback)

    def __call__(
        self,
        text: str,
        images: Optional[Sequence[ImageInput]] = None,
        videos: Optional[Sequence[Sequence[ImageInput]]] = None,
    ) -> ProcessedInputs:
        images = [load_image(i) for i in images or []]
        videos = list(videos or [])
        multi = len(images) > 1
        ip = self.image_processor
        arrays = [to_chw(i) for i in images]
        pixels = [ip.square(a) if multi else ip.anyres_crops(a) for a in arrays]
        sizes = [a.shape[1:] for a in arrays]
        frames = [ip.video_frames(v) for v in videos]

        ids = self.tokenizer.encode(text, add_special_tokens=False)
        expansions = {
            self.image_token_id: ("image", [self.num_image_tokens(s, multi) for s in sizes]),
            self.video_token_id: ("video", [self.num_video_tokens(len(f)) for f in frames]),
        }
        # pixel_values per image: (tiles, 3, S, S), the base view first
        return ProcessedInputs(expand_placeholders(ids, expansions), pixel_values=pixels, image_sizes=sizes,
                               multi_image=multi, video_frames=frames)


Processor = LlavaOnevisionProcessor
