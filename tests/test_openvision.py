"""OpenVision / OpenVision 2 in MLX against an independent numpy computation
of the same formulas, run on the open_clip-layout tensors themselves (torch
names, OIHW conv, fused in_proj), plus masking, captioning and error paths."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.write_open_clip_release import write_tiny_open_clip
from mlx_vlm_native.models import openvision_checkpoint as ovc
from mlx_vlm_native.convert import convert
from mlx_vlm_native.models import openvision as ov

TOL = 2e-5  # float32, absolute, on O(1) activations (measured <= 2e-6)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("ov2_tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return ovc.load(tiny_dir)


@pytest.fixture(scope="module")
def torch_tensors(tiny_dir):
    return load_file(str(tiny_dir / "open_clip_model.safetensors")), load_file(
        str(tiny_dir / "caption_decoder.safetensors")
    )


# ---------- independent numpy reference ----------

erf = np.vectorize(math.erf)


def np_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu_exact(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_mha(x, t, p, heads, allowed=None):
    B, L, D = x.shape
    hd = D // heads
    qkv = x @ t[p + "attn.in_proj_weight"].T + t[p + "attn.in_proj_bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    split = lambda a: a.reshape(B, L, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    a = a.transpose(0, 2, 1, 3).reshape(B, L, D)
    return a @ t[p + "attn.out_proj.weight"].T + t[p + "attn.out_proj.bias"]


def np_block(x, t, p, heads, gelu, allowed=None):
    h = np_layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
    x = x + np_mha(h, t, p, heads, allowed)
    h = np_layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"])
    h = gelu(h @ t[p + "mlp.c_fc.weight"].T + t[p + "mlp.c_fc.bias"])
    return x + h @ t[p + "mlp.c_proj.weight"].T + t[p + "mlp.c_proj.bias"]


def moco_sincos(rows, cols, dim):
    """Element by element: [sin(c w), cos(c w), sin(r w), cos(r w)], w_k = 10000^(-k/(dim/4-1))."""
    q = dim // 4
    out = np.zeros((rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            for k in range(q):
                w = 10000.0 ** (-k / (q - 1))
                n = r * cols + c
                out[n, k], out[n, q + k] = math.sin(c * w), math.cos(c * w)
                out[n, 2 * q + k], out[n, 3 * q + k] = math.sin(r * w), math.cos(r * w)
    return out


def np_vit(pixels_nchw, t, patch, heads, layers, table=None):
    B, C, H, W = pixels_nchw.shape
    gh, gw = H // patch, W // patch
    patches = pixels_nchw.reshape(B, C, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
    x = patches.reshape(B, gh * gw, -1) @ t["conv1.weight"].reshape(t["conv1.weight"].shape[0], -1).T
    D = x.shape[-1]
    x = np.concatenate([np.broadcast_to(t["class_embedding"], (B, 1, D)), x], axis=1)
    if table is None:
        table = np.concatenate([np.zeros((1, D)), moco_sincos(gh, gw, D)])
    x = x + table
    for i in range(layers):
        x = np_block(x, t, f"transformer.resblocks.{i}.", heads, np_gelu_exact)
    tokens = x[:, 1:]
    return tokens, np_layer_norm(tokens.mean(1), t["ln_post.weight"], t["ln_post.bias"])


def np_decoder(image_tokens, text, t, heads, depth, mask_kind):
    img = image_tokens @ t["image_projection.weight"].T
    txt = t["token_embedding.weight"][text]
    x = np.concatenate([img, txt], axis=1)
    M, L = img.shape[1], x.shape[1]
    allowed = np.zeros((L, L), bool)
    for i in range(L):
        for j in range(L):
            if mask_kind == "causal":
                allowed[i, j] = j <= i
            else:  # image<->image, text->image, causal text->text, image never sees text
                allowed[i, j] = (j < M) or (i >= M and j <= i)
    for i in range(depth):
        x = np_block(x, t, f"blocks.{i}.", heads, np_gelu_tanh, allowed)
    x = np_layer_norm(x[:, M:], t["ln_final.weight"], t["ln_final.bias"])
    return x @ t["lm_head.weight"].T


def pixels(batch, size, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def to_mlx(x_nchw):
    return mx.array(x_nchw.transpose(0, 2, 3, 1))


# ---------- tests ----------


def test_sincos_table_is_the_moco_v3_formula():
    ours = ov.posemb_sincos_2d(3, 5, 16)
    np.testing.assert_allclose(ours, moco_sincos(3, 5, 16), atol=1e-6)
    # The MAE variant (denominator dim/4, not dim/4 - 1) must not pass.
    cols = np.tile(np.arange(5), 3)
    mae_sin = np.sin(np.outer(cols, 1.0 / 10000 ** (np.arange(4) / 4)))
    assert not np.allclose(ours[:, :4], mae_sin, atol=1e-3)
    np.testing.assert_allclose(ours[:, :4], np.sin(np.outer(cols, 1.0 / 10000 ** (np.arange(4) / 3))), atol=1e-6)
    table = np.array(ov.positional_table(4, 32))
    assert table.shape == (17, 32) and not table[0].any()


def test_vit_matches_numpy_on_open_clip_tensors(tiny_model, torch_tensors):
    vis, _ = torch_tensors
    x = pixels(2, 28)
    out = tiny_model.vision(to_mlx(x))
    tokens, pooled = np_vit(x.astype(np.float64), vis, 7, 4, 2, table=vis["positional_embedding"])
    assert out["tokens"].shape == (2, 16, 32) and out["pooled"].shape == (2, 32)
    np.testing.assert_allclose(np.array(out["tokens"]), tokens, atol=TOL)
    np.testing.assert_allclose(np.array(out["pooled"]), pooled, atol=TOL)


def test_vit_other_resolution_regenerates_the_table(tiny_model, torch_tensors):
    vis, _ = torch_tensors
    x = pixels(1, 42, seed=1)  # 6x6 grid instead of the stored 4x4
    out = tiny_model.vision(to_mlx(x))
    tokens, _ = np_vit(x.astype(np.float64), vis, 7, 4, 2)
    np.testing.assert_allclose(np.array(out["tokens"]), tokens, atol=TOL)


def test_stored_table_is_used_as_stored(tiny_dir, torch_tensors):
    """A checkpoint whose table differs from the formula keeps its own table."""
    vis = dict(torch_tensors[0])
    vis["positional_embedding"] = vis["positional_embedding"] + 0.5
    args, weights = ovc.open_clip_to_mlx(tiny_dir)
    weights["vision.positional_embedding"] = mx.array(vis["positional_embedding"])
    model = ovc.build(args, weights)
    x = pixels(1, 28, seed=2)
    tokens, _ = np_vit(x.astype(np.float64), vis, 7, 4, 2, table=vis["positional_embedding"])
    np.testing.assert_allclose(np.array(model.vision(to_mlx(x))["tokens"]), tokens, atol=TOL)


@pytest.mark.parametrize("kind", ["prefix", "causal"])
def test_decoder_matches_numpy(tiny_dir, torch_tensors, kind):
    _, dec = torch_tensors
    model = ovc.load(tiny_dir, attention_mask=kind)
    rng = np.random.default_rng(3)
    img = rng.standard_normal((2, 5, 32)).astype(np.float32)
    text = rng.integers(0, 37, (2, 6))
    logits = model.decoder(mx.array(img), mx.array(text))
    ref = np_decoder(img.astype(np.float64), text, dec, 3, 2, kind)
    assert logits.shape == (2, 6, 37)
    np.testing.assert_allclose(np.array(logits), ref, atol=TOL)


def test_masks_differ_and_prefix_is_order_free(tiny_dir):
    """Prefix-LM is invariant to the image-token order (the masked subset comes
    out shuffled); the fully causal mask is not; the two masks disagree."""
    prefix, causal = ovc.load(tiny_dir, attention_mask="prefix"), ovc.load(tiny_dir, attention_mask="causal")
    rng = np.random.default_rng(4)
    img = mx.array(rng.standard_normal((1, 6, 32)).astype(np.float32))
    text = mx.array(rng.integers(0, 37, (1, 5)))
    perm = mx.array(rng.permutation(6))
    a, b = prefix.decoder(img, text), prefix.decoder(img[:, perm], text)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    c, d = causal.decoder(img, text), causal.decoder(img[:, perm], text)
    assert np.abs(np.array(c) - np.array(d)).max() > 1e-3
    assert np.abs(np.array(a) - np.array(c)).max() > 1e-3


def test_masking_keeps_distinct_tokens_per_sample():
    B, N, D = 8, 36, 4
    rows = mx.broadcast_to(mx.arange(N, dtype=mx.float32)[None, :, None], (B, N, D))
    kept = ov.mask_image_tokens(rows, 0.35, key=mx.random.key(7))
    idx = np.array(kept[..., 0]).astype(int)
    assert idx.shape == (B, int(N * 0.35)) == (B, 12)
    assert all(len(set(r)) == 12 for r in idx)  # without replacement
    assert len({tuple(sorted(r)) for r in idx}) > 1  # different per sample
    np.testing.assert_array_equal(np.array(kept), np.array(rows)[np.arange(B)[:, None], idx])
    again = ov.mask_image_tokens(rows, 0.35, key=mx.random.key(7))
    np.testing.assert_array_equal(np.array(again), np.array(kept))  # deterministic under a seed
    other = ov.mask_image_tokens(rows, 0.35, key=mx.random.key(8))
    assert not np.array_equal(np.array(other), np.array(kept))
    assert ov.mask_image_tokens(rows, 1.0) is rows
    for n, r in ((256, 0.35), (576, 0.35), (729, 0.35)):
        out = ov.mask_image_tokens(mx.zeros((1, n, 2)), r, key=mx.random.key(0))
        assert out.shape[1] == int(n * r)
    with pytest.raises(ValueError, match="keeps no token"):
        ov.mask_image_tokens(rows, 0.01)


def test_loss_is_token_mean_over_non_pad(tiny_model):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 4, 37)).astype(np.float32)
    targets = np.array([[7, 8, 2, 0], [9, 2, 0, 0]])
    loss, count = ov.caption_loss(mx.array(logits), mx.array(targets), 0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(4) if targets[b, t]]
    assert int(count) == 5
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def test_bin_checkpoint_and_converter_round_trip(tmp_path, tiny_model):
    pytest.importorskip("torch")
    src = write_tiny_open_clip(tmp_path / "bin", weights_format="bin")
    assert (src / "open_clip_pytorch_model.bin").exists()
    dst = convert(str(src), str(tmp_path / "mlx"))
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "openvision2" and cfg["decoder_config"]["attention_mask"] == "prefix"
    model = ovc.load(dst)
    x = to_mlx(pixels(1, 28, seed=6))
    text = mx.array([[1, 7, 8]])
    np.testing.assert_array_equal(np.array(model(x, text, keep_ratio=1.0)),
                                  np.array(tiny_model(x, text, keep_ratio=1.0)))
    with pytest.raises(FileExistsError):
        convert(str(src), str(dst))


def test_full_clip_checkpoint_keeps_only_the_visual_tower(tmp_path, tiny_dir, tiny_model):
    """OpenVision v1 full-CLIP files prefix the tower with `visual.` and carry a text tower."""
    from safetensors.numpy import save_file

    src = tmp_path / "v1"
    src.mkdir()
    vis = load_file(str(tiny_dir / "open_clip_model.safetensors"))
    tensors = {"visual." + k: v for k, v in vis.items()}
    tensors.update({"token_embedding.weight": np.zeros((5, 4), np.float32), "logit_scale": np.ones((), np.float32)})
    save_file(tensors, str(src / "open_clip_model.safetensors"))
    (src / "open_clip_config.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    model = ovc.load(src)
    assert "decoder" not in model
    x = to_mlx(pixels(1, 28, seed=9))
    np.testing.assert_array_equal(np.array(model.vision(x)["tokens"]), np.array(tiny_model.vision(x)["tokens"]))
    from mlx_vlm_native.convert import main

    main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "v1_mlx"), "--dtype", "bfloat16"])
    assert ovc.load(tmp_path / "v1_mlx").vision.conv1.weight.dtype == mx.bfloat16


def test_kv_cached_caption_equals_full_recompute(tiny_model, tiny_dir):
    from mlx_vlm_native.caption import caption, generate_captions
    from mlx_vlm_native.utils import load_processor

    x = to_mlx(pixels(2, 28, seed=8))
    ids = generate_captions(tiny_model, x, max_tokens=6)
    tokens = tiny_model.vision(x)["tokens"]
    for b in range(2):
        seq = [1]
        for _ in range(len(ids[b])):
            logits = tiny_model.decoder(tokens[b : b + 1], mx.array([seq]))
            seq.append(int(mx.argmax(logits[0, -1])))
        assert seq[1:] == ids[b]
    text = caption(str(tiny_dir), np.zeros((30, 40, 3), np.uint8), max_tokens=4)
    assert isinstance(text, str)
    sampled = [caption(tiny_model, [np.zeros((28, 28, 3), np.uint8)], max_tokens=4, temperature=1.0,
                       seed=s, processor=load_processor(tiny_dir, tiny_model)) for s in (1, 1)]
    assert sampled[0] == sampled[1]


def test_caption_cli(tiny_dir, tmp_path, capsys):
    from PIL import Image

    from mlx_vlm_native.caption import main

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    main(["--model", str(tiny_dir), "--image", str(tmp_path / "a.png"), "--max-tokens", "3"])
    assert capsys.readouterr().out.strip() != ""
    with pytest.raises(SystemExit, match="image not found"):
        main(["--model", str(tiny_dir), "--image", str(tmp_path / "missing.png")])


def test_error_paths(tiny_dir, tmp_path):
    args, weights = ovc.open_clip_to_mlx(tiny_dir)
    broken = dict(weights)
    del broken["vision.blocks.1.attn.in_proj.weight"]
    with pytest.raises(ValueError, match="vision.blocks.1.attn.in_proj.weight"):
        ovc.build(args, broken)
    bad = dict(weights)
    bad["decoder.lm_head.weight"] = mx.zeros((5, 24))
    with pytest.raises(ValueError, match="decoder.lm_head.weight"):
        ovc.build(args, bad)
    with pytest.raises(ValueError, match="attention_mask"):
        ov.DecoderConfig(attention_mask="bidirectional")
    with pytest.raises(ValueError, match="vision_width"):
        ov.Model(ov.ModelArgs(vision_config={"width": 32, "head_width": 8, "layers": 1},
                              decoder_config={"width": 8, "depth": 1, "num_heads": 2, "vision_width": 16}))
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        ovc.load(tmp_path)
    with pytest.raises(ValueError, match="unknown ViT variant"):
        ov.VisionConfig.from_variant("XL", 224, 14)
    encoder_only = ov.Model(ov.ModelArgs(vision_config={"width": 32, "head_width": 8, "layers": 1}))
    with pytest.raises(ValueError, match="no caption decoder"):
        encoder_only(mx.zeros((1, 28, 28, 3)), mx.zeros((1, 2), dtype=mx.int32))


def test_variants_match_the_reference_table():
    cfg = ov.VisionConfig.from_variant("So400m", 384, 14)
    assert (cfg.width, cfg.layers, cfg.mlp_dim, cfg.heads, cfg.grid) == (1152, 27, 4304, 16, 27)
    dec = ov.DecoderConfig.from_variant("L", 1024, 32000)
    assert (dec.width, dec.depth, dec.mlp_dim, dec.num_heads) == (768, 12, 3072, 12)


def test_stem_conv_is_a_stride_two_convolution():
    mx.random.seed(0)
    stem = ov.StemConv(5, 7)
    stem.bias = mx.random.normal((7,))
    x = mx.random.normal((2, 11, 8, 5))  # odd size: padding 1 gives ceil(11 / 2) rows, as nn.Conv2d does
    reference = mx.conv2d(x, stem.weight, stride=2, padding=1) + stem.bias
    out = stem(x)
    assert out.shape == reference.shape == (2, 6, 4, 7)
    assert mx.abs(out - reference).max().item() < 1e-5


def test_vit_with_a_conv_stem():
    cfg = ov.VisionConfig(image_size=32, patch_size=8, width=16, layers=1, head_width=8, stem_channels=[4, 6])
    vit = ov.VisionTransformer(cfg)
    assert cfg.grid == 4 and vit.conv1.weight.shape == (16, 2, 2, 6)
    assert [s.weight.shape for s in vit.stem] == [(4, 3, 3, 3), (6, 3, 3, 4)]
    out = vit(mx.random.normal((3, 32, 32, 3)))
    assert out["tokens"].shape == (3, 16, 16)
    # the stem is part of the model: changing its weights changes the tokens
    before = out["tokens"]
    vit.stem[0].weight = vit.stem[0].weight * 2
    assert mx.abs(vit(mx.random.normal((3, 32, 32, 3)))["tokens"] - before).max().item() > 1e-3
    with pytest.raises(ValueError, match="conv stem's stride 8"):
        ov.VisionConfig(image_size=32, patch_size=4, width=16, layers=1, head_width=8, stem_channels=[4, 4, 4])
