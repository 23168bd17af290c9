"""What every VLM family's processor implements; generate, chat, serve and
finetuning use a processor only through this."""

from typing import Optional, Sequence, Tuple

from ..models.base import ProcessedInputs


class Processor:
    """A prompt (or a whole conversation) and its images/videos -> one
    `ProcessedInputs`. `tokenizer` is the family's mlx-lm tokenizer;
    `image_token_id` / `video_token_id` are the placeholders the processor
    expands (None for a kind the family does not take)."""

    tokenizer = None
    image_token_id: Optional[int] = None
    video_token_id: Optional[int] = None

    def format_prompt(self, prompt: str, num_images: int = 0, num_videos: int = 0) -> str:
        """One user turn with its media placeholders, ready for the answer."""
        raise NotImplementedError

    def format_messages(self, messages: list, add_generation_prompt: bool = True) -> str:
        """A conversation ({"role", "content"} messages) as one prompt."""
        raise ValueError(
            f"{type(self).__name__} cannot render a conversation; use a single prompt with generate instead"
        )

    def num_prompt_tokens(self, text: str, image_sizes: Sequence[Tuple[int, int]]) -> int:
        """The prompt's length with images of these (width, height), before any is decoded."""
        raise NotImplementedError

    def __call__(self, text: str, images=None, videos=None) -> ProcessedInputs:
        raise NotImplementedError
