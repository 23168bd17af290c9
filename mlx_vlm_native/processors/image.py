"""Image loading and the numpy/Pillow transforms shared by the processors.

The transforms reproduce transformers' Pillow backend: resizing happens on
uint8 pixels with Pillow, rescaling in float64 then float32, normalising in
float32, all channel-first.
"""

import base64
import io
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Decoding is refused above this many pixels (a 16k x 12k photo); Pillow's own
# bomb check would otherwise only warn below 179 MP.
MAX_IMAGE_PIXELS = 200_000_000

ImageInput = Union[str, Path, Image.Image, np.ndarray]


class ImageError(ValueError):
    pass


def _open_source(source: Union[str, Path]) -> Image.Image:
    s = str(source)
    if s.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(s, timeout=30) as r:
            return Image.open(io.BytesIO(r.read()))
    if s.startswith("data:image"):
        return Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
    if not Path(s).exists():
        raise ImageError(f"image not found: {s}")
    return Image.open(s)


def load_image(source: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image from a path, URL, data URL, array or PIL image, as RGB.

    Transparent images are composited on white, as transformers does.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageError("array images must be uint8 HxW or HxWxC")
        source = Image.fromarray(source)
    name = "<image>" if isinstance(source, Image.Image) else str(source)[:200]
    try:
        image = source if isinstance(source, Image.Image) else _open_source(source)
        w, h = image.size
        if w * h > max_pixels:
            raise ImageError(
                f"{name} is {w}x{h} = {w * h / 1e6:.0f} MP, over the limit of "
                f"{max_pixels / 1e6:.0f} MP; downscale it first"
            )
        if w == 0 or h == 0:
            raise ImageError(f"{name} is empty ({w}x{h})")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read image {name}: {e}") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from e
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image).transpose(2, 0, 1)


def resize(chw: np.ndarray, size: Tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    """Resize a uint8 CHW array to (height, width) with Pillow."""
    h, w = size
    if chw.shape[1:] == (h, w):
        return chw
    out = Image.fromarray(chw.transpose(1, 2, 0)).resize((w, h), resample=resample)
    return np.asarray(out).transpose(2, 0, 1)


def rescale_and_normalize(
    chw: np.ndarray, scale: float, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    x = (chw.astype(np.float64) * scale).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]
    std = np.asarray(std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def pad_to_square(chw: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    c, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    out = np.empty((c, side, side), dtype=chw.dtype)
    out[:] = np.asarray(fill, dtype=chw.dtype)[:, None, None]
    if w > h:
        top = (side - h) // 2
        out[:, top : top + h, :] = chw
    else:
        left = (side - w) // 2
        out[:, :, left : left + w] = chw
    return out


def load_video_frames(source: Union[str, Path], num_frames: int = 8) -> list:
    """`num_frames` frames sampled uniformly from a folder of images (sorted by
    name) or an animated GIF/WebP/TIFF."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ImageError(f"no image frames in {path}")
        frames = files
    else:
        from PIL import ImageSequence

        image = _open_source(path)
        frames = [load_image(f.copy()) for f in ImageSequence.Iterator(image)]
    if num_frames < 1:
        raise ImageError("num_frames must be at least 1")
    picks = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int)
    return [frames[i] if isinstance(frames[i], Image.Image) else load_image(frames[i]) for i in picks]
