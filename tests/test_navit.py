"""NaViT training features, each against an independent computation."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_vlm_native.models.navit import FactorizedPositionEmbedding, MaskedAttentionPool, token_grid_sizes
from mlx_vlm_native.native.packing import pack, patchify
from mlx_vlm_native.training.navit import drop_tokens, sample_drop_rates, sample_resolution


def make_pack(grids, seed=0):
    rng = np.random.default_rng(seed)
    return pack([patchify(rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)) for h, w in grids])


def test_token_dropping_keeps_exact_counts_and_positions():
    p = make_pack([(8, 8), (4, 6), (2, 2)])
    rates = [0.5, 0.25, 0.0]
    d = drop_tokens(p, rates, np.random.default_rng(0))
    assert np.diff(d.cu_seqlens).tolist() == [32, 18, 4]
    # every kept token is an original (patch, position) pair of the same image
    for seg in range(3):
        a, b = p.cu_seqlens[seg], p.cu_seqlens[seg + 1]
        orig = {tuple(pos): patch.tobytes() for pos, patch in zip(p.positions[a:b], p.patches[a:b])}
        c, e = d.cu_seqlens[seg], d.cu_seqlens[seg + 1]
        kept = list(zip(map(tuple, d.positions[c:e]), d.patches[c:e]))
        assert len({pos for pos, _ in kept}) == e - c
        assert all(orig[pos] == patch.tobytes() for pos, patch in kept)
    again = drop_tokens(p, rates, np.random.default_rng(0))
    other = drop_tokens(p, rates, np.random.default_rng(1))
    assert np.array_equal(again.positions, d.positions)
    assert not np.array_equal(other.positions, d.positions)
    with pytest.raises(ValueError):
        drop_tokens(p, [0.5, 1.0, 0.0], np.random.default_rng(0))


def test_drop_rates_follow_their_range():
    r = sample_drop_rates(1000, np.random.default_rng(0), max_rate=0.5)
    assert r.min() >= 0 and r.max() <= 0.5 and 0.2 < r.mean() < 0.3


def test_resolution_sampling_keeps_aspect_ratio():
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(200):
        h, w = sample_resolution(300, 900, rng, min_side=112, max_side=448, multiple=28)
        assert h % 28 == 0 and w % 28 == 0 and 112 - 14 <= w <= 448 + 14
        assert abs(w / h - 3) <= 3 * 28 / h + 1e-9  # within one rounding step
        sides.append(w)
    assert len(set(sides)) > 5


def test_factorized_fractional_embeddings_are_resolution_free():
    emb = FactorizedPositionEmbedding(16, table_size=8)
    # the centre of a 4x4 grid and of an 8x8 grid share fractional coordinates for matching cells
    e4 = np.array(emb(np.array([[0, 0], [3, 3]]), np.array([[4, 4], [4, 4]], np.float32)))
    e8 = np.array(emb(np.array([[0, 0], [7, 7]]), np.array([[8, 8], [8, 8]], np.float32)))
    assert not np.allclose(e4[0], e4[1])
    # an unseen, larger resolution still lands inside the table and stays finite
    big = np.array(emb(np.array([[99, 150]]), np.array([[100, 151]], np.float32)))
    assert np.isfinite(big).all()
    # independent computation: interpolate the tables by hand
    rows, cols = np.array(emb.rows), np.array(emb.cols)

    def ref(r, h):
        x = np.clip((r + 0.5) / h * 8 - 0.5, 0, 7)
        lo = int(np.floor(x)); hi = min(lo + 1, 7); w = x - lo
        return lo, hi, w

    lo, hi, w = ref(3, 4)
    want = rows[lo] * (1 - w) + rows[hi] * w + cols[lo] * (1 - w) + cols[hi] * w
    assert np.abs(e4[1] - want).max() <= 1e-6
    assert np.abs(e8[0] - (rows[0] + cols[0])).max() <= 1e-6


def test_token_grid_sizes():
    p = make_pack([(2, 4), (6, 2)])
    sizes = token_grid_sizes(p)
    assert sizes[:8].tolist() == [[2, 4]] * 8 and sizes[8:].tolist() == [[6, 2]] * 12


def test_masked_attention_pool_matches_per_image_numpy():
    mx.random.seed(0)
    pool = MaskedAttentionPool(16, 4)
    lengths = [5, 1, 9]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    x = np.random.default_rng(0).standard_normal((sum(lengths), 16)).astype(np.float32)
    ours = np.array(pool(mx.array(x), cu))
    W = {n: (np.array(getattr(pool, n).weight), np.array(getattr(pool, n).bias)) for n in ("k_proj", "v_proj", "out_proj")}
    q = np.array(pool.query).reshape(4, 4)
    for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        k = (x[a:b] @ W["k_proj"][0].T + W["k_proj"][1]).reshape(-1, 4, 4)
        v = (x[a:b] @ W["v_proj"][0].T + W["v_proj"][1]).reshape(-1, 4, 4)
        sc = np.einsum("hd,nhd->hn", q, k) / 2.0
        p = np.exp(sc - sc.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        o = np.einsum("hn,nhd->hd", p, v).reshape(16)
        want = o @ W["out_proj"][0].T + W["out_proj"][1]
        assert np.abs(ours[s] - want).max() <= 1e-5
