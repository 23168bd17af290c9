"""POINTS1.5 preprocessing: Qwen2-VL's, with POINTS' own prompt format (no
system turn; each image as `<|vision_start|>` pads `<|vision_end|>` + newline
before the text) and images only."""

from .qwen2_vl import Qwen2VLProcessor


class PointsProcessor(Qwen2VLProcessor):
    def format_messages(self, messages: list, add_generation_prompt: bool = True) -> str:
        text = ""
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                if any(part["type"] == "video" for part in content):
                    raise ValueError("POINTS1.5 takes images only, not video")
                content = "".join(
                    self.image_placeholder() + "\n" if part["type"] == "image" else part.get("text", "")
                    for part in content
                )
            text += f"<|im_start|>{message['role']}\n{content}<|im_end|>\n"
        if add_generation_prompt and messages and messages[-1]["role"] == "user":
            text += "<|im_start|>assistant\n"
        return text

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        return self.format_messages([{"role": "user", "content": content + [{"type": "text", "text": prompt}]}])

    def __call__(self, text, images=None, videos=None):
        if videos:
            raise ValueError("POINTS1.5 takes images only, not video")
        return super().__call__(text, images)


Processor = PointsProcessor
