"""Patch n' pack and packed attention: against transformers' Qwen2-VL helpers
and an independent numpy per-image attention."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import make_image
from mlx_vlm_native.native.packed_attention import packed_attention
from mlx_vlm_native.native.packing import (
    cu_seqlens, greedy_pack, pack, patchify, positions_2d, smart_resize, unpack,
)
from mlx_vlm_native.processors.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, rescale_and_normalize, resize


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(0)
    for h, w in rng.integers(10, 4000, size=(300, 2)):
        if max(h, w) / min(h, w) <= 200:
            assert smart_resize(int(h), int(w)) == ref(int(h), int(w), max_pixels=28 * 28 * 1280)
    assert smart_resize(500, 800) == (504, 812)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 4000)


@pytest.mark.parametrize("h,w", [(500, 800), (20, 20), (333, 1000)])
def test_patchify_matches_qwen2vl_processor(h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = make_image(h, w)
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)(images=image, return_tensors="np")
    rh, rw = smart_resize(h, w)
    chw = resize(np.asarray(image).transpose(2, 0, 1), (rh, rw))
    x = rescale_and_normalize(chw, 1 / 255, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    patches, grid = patchify(x[None])
    assert list(ref["image_grid_thw"][0]) == list(grid)
    assert np.abs(patches - ref["pixel_values"]).max() <= 1e-5


def test_cu_seqlens_and_positions_match_transformers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    grids = [(1, 12, 20), (1, 26, 8), (2, 12, 18)]
    t = torch.tensor(grids)
    assert cu_seqlens(grids).tolist() == get_vision_cu_seqlens(t).tolist()
    assert np.array_equal(positions_2d(grids, 2), get_vision_position_ids(t, 2).numpy())


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    items = [patchify(rng.standard_normal((1, 3, 28 * a, 28 * b)).astype(np.float32)) for a, b in [(1, 2), (3, 1), (2, 2)]]
    p = pack(items)
    assert p.cu_seqlens.tolist() == [0, 8, 20, 36]
    for (orig, _), back in zip(items, unpack(p.patches, p.lengths)):
        assert np.array_equal(orig, back)
    with pytest.raises(ValueError):
        unpack(p.patches, [1, 2])


def test_greedy_pack_respects_budget_and_keeps_every_item():
    lengths = [900, 100, 512, 64, 1024, 300, 700, 1]
    bins = greedy_pack(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert len(bins) == 4  # 4041 tokens cannot fit in fewer than 4 bins of 1024
    with pytest.raises(ValueError, match="over the budget"):
        greedy_pack([2000], 1024)


def numpy_attention(q, k, v, cu, scale):
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        s = np.einsum("qhd,khd->hqk", q[a:b], k[a:b]).astype(np.float64) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(np.einsum("hqk,khd->qhd", p, v[a:b]))
    return np.concatenate(out)


MIXES = [[64], [1, 7, 1, 30], [16, 16, 16, 5], [100, 1, 57, 100, 3]]


@pytest.mark.parametrize("lengths", MIXES)
@pytest.mark.parametrize("path", ["dense", "segmented"])
def test_packed_attention_paths_match_numpy(lengths, path):
    rng = np.random.default_rng(len(lengths))
    T, H, D = sum(lengths), 3, 16
    q, k, v = (rng.standard_normal((T, H, D)).astype(np.float32) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    ref = numpy_attention(q, k, v, cu, D**-0.5)
    ours = np.array(packed_attention(mx.array(q), mx.array(k), mx.array(v), cu, path=path))
    assert np.abs(ours - ref).max() <= 1e-5


def test_packed_attention_gradients_agree():
    rng = np.random.default_rng(1)
    lengths = [5, 1, 12, 12]
    T, H, D = sum(lengths), 2, 8
    cu = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v = (mx.array(rng.standard_normal((T, H, D)).astype(np.float32)) for _ in range(3))
    w = mx.array(rng.standard_normal((T, H, D)).astype(np.float32))

    def loss(path):
        return lambda q, k, v: (packed_attention(q, k, v, cu, path=path) * w).sum()

    gd = mx.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    gs = mx.grad(loss("segmented"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gd, gs):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5


def test_bad_cu_seqlens_and_path_are_errors():
    q = mx.zeros((10, 1, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_attention(q, q, q, [0, 4, 9])
    with pytest.raises(ValueError, match="unknown attention path"):
        packed_attention(q, q, q, [0, 10], path="magic")
