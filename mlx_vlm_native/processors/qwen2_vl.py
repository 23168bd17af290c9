"""Qwen2-VL / Qwen2.5-VL preprocessing: every image and video at (nearly) its
native resolution, patchified and packed into one sequence, with
`<|image_pad|>` / `<|video_pad|>` expanded to the merged token counts."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..models.base import IMAGE, TEXT, VIDEO, ProcessedInputs
from ..native.packing import pack, patchify, smart_resize
from .image import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput, load_image, rescale_and_normalize, resize, to_chw,
)
from .prompt import ChatTemplateMessages, expand_placeholders, load_chat_template, user_turn


@dataclass
class Qwen2VLImageProcessor:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, cfg: dict) -> "Qwen2VLImageProcessor":
        size = cfg.get("size") or {}
        return cls(
            patch_size=cfg.get("patch_size", 14),
            merge_size=cfg.get("merge_size", 2),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            # `size` holds pixel counts under edge-like names (a transformers quirk)
            min_pixels=cfg.get("min_pixels") or size.get("shortest_edge", 56 * 56),
            max_pixels=cfg.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280),
            image_mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
        )

    def target_size(self, height: int, width: int) -> Tuple[int, int]:
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def frames(self, frames: Sequence[np.ndarray], size: Tuple[int, int]):
        """(C, H, W) uint8 frames, all resized to `size` -> patches and grid."""
        x = np.stack([
            rescale_and_normalize(resize(f, size), self.rescale_factor, self.image_mean, self.image_std)
            for f in frames
        ])
        return patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)

    def image(self, image: ImageInput):
        chw = to_chw(load_image(image))
        return self.frames([chw], self.target_size(*chw.shape[1:]))

    def video(self, frames: Sequence[ImageInput]):
        chws = [to_chw(load_image(f)) for f in frames]
        if not chws:
            raise ValueError("a video needs at least one frame")
        return self.frames(chws, self.target_size(*chws[0].shape[1:]))


class Qwen2VLProcessor(ChatTemplateMessages):
    image_pad = "<|image_pad|>"
    video_pad = "<|video_pad|>"
    vision_start, vision_end = "<|vision_start|>", "<|vision_end|>"

    def __init__(self, image_processor, tokenizer, config, chat_template=None, fps: float = 2.0):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = getattr(config, "image_token_id", None) or ids(self.image_pad)
        self.video_token_id = getattr(config, "video_token_id", None) or ids(self.video_pad)
        self.fps = fps  # assumed frame rate of --video frames (Qwen2.5-VL time positions)

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config):
        path = Path(path)
        cfg_file = path / "preprocessor_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        vision = config.vision_config
        cfg.setdefault("patch_size", vision.patch_size)
        cfg.setdefault("merge_size", vision.spatial_merge_size)
        cfg.setdefault("temporal_patch_size", vision.temporal_patch_size)
        return cls(Qwen2VLImageProcessor.from_dict(cfg), tokenizer, config, load_chat_template(path))

    def image_placeholder(self) -> str:
        return self.vision_start + self.image_pad + self.vision_end

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        fallback = (
            self.image_placeholder() * num_images
            + (self.vision_start + self.video_pad + self.vision_end) * num_videos + prompt
        )
        return user_turn(self.tokenizer, self.chat_template, prompt, num_images, num_videos, fallback)

    def num_prompt_tokens(self, text: str, image_sizes: Sequence[Tuple[int, int]]) -> int:
        """The prompt's length with images of these (width, height), before any is decoded."""
        ip = self.image_processor
        patch = ip.patch_size * ip.merge_size
        counts = [(h * w) // patch**2 for h, w in (ip.target_size(h, w) for w, h in image_sizes)]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return len(expand_placeholders(ids, {self.image_token_id: ("image", counts)}))

    def __call__(
        self,
        text: str,
        images: Optional[Sequence[ImageInput]] = None,
        videos: Optional[Sequence[Sequence[ImageInput]]] = None,
    ) -> ProcessedInputs:
        ip = self.image_processor
        items = [ip.image(i) for i in images or []]
        n_images = len(items)
        items += [ip.video(v) for v in videos or []]
        grids = [grid for _, grid in items]
        merge2 = ip.merge_size**2
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = expand_placeholders(ids, {
            self.image_token_id: ("image", [int(np.prod(g)) // merge2 for g in grids[:n_images]]),
            self.video_token_id: ("video", [int(np.prod(g)) // merge2 for g in grids[n_images:]]),
        })
        types = np.where(ids == self.image_token_id, IMAGE, np.where(ids == self.video_token_id, VIDEO, TEXT))
        return ProcessedInputs(
            ids, token_types=types.astype(np.int32), pack=pack(items, ip.merge_size) if items else None,
            image_grids=grids[:n_images], video_grids=grids[n_images:],
            video_seconds_per_grid=[ip.temporal_patch_size / self.fps] * (len(items) - n_images),
        )


Processor = Qwen2VLProcessor
