"""The one image input layer: fetching (bounded), decoding, and the numpy/Pillow
transforms shared by the processors, captioning and training augmentation.

The processors' transforms reproduce transformers' Pillow backend: resizing
happens on uint8 pixels with Pillow, rescaling in float64 then float32,
normalising in float32, all channel-first. The one-square-view fits (crop, pad,
stretch) and the training crop give channel-last (H, W, 3) floats, as the
OpenVision tower reads them.
"""

import base64
import binascii
import http.client
import io
import socket
import threading
import time
from pathlib import Path
from typing import Sequence, Tuple, Union
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Decoding is refused above this many pixels (a 16k x 12k photo); Pillow's own
# bomb check would otherwise only warn below 179 MP.
MAX_IMAGE_PIXELS = 200_000_000
MAX_FETCH_BYTES = 50_000_000  # an image URL's body
FETCH_TIMEOUT = 30.0  # seconds for a whole image download, redirects included
MAX_REDIRECTS = 5

ImageInput = Union[str, Path, Image.Image, np.ndarray, bytes]


class ImageError(ValueError):
    pass


class ImageTooLargeError(ImageError):
    """Over a byte or pixel limit (the server answers 413)."""


def short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


# ---------------------------------------------------------------- bytes in


def read_data_url(url: str, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """The image bytes of a data:image/...;base64, URL; the size is checked before decoding."""
    header, comma, payload = url.partition(",")
    media_type = header[len("data:"):].split(";")[0]
    if not comma or not media_type.startswith("image/") or ";base64" not in header:
        raise ImageError(f"data URLs must be data:image/...;base64,<data>; got {short(url)!r}")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageTooLargeError(f"the data URL image is {len(payload) * 3 // 4} bytes, over the limit of "
                                 f"{max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data URL image is not valid base64: {e}")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the data URL image is {len(data)} bytes, over the limit of {max_bytes} bytes")
    return data


def _abort(sock: socket.socket) -> None:
    """Unblock a read in progress on `sock` (the download's deadline has passed)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def fetch_url(url: str, max_bytes: int = MAX_FETCH_BYTES, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The body of an http(s) URL, redirects followed (to http(s) only).

    `timeout` is a wall-clock deadline for the whole download: a watchdog shuts
    the socket down when it passes, so a host that trickles bytes cannot hold a
    read open. At most `max_bytes` are read (a declared Content-Length over it
    is refused before the body is read)."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageError(f"image URLs must be http:// or https://; got {short(url)!r}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        try:
            connection = kind(parts.hostname or "", parts.port, timeout=remaining)
            connection.connect()  # the response may take the socket over: keep it for the watchdog
        except (ValueError, http.client.InvalidURL, OSError) as e:
            if time.monotonic() >= deadline:
                break
            raise ImageError(f"cannot fetch the image at {short(url)}: {e}")
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0), _abort, (connection.sock,))
        watchdog.daemon = True
        watchdog.start()
        response = None
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": "mlx-vlm-native", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ImageError(f"cannot fetch the image at {short(url)}: HTTP Error {response.status}: "
                                 f"{response.reason}")
            declared = response.getheader("Content-Length") or ""
            if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
                raise ImageTooLargeError(f"the image at {short(url)} is {int(declared)} bytes, over the limit "
                                         f"of {max_bytes} bytes")
            chunks, size = [], 0
            while chunk := response.read1(min(65536, max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageTooLargeError(f"the image at {short(url)} is over the limit of {max_bytes} bytes")
            if time.monotonic() >= deadline:  # the watchdog cut it short
                break
            return b"".join(chunks)
        except (OSError, http.client.HTTPException, ValueError) as e:
            if isinstance(e, ImageError):
                raise
            if time.monotonic() >= deadline:
                break
            raise ImageError(f"cannot fetch the image at {short(url)}: {e}")
        finally:
            watchdog.cancel()
            if response is not None:
                response.close()
            connection.close()
    else:
        raise ImageError(f"the image at {short(url)} redirected more than {MAX_REDIRECTS} times")
    raise ImageError(f"the image at {short(url)} was not downloaded within {timeout:g} s")


def open_source(source: Union[str, Path]) -> Image.Image:
    """The header of an image path, http(s) URL or data URL (URLs bounded by
    the default byte cap and deadline; a local file is read lazily)."""
    s = str(source)
    scheme = urlsplit(s).scheme.lower() if ("://" in s or s.startswith("data:")) else ""
    if scheme in ("http", "https"):
        return open_image(fetch_url(s), f"the image at {short(s)}")
    if scheme == "data":
        return open_image(read_data_url(s), "the data URL image")
    if not Path(s).is_file():
        raise ImageError(f"image not found: {s}")
    try:
        return Image.open(s)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{s}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{s} is not a readable image: {e}") from e


# ---------------------------------------------------------------- decoding


def open_image(data: bytes, name: str = "<image>") -> Image.Image:
    """The image's header only (nothing decoded yet): size and mode are known."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is not a readable image: {e}") from e


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: as stored); a broken EXIF block counts as none.
    Reading it never decodes pixels: Pillow's PNG `getexif` decodes the whole
    image to look for an eXIf chunk after the pixel data, so an undecoded PNG
    is read from the chunks before its pixels only (once decoded, all of them)."""
    if image.format == "PNG" and "exif" not in image.info and getattr(image, "_im", None) is None:
        return 1
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # EXIF parsing raises a variety of errors on junk
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(image: Image.Image) -> Tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the sides."""
    w, h = image.size
    return (h, w) if orientation(image) in (5, 6, 7, 8) else (w, h)


def check_pixels(image: Image.Image, name: str, max_pixels: int) -> Tuple[int, int]:
    w, h = image.size
    if w == 0 or h == 0:
        raise ImageError(f"{name} is empty ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels; "
                                 "downscale it first")
    return w, h


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    """16- and 32-bit integer grayscale as 8-bit L, scaled (not clipped)."""
    if image.mode.startswith("I;16"):
        a = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode == "I":  # Pillow's 32-bit integer mode: 16-bit PNG/TIFF data in older Pillows
        a = np.asarray(image)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{name}: 32-bit integer pixels outside 0..65535 are not supported; "
                             "save it as 8- or 16-bit")
        return Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode == "F":
        raise ImageError(f"{name}: floating-point images (mode F) are not supported; save it as 8- or 16-bit")
    return image


def load_image(source: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image from a path, URL, data URL, encoded bytes, array or PIL image, as RGB.

    The size is checked from the header before decoding. EXIF orientation is
    applied, 16-bit grayscale is scaled to 8 bits, palette and CMYK images are
    converted, and transparent images are composited on white, as transformers
    does; a mode that cannot be shown as RGB is refused by name.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageError("array images must be uint8 HxW or HxWxC")
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        name, image = "<image>", source
    elif isinstance(source, (bytes, bytearray)):
        name, image = "<image bytes>", open_image(bytes(source))
    else:
        name, image = str(source)[:200], open_source(source)
    check_pixels(image, name, max_pixels)
    try:
        image.load()
        if orientation(image) != 1:  # exif_transpose copies even when there is nothing to do
            image = ImageOps.exif_transpose(image)
        image = _to_8bit(image, name)
        has_alpha = "A" in image.getbands() or "a" in image.mode or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        raise ImageError(f"cannot read image {name}: {e}") from e
    except ValueError as e:  # e.g. a mode Pillow cannot convert to RGB
        raise ImageError(f"cannot read image {name} (mode {image.mode}): {e}") from e


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


# ---- one square view: what a square-input tower (OpenVision, SigLIP-style) is fed


def normalise(x: np.ndarray, mean, std) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> (x - mean) / std."""
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def center_crop_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """Resize the short side to `size` (bilinear), center-crop, normalise: (size, size, 3).

    Only the crop is resampled (Pillow's `box`, the same source-to-output mapping
    as resizing the whole image), so the memory is O(size²) whatever the aspect ratio."""
    w, h = image.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (rw - size) // 2, (rh - size) // 2
    sx, sy = rw / w, rh / h
    box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
    x = np.asarray(image.resize((size, size), Image.BILINEAR, box=box), dtype=np.float32) / 255.0
    return normalise(x, mean, std)


PAD_CANVAS_FACTOR = 4  # the padded square is at most this many times the output side


def pad_to_square_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """LLaVA-1.5's "pad": centre the image on a square of the mean colour (no
    part is lost, whatever the aspect ratio), resize to `size` (bicubic), normalise.

    An image whose square would be over PAD_CANVAS_FACTOR x `size` on a side is
    first shrunk by an integer factor (box filter), so a 200000x200 image costs
    O(size²) memory rather than a 200000² canvas."""
    w, h = image.size
    factor = -(-max(w, h) // (PAD_CANVAS_FACTOR * size))
    if factor > 1:
        image = image.reduce(factor)
    fill = tuple(int(round(255 * m)) for m in mean)
    square = Image.fromarray(pad_to_square(to_chw(image.convert("RGB")), fill).transpose(1, 2, 0))
    x = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return normalise(x, mean, std)


def resize_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """Stretch to a `size` square (bicubic), normalise: nothing is cut or padded,
    and the picture's thirds always fall on the same pixels, whatever its aspect ratio."""
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return normalise(x, mean, std)


FIT_PIXELS = {"crop": center_crop_pixels, "pad": pad_to_square_pixels, "resize": resize_pixels}


def inception_crop(image: Image.Image, size: int, area_min: float, rng) -> Image.Image:
    """A random crop of `area_min`..100% of the area, aspect ratio 3/4..4/3
    (log-uniform), resized to size x size (bilinear); centre crop if 10 tries fail."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(area_min, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def load_video_frames(source: Union[str, Path], num_frames: int = 8) -> list:
    """`num_frames` frames sampled uniformly from a folder of images (sorted by
    name) or an animated GIF/WebP/TIFF; only the sampled frames are decoded."""
    if num_frames < 1:
        raise ImageError("num_frames must be at least 1")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ImageError(f"no image frames in {path}")
        picks = np.linspace(0, len(files) - 1, min(num_frames, len(files))).round().astype(int)
        return [load_image(files[i]) for i in picks]
    image = open_source(path)
    count = getattr(image, "n_frames", 1)
    picks = np.linspace(0, count - 1, min(num_frames, count)).round().astype(int)
    frames = []
    for i in picks:
        try:
            image.seek(int(i))
        except (EOFError, OSError, ValueError) as e:
            raise ImageError(f"{path}: cannot read frame {i} of {count}: {e}") from e
        frames.append(load_image(image.copy()))
    return frames
