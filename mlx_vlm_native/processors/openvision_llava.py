"""OpenVision-tower LLaVA processing: one square view per image (crop, pad or
stretch, as the checkpoint's `image_aspect_ratio` says), `<image>` placeholders
expanded to the tower's token count."""

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..models.base import ProcessedInputs
from ..models.openvision_llava import ModelArgs
from .image import FIT_PIXELS, ImageInput, load_image
from .prompt import ChatTemplateMessages, expand_placeholders, load_chat_template, user_turn


class Processor(ChatTemplateMessages):
    """Prompt + images -> token ids (placeholders expanded) and pixels."""

    def __init__(self, tokenizer, config: ModelArgs, chat_template=None):
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        vision = config.vision_config
        self.image_size = vision.image_size
        self.num_image_tokens = vision.grid * vision.grid
        self.image_token_id = config.image_token_index

    @classmethod
    def from_pretrained(cls, path: Path, tokenizer, config) -> "Processor":
        return cls(tokenizer, config, chat_template=load_chat_template(path))

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        if num_videos:
            raise ValueError("this model takes images, not videos")
        return user_turn(self.tokenizer, self.chat_template, prompt, num_images, 0, "<image>\n" * num_images + prompt)

    def pixels(self, image: ImageInput) -> np.ndarray:
        a = self.config
        x = FIT_PIXELS[a.image_aspect_ratio](load_image(image), self.image_size, a.image_mean, a.image_std)
        return x.transpose(2, 0, 1)[None]

    def tokenize(self, text: str) -> List[int]:
        """Token ids with each `<image>` as the image placeholder id (which may be
        outside the vocabulary, like LLaVA-1.5's -200)."""
        ids: List[int] = []
        for i, piece in enumerate(text.split("<image>")):
            if i:
                ids.append(self.image_token_id)
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def num_prompt_tokens(self, text: str, image_sizes: Sequence[Tuple[int, int]]) -> int:
        """The prompt's length with images of these sizes (all are fitted to one square)."""
        counts = [self.num_image_tokens] * len(image_sizes)
        return len(expand_placeholders(self.tokenize(text), {self.image_token_id: ("image", counts)}))

    def __call__(self, text: str, images: Optional[Sequence[ImageInput]] = None, videos=None) -> ProcessedInputs:
        if videos:
            raise ValueError("this model takes images, not videos")
        images = list(images or [])
        pixels = [self.pixels(i) for i in images]
        counts = [self.num_image_tokens] * len(images)
        ids = expand_placeholders(self.tokenize(text), {self.image_token_id: ("image", counts)})
        sizes = [(self.image_size, self.image_size)] * len(images)
        # pixel_values per image: (1, 3, S, S)
        return ProcessedInputs(ids, pixel_values=pixels, image_sizes=sizes, multi_image=len(images) > 1)
