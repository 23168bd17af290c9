"""mlx-vlm-native: vision-language models on MLX."""

__version__ = "0.1.0"

from .utils import load  # noqa: E402
from .generate import batch_generate, chat_generate, generate, stream_chat, stream_generate  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "batch_generate", "chat_generate", "stream_chat", "__version__"]
