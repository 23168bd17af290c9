"""POINTS1.5 preprocessing: Qwen2-VL's, with POINTS' own prompt format (no
system turn; each image as `<|vision_start|>` pads `<|vision_end|>` + newline
before the text) and images only."""

from .qwen2_vl import Qwen2VLProcessor


class PointsProcessor(Qwen2VLProcessor):
    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        if num_videos:
            raise ValueError("POINTS1.5 takes images only, not video")
        images = (self.image_placeholder() + "\n") * num_images
        return f"<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def __call__(self, text, images=None, videos=None):
        if videos:
            raise ValueError("POINTS1.5 takes images only, not video")
        return super().__call__(text, images)


Processor = PointsProcessor
