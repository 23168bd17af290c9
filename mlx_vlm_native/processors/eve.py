"""EVE v1 preprocessing, and the prompts of both EVE versions.

EVE v1, any aspect ratio: the long side is scaled to exactly `image_size` (672, or
1344 for the HD model), the short side to a multiple of
`patch_stride * image_size // image_size_clip` pixels, and the image is centred
on a square canvas of the mean colour. A fourth channel marks the valid pixels.
The sizes are computed at the teacher's (CLIP) resolution first, then scaled,
as the reference does, so the patch grid lines up with the teacher's.

EVEv2's (`eve_v2.py`) has no canvas and no mask; the prompts are these.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..models.base import ProcessedInputs
from .base import Processor
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput, load_image, rescale_and_normalize

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_ROLES = ("USER", "ASSISTANT")


def vicuna_v1_prompt(turns: Sequence[Tuple[str, Optional[str]]], system: str = VICUNA_V1_SYSTEM) -> str:
    """`conv_vicuna_v1`: "{system} USER: q ASSISTANT: a</s>USER: q ASSISTANT:".

    `turns` are (question, answer) pairs; a None answer opens the assistant turn."""
    text = system + " "
    for question, answer in turns:
        text += f"{VICUNA_V1_ROLES[0]}: {question} {VICUNA_V1_ROLES[1]}:"
        if answer is not None:
            text += f" {answer}</s>"
    return text


def plain_prompt(caption: str) -> str:
    """`conv_eve_plain` (pre-training stages): the image, the caption, a newline."""
    return IMAGE_TOKEN + caption + "\n"


@dataclass(frozen=True)
class CanvasLayout:
    """Where the resized image sits on the square canvas, in pixels."""

    size: int  # canvas side
    width: int  # resized image
    height: int
    left: int
    top: int


def canvas_layout(image_size: Tuple[int, int], size: int, clip_size: int, clip_patch: int) -> CanvasLayout:
    """(width, height) -> layout on a `size` canvas, computed on the `clip_size`
    grid of `clip_patch` patches and scaled by `size // clip_size`."""
    w, h = image_size
    max_patches = clip_size // clip_patch
    long_side, short_side = max(w, h), min(w, h)
    # ceil(clip_size * short / long / patch) in exact integer arithmetic
    short_patches = -(-clip_size * short_side // (long_side * clip_patch))
    short_patches = max(1, min(short_patches, max_patches))
    pre = (max_patches - short_patches) // 2 * clip_patch
    ratio = size // clip_size
    short_px, long_px = short_patches * clip_patch * ratio, clip_size * ratio
    if w >= h:
        return CanvasLayout(size, long_px, short_px, 0, pre * ratio)
    return CanvasLayout(size, short_px, long_px, pre * ratio, 0)


def pad_to_canvas(
    image: Image.Image, layout: CanvasLayout, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """-> (4, S, S) float32: normalised RGB on a mean-colour canvas + 0/1 mask."""
    resized = image.resize((layout.width, layout.height))  # PIL's default filter, as the reference
    S = layout.size
    canvas = Image.new("RGB", (S, S), tuple(int(m * 255) for m in mean))
    canvas.paste(resized, (layout.left, layout.top))
    rgb = rescale_and_normalize(np.asarray(canvas).transpose(2, 0, 1), 1 / 255, mean, std)
    mask = np.zeros((1, S, S), np.float32)
    mask[0, layout.top : layout.top + layout.height, layout.left : layout.left + layout.width] = 1
    return np.concatenate([rgb, mask])


@dataclass
class EVEImageProcessor:
    image_size: int = 672
    image_size_clip: int = 336
    patch_stride: int = 14
    patch_stride_clip: int = 14
    conv_stride: int = 2
    image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.image_size % self.image_size_clip or self.image_size_clip % self.patch_stride_clip:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of image_size_clip "
                f"{self.image_size_clip}, itself a multiple of patch_stride_clip {self.patch_stride_clip}"
            )

    @classmethod
    def from_dict(cls, cfg: dict, vision_tower: str = "") -> "EVEImageProcessor":
        # without the preprocessor json, the size comes from the tower name
        # ("...-anypixel-1344" is the HD model)
        default_size = 1344 if vision_tower.endswith("1344") else 672
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        fields.setdefault("image_size", default_size)
        for k in ("image_mean", "image_std"):
            if k in fields:
                fields[k] = tuple(fields[k])
        return cls(**fields)

    @property
    def strides(self) -> Tuple[int, int]:
        """(patch, conv) strides, which the model's must equal."""
        return self.patch_stride, self.conv_stride

    def layout(self, image_size: Tuple[int, int], size: Optional[int] = None) -> CanvasLayout:
        return canvas_layout(image_size, size or self.image_size, self.image_size_clip, self.patch_stride_clip)

    def grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) of the pooled token grid for an image of (width, height)."""
        lay = self.layout(image_size)
        cell = self.patch_stride * self.conv_stride
        return lay.height // cell, lay.width // cell

    def num_tokens(self, image_size: Tuple[int, int]) -> int:
        h, w = self.grid(image_size)
        return 1 + h * (w + 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return pad_to_canvas(image, self.layout(image.size), self.image_mean, self.image_std)

    def teacher_pixels(
        self, image: Image.Image, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
    ) -> np.ndarray:
        """The same layout at the teacher's resolution (`image_size_clip`)."""
        layout = self.layout(image.size, size=self.image_size_clip)
        return pad_to_canvas(image, layout, mean, std)


class EVEProcessor(Processor):
    def __init__(self, image_processor, tokenizer, config=None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = getattr(config, "image_token_index", IMAGE_TOKEN_INDEX)

    image_processor_class = EVEImageProcessor

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "EVEProcessor":
        f = Path(path) / "preprocessor_config.json"
        cfg = json.loads(f.read_text()) if f.exists() else {}
        image_processor = cls.image_processor_class.from_dict(cfg, getattr(config, "mm_vision_tower", ""))
        strides = image_processor.strides
        if strides != (config.patch_stride, config.conv_stride):
            raise ValueError(
                f"preprocessor strides {strides} differ from the model's "
                f"({config.patch_stride}, {config.conv_stride})"
            )
        return cls(image_processor, tokenizer, config)

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        """`vicuna_v1` (v1). EVEv2's `qwen_v2` is taken to render one user turn the
        same way (its separator after answers, <|im_end|>, does not show here)."""
        if num_videos:
            raise ValueError("EVE does not take videos")
        if num_images > 1:
            raise ValueError(f"EVE v1 takes one image per prompt, got {num_images}")
        question = IMAGE_TOKEN + "\n" + prompt if num_images else prompt
        return vicuna_v1_prompt([(question, None)])

    def tokenize(self, text: str) -> List[int]:
        """The reference's `tokenizer_image_token`: each text chunk is tokenized on
        its own (BOS kept only on the first) and <image> becomes one -200."""
        chunks = [self.tokenizer.encode(c) for c in text.split(IMAGE_TOKEN)]
        bos = self.tokenizer.bos_token_id
        ids = []
        if chunks[0] and chunks[0][0] == bos:
            ids.append(bos)
            chunks = [c[1:] if c and c[0] == bos else c for c in chunks]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(self.image_token_id)
            ids.extend(chunk)
        return ids

    def expand(self, ids: Sequence[int], grids: Sequence[Tuple[int, int]]) -> np.ndarray:
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != len(grids):
            raise ValueError(
                f"the prompt has {found} image placeholder(s) but {len(grids)} image(s) were given"
            )
        out, n = [], iter(1 + h * (w + 1) for h, w in grids)
        for t in ids:
            out.extend([t] * next(n) if t == self.image_token_id else [t])
        return np.array(out, dtype=np.int32)

    def num_prompt_tokens(self, text: str, image_sizes: Sequence[Tuple[int, int]]) -> int:
        """The prompt's length with images of these (width, height), before any is decoded."""
        grids = [self.image_processor.grid(size) for size in image_sizes]
        return len(self.expand(self.tokenize(text), grids))

    def __call__(self, text: str, images: Optional[Sequence[ImageInput]] = None, videos=None) -> ProcessedInputs:
        if videos:
            raise ValueError("EVE does not take videos")
        images = [load_image(i) for i in images or []]
        pixels = [self.image_processor(i) for i in images]
        grids = [self.image_processor.grid(i.size) for i in images]
        # -200 at the image positions; pixel_values per image: (4, S, S) RGB + mask (v1), (3, H, W) (v2)
        return ProcessedInputs(self.expand(self.tokenize(text), grids), pixel_values=pixels, image_grids=grids)


Processor = EVEProcessor
