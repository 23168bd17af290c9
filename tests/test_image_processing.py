"""Our numpy/Pillow preprocessing against transformers' Pillow image processor."""

import numpy as np
import pytest

from conftest import make_image
from mlx_vlm_native.models.llava_onevision import select_best_resolution
from mlx_vlm_native.processors.image import ImageError, load_image, to_chw
from mlx_vlm_native.processors.llava_onevision import LlavaOnevisionImageProcessor

SIZES = [(384, 384), (500, 800), (1000, 300), (300, 1000), (37, 901), (2000, 2200), (1200, 1900)]


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil()


@pytest.mark.parametrize("h,w", SIZES)
def test_anyres_pixels_match_transformers(hf_processor, h, w):
    image = make_image(h, w, seed=h + w)
    ref = hf_processor(images=image, return_tensors="np")
    n_tiles = ref["pixel_values"].shape[1]
    ours = LlavaOnevisionImageProcessor().anyres_crops(to_chw(image))
    assert ours.shape == (n_tiles, 3, 384, 384)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref["pixel_values"][0]).max() <= 1e-5
    assert tuple(ref["image_sizes"][0]) == (h, w)


def test_multi_image_pixels_match_transformers(hf_processor):
    images = [make_image(200, 500, 1), make_image(640, 320, 2)]
    ref = hf_processor(images=[images], return_tensors="np")
    assert list(ref["batch_num_images"]) == [2]
    ip = LlavaOnevisionImageProcessor()
    for i, image in enumerate(images):
        ours = ip.square(to_chw(image))
        assert ours.shape == (1, 3, 384, 384)
        assert np.abs(ours[0] - ref["pixel_values"][i, 0]).max() <= 1e-5


def test_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as ref

    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    rng = np.random.default_rng(0)
    for h, w in rng.integers(10, 5000, size=(200, 2)):
        assert select_best_resolution((int(h), int(w)), pinpoints) == tuple(ref((h, w), pinpoints))


def test_rgba_and_grayscale_inputs_become_rgb(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (10, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    gray = Image.new("L", (10, 8), 77)
    assert np.asarray(load_image(gray)).shape == (8, 10, 3)


def test_corrupt_missing_and_huge_images_are_refused(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageError, match="bad.png is not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    big = tmp_path / "big.png"
    from PIL import Image

    Image.new("RGB", (4000, 3000)).save(big)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(big, max_pixels=10_000_000)


def encoded(image, fmt: str = "PNG", **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_16_bit_grayscale_is_scaled_not_clipped():
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    decoded = np.asarray(load_image(encoded(Image.fromarray(ramp))))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded[..., 0].astype(int) - expected).max() <= 1
    assert (decoded[..., 0] == decoded[..., 2]).all() and decoded.min() == 0 and decoded.max() >= 254


def test_palette_cmyk_alpha_and_exif_orientation_decode_faithfully():
    from PIL import Image

    palette = Image.new("P", (6, 4))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 6, 4))
    assert np.asarray(load_image(encoded(palette)))[0, 0].tolist() == [10, 200, 30]
    transparent = palette.copy()
    transparent.info["transparency"] = 1  # the palette's transparent index: white behind it
    assert np.asarray(load_image(encoded(transparent, transparency=1)))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert np.asarray(load_image(encoded(cmyk, "TIFF")))[0, 0].tolist() == [255, 0, 0]
    half = Image.new("LA", (4, 4), (0, 128))  # black at half opacity over white -> mid gray
    assert abs(int(np.asarray(load_image(encoded(half)))[0, 0, 0]) - 127) <= 1
    # a 6x4 JPEG whose EXIF says "rotate 90° clockwise to display": shown 4 wide, 6 tall
    left_red = Image.new("RGB", (6, 4), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 3, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = load_image(encoded(left_red, "PNG", exif=exif))
    assert shown.size == (4, 6)
    assert np.asarray(shown)[0, 1].tolist() == [255, 0, 0] and np.asarray(shown)[5, 1].tolist() == [0, 0, 255]


def test_modes_without_an_rgb_meaning_are_refused_by_name():
    from PIL import Image

    floats = Image.fromarray(np.ones((4, 4), np.float32))
    with pytest.raises(ImageError, match=r"floating-point images \(mode F\)"):
        load_image(encoded(floats, "TIFF"))


def test_header_size_is_checked_before_decoding():
    from PIL import Image

    from mlx_vlm_native.processors.image import ImageTooLargeError

    data = encoded(Image.new("L", (5000, 5000)))  # 25 MP in a small file
    with pytest.raises(ImageTooLargeError, match="5000x5000 = 25000000 pixels"):
        load_image(data, max_pixels=1_000_000)


def test_pad_and_crop_cost_output_memory_whatever_the_aspect_ratio():
    from PIL import Image

    from mlx_vlm_native.processors.image import center_crop_pixels, pad_to_square_pixels

    mean = std = (0.5, 0.5, 0.5)
    strip = Image.new("RGB", (200_000, 200), (255, 0, 0))  # a 200000² canvas would be 120 GB
    padded = pad_to_square_pixels(strip, 64, mean, std)
    assert padded.shape == (64, 64, 3)
    # a 0.064-pixel red line on the mean-colour pad: only a tint of it is left in the middle row
    assert np.allclose(padded[0], 0, atol=0.01) and padded[32, 32, 0] > padded[32, 32, 1] + 0.05
    cropped = center_crop_pixels(Image.new("RGB", (200, 200_000), (0, 0, 255)), 64, mean, std)
    assert cropped.shape == (64, 64, 3) and np.allclose(cropped, [-1, -1, 1], atol=0.01)


def test_pad_to_square_pixels_equals_pasting_on_a_mean_colour_square():
    """The one-square "pad" fit is Pillow's own paste-and-resize, to the bit."""
    from PIL import Image

    from conftest import make_image
    from mlx_vlm_native.processors.image import PAD_CANVAS_FACTOR, pad_to_square_pixels

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    fill = tuple(int(round(255 * m)) for m in mean)
    for h, w, size in [(20, 60, 28), (61, 40, 28), (50, 50, 32), (33, 500, 28), (900, 70, 56)]:
        image = make_image(h, w)
        factor = -(-max(w, h) // (PAD_CANVAS_FACTOR * size))
        source = image.reduce(factor) if factor > 1 else image
        side = max(source.size)
        square = Image.new("RGB", (side, side), fill)
        square.paste(source, ((side - source.width) // 2, (side - source.height) // 2))
        reference = np.asarray(square.resize((size, size), Image.BICUBIC), np.float32) / 255.0
        reference = (reference - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        np.testing.assert_array_equal(pad_to_square_pixels(image, size, mean, std), reference)


def test_center_crop_equals_resize_then_crop():
    from PIL import Image

    from conftest import make_image
    from mlx_vlm_native.processors.image import center_crop_pixels

    for h, w, size in [(60, 90, 56), (300, 200, 224), (97, 1203, 56), (500, 333, 224)]:
        image = make_image(h, w)
        scale = size / min(w, h)
        whole = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (whole.width - size) // 2, (whole.height - size) // 2
        reference = np.asarray(whole.crop((left, top, left + size, top + size)), np.float32) / 255
        ours = center_crop_pixels(image, size, (0, 0, 0), (1, 1, 1))
        assert np.abs(ours - reference).max() <= 1 / 255 + 1e-6  # one uint8 step at most
