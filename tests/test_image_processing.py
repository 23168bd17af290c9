"""Our numpy/Pillow preprocessing against transformers' Pillow image processor."""

import numpy as np
import pytest

from conftest import make_image
from mlx_vlm_native.processors.image import ImageError, load_image, to_chw
from mlx_vlm_native.processors.llava_onevision import (
    LlavaOnevisionImageProcessor,
    select_best_resolution,
)

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
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    big = tmp_path / "big.png"
    from PIL import Image

    Image.new("RGB", (4000, 3000)).save(big)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(big, max_pixels=10_000_000)
