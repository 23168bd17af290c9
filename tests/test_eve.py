"""EVE v1: converter, preprocessing, patch-embedding layer and generation.

A tiny random checkpoint is written in the reference's own key layout
(`EVELlamaForCausalLM.state_dict()`, as a torch `.bin`), converted, loaded and
compared with an independent numpy implementation of the reference's
patch-embedding layer and projector that reads the original weights.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import make_image

PEL_TOL = 1e-4  # fp32, max abs difference of (tokens, hidden) outputs


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def eve_ref_dir(tmp_path_factory):
    from convert.write_eve_release import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("eve_ref"), weights_format="bin")


@pytest.fixture(scope="session")
def eve_ref_weights(eve_ref_dir):
    import torch

    state = torch.load(eve_ref_dir / "pytorch_model.bin", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="session")
def eve_mlx_dir(eve_ref_dir, tmp_path_factory):
    from mlx_vlm_native.convert import convert

    return convert(str(eve_ref_dir), str(tmp_path_factory.mktemp("eve_mlx") / "m"))


@pytest.fixture(scope="session")
def eve_loaded(eve_mlx_dir):
    from mlx_vlm_native import load

    return load(str(eve_mlx_dir))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    from convert.write_eve_release import write_clip_teacher

    return write_clip_teacher(tmp_path_factory.mktemp("eve_teacher"))


def eve_processor(processor, image_size: int):
    """The loaded processor with another canvas size (same weights)."""
    from dataclasses import replace

    from mlx_vlm_native.processors.eve import EVEProcessor

    ip = replace(processor.image_processor, image_size=image_size)
    return EVEProcessor(ip, processor.tokenizer)


# ------------------------------------------------- numpy reference oracle


def np_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_cross_attention(W, prefix, queries, keys, heads=8):
    """LocalAttention/GlobalAttention: q = q.1(q.0(x)), [k; v] = kv.1(kv.0(y)),
    scale = C ** -0.5 (full width), output = queries + proj(attention)."""
    N, M, C = keys.shape
    d = C // heads
    q = np_layernorm(queries, W[prefix + "q.0.weight"], W[prefix + "q.0.bias"]) @ W[prefix + "q.1.weight"].T
    kv = np_layernorm(keys, W[prefix + "kv.0.weight"], W[prefix + "kv.0.bias"]) @ W[prefix + "kv.1.weight"].T
    k, v = kv[..., :C].reshape(N, M, heads, d), kv[..., C:].reshape(N, M, heads, d)
    logits = np.einsum("nhd,nmhd->nhm", q.reshape(N, heads, d), k) * C**-0.5
    out = np.einsum("nhm,nmhd->nhd", np_softmax(logits, -1), v).reshape(N, C)
    return queries + out @ W[prefix + "proj.weight"].T + W[prefix + "proj.bias"]


def np_patch_embedding_layer(W, pixels, patch=14, stride=2):
    """The reference VisionTokenizer + mm_projector for one (4, S, S) image."""
    vt = "model.vision_tower."
    conv = W[vt + "patch_embedding.weight"]  # (C, 3, p, p)
    C = conv.shape[0]
    G = pixels.shape[1] // patch
    feats = np.zeros((G, G, C), np.float64)
    for i in range(G):
        for j in range(G):
            window = pixels[:3, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            feats[i, j] = np.tensordot(conv, window, axes=([1, 2, 3], [0, 1, 2]))
    patch_mask = np.array([[pixels[3, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].mean()
                            for j in range(G)] for i in range(G)])
    nz = np.argwhere(patch_mask)  # torch.nonzero order
    (r0, c0), (r1, c1) = nz[0], nz[-1]
    feats = feats[r0 : r1 + 1, c0 : c1 + 1]
    h, w = feats.shape[0] // stride, feats.shape[1] // stride
    pooled = np.zeros((h * w, C))
    windows = np.zeros((h * w, stride * stride, C))
    for i in range(h):
        for j in range(w):
            block = feats[i * stride : (i + 1) * stride, j * stride : (j + 1) * stride].reshape(-1, C)
            pooled[i * w + j], windows[i * w + j] = block.mean(0), block
    local = np_cross_attention(W, vt + "local_attention.", pooled, windows)
    cls = np_cross_attention(W, vt + "global_attention.", W[vt + "class_embedding"][None], local[None])
    rows = []
    for i in range(h):
        rows.extend(local[i * w : (i + 1) * w])
        rows.append(W[vt + "split_embedding"])
    seq = np.concatenate([cls, np.stack(rows)])
    hidden = np_gelu(seq @ W["model.mm_projector.0.weight"].T + W["model.mm_projector.0.bias"])
    return hidden @ W["model.mm_projector.2.weight"].T + W["model.mm_projector.2.bias"], (h, w)


# -------------------------------------------------------------- converter


def test_converter_drops_teacher_aligner_and_inv_freq(eve_ref_weights, eve_mlx_dir):
    from mlx_vlm_native.utils import load_weights

    assert any(k.startswith("model.vision_clip.") for k in eve_ref_weights)
    assert any(".clip_layer." in k for k in eve_ref_weights)
    assert any("rotary_emb.inv_freq" in k for k in eve_ref_weights)
    converted = load_weights(eve_mlx_dir)
    assert not [k for k in converted if "clip" in k or "compressor" in k or "inv_freq" in k]
    kept = [k for k in eve_ref_weights if not ("clip" in k or "compressor" in k or "inv_freq" in k)]
    assert len(converted) == len(kept)
    conv = np.array(converted["vision_tower.patch_embedding.weight"])
    ref = eve_ref_weights["model.vision_tower.patch_embedding.weight"]
    np.testing.assert_array_equal(conv, ref.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(
        np.array(converted["vision_tower.local_attention.kv_proj.weight"]),
        eve_ref_weights["model.vision_tower.local_attention.kv.1.weight"],
    )
    assert json.loads((eve_mlx_dir / "config.json").read_text())["model_type"] == "eve"
    assert (eve_mlx_dir / "preprocessor_config.json").exists()


def test_quantized_convert_keeps_the_vision_side_in_float(eve_ref_dir, tmp_path):
    import mlx.nn as nn

    from mlx_vlm_native import generate, load
    from mlx_vlm_native.convert import convert

    out = convert(str(eve_ref_dir), str(tmp_path / "q"), quantize=True)
    model, processor = load(str(out))
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.multi_modal_projector.linear_1, nn.Linear)  # not quantized
    assert isinstance(model.vision_tower.local_attention.kv_proj, nn.Linear)  # not quantized
    assert generate(model, processor, "Hi", images=[make_image(60, 100)], max_tokens=3).prompt_tokens > 16


def _rewrite(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def eve_safetensors_dir(tmp_path_factory):
    from convert.write_eve_release import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("eve_st"))


def test_old_embedding_spelling_is_accepted(eve_safetensors_dir, tmp_path):
    from mlx_vlm_native import load

    def rename(w):
        w["model.vision_tower.start_embedding"] = w.pop("model.vision_tower.class_embedding")
        w["model.vision_tower.end_embedding"] = w.pop("model.vision_tower.split_embedding")

    old = _rewrite(eve_safetensors_dir, tmp_path / "old", rename)
    m_old, _ = load(str(old))
    m_new, _ = load(str(eve_safetensors_dir))
    for name in ("class_embedding", "split_embedding"):
        np.testing.assert_array_equal(
            np.array(getattr(m_old.vision_tower, name)), np.array(getattr(m_new.vision_tower, name))
        )


def test_missing_and_misshaped_keys_are_named(eve_safetensors_dir, tmp_path):
    from mlx_vlm_native import load

    def drop(w):
        del w["model.vision_tower.split_embedding"]

    with pytest.raises(ValueError, match="vision_tower.split_embedding"):
        load(str(_rewrite(eve_safetensors_dir, tmp_path / "a", drop)))

    def reshape(w):
        w["model.mm_projector.2.bias"] = w["model.mm_projector.2.bias"][:-1].copy()

    with pytest.raises(ValueError, match=r"multi_modal_projector.linear_2.bias' has shape \(63,\)"):
        load(str(_rewrite(eve_safetensors_dir, tmp_path / "b", reshape)))


# ---------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "size, image_size, grid",
    [
        ((100, 60), 112, (3, 4)),  # the reference's CPU run: 16 tokens
        ((60, 100), 112, (4, 3)),
        ((100, 100), 112, (4, 4)),
        ((300, 50), 112, (1, 4)),
        ((100, 60), 224, (6, 8)),  # twice the teacher's grid
        ((1000, 333), 672, (8, 24)),  # EVE-7B geometry (336-px teacher)
    ],
)
def test_token_counts_for_aspect_ratios(size, image_size, grid, eve_loaded):
    from mlx_vlm_native.processors.eve import EVEImageProcessor

    clip = 336 if image_size == 672 else 56
    ip = EVEImageProcessor(image_size=image_size, image_size_clip=clip)
    assert ip.grid(size) == grid
    assert ip.num_tokens(size) == 1 + grid[0] * (grid[1] + 1)
    if image_size <= 224:
        model, processor = eve_loaded
        pixels = eve_processor(processor, image_size).image_processor(make_image(size[1], size[0]))
        assert model.image_tokens(pixels).shape == (1 + grid[0] * (grid[1] + 1), 64)


def test_100x60_gives_16_tokens_and_84_valid_rows(eve_loaded):
    model, processor = eve_loaded
    image = make_image(60, 100)
    inputs = processor(processor.format_prompt("What is this?", 1), images=[image])
    assert (inputs.input_ids == -200).sum() == 16
    pixels = inputs.pixel_values[0]
    assert pixels.shape == (4, 112, 112)
    rows = np.nonzero(pixels[3].any(axis=1))[0]
    assert len(rows) == 84 and rows[0] == 0  # 3 of 4 teacher rows, padding (1 row) at the bottom


def test_canvas_pixels_match_pil_and_mean_fill(eve_loaded):
    """Valid region = bicubic PIL resize normalised; padding = the mean colour."""
    from mlx_vlm_native.processors.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    _, processor = eve_loaded
    image = make_image(40, 100, seed=3)  # 56 x 14 at the teacher's scale: 1 of 4 rows
    pixels = processor.image_processor(image)
    # long side 112; short side ceil(56*40/100/14)*14 = 28 at 56 px -> 56 px, centred at row 28
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    expected = np.asarray(image.resize((112, 56), Image.BICUBIC), np.float64) / 255
    expected = ((expected - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(pixels[:3, 28:84], expected, atol=1e-5)
    fill = (np.floor(mean * 255) / 255 - mean) / std
    np.testing.assert_allclose(pixels[:3, :28], np.broadcast_to(fill[:, None, None], (3, 28, 112)), atol=1e-5)
    assert pixels[3, 28:84].min() == 1 and pixels[3, :28].max() == 0 and pixels[3, 84:].max() == 0


# ------------------------------------------------- patch-embedding parity


@pytest.mark.parametrize("size, image_size", [((100, 60), 112), ((70, 130), 112), ((100, 60), 224)])
def test_patch_embedding_layer_matches_numpy_reference(size, image_size, eve_loaded, eve_ref_weights):
    model, processor = eve_loaded
    pixels = eve_processor(processor, image_size).image_processor(make_image(size[1], size[0], seed=1))
    expected, grid = np_patch_embedding_layer(eve_ref_weights, pixels.astype(np.float64))
    got = np.array(model.image_tokens(pixels))
    assert got.shape == expected.shape == (1 + grid[0] * (grid[1] + 1), 64)
    assert np.abs(got - expected).max() < PEL_TOL


def test_numpy_oracle_catches_a_swapped_key_value_split(eve_loaded, eve_ref_weights):
    """Seeded bug: reading V as the first half of kv.1 must be visible."""
    model, processor = eve_loaded
    pixels = processor.image_processor(make_image(60, 100, seed=1))
    W = dict(eve_ref_weights)
    for att in ("local_attention", "global_attention"):
        k = f"model.vision_tower.{att}.kv.1.weight"
        W[k] = np.concatenate(np.split(W[k], 2)[::-1])
    wrong, _ = np_patch_embedding_layer(W, pixels.astype(np.float64))
    assert np.abs(np.array(model.image_tokens(pixels)) - wrong).max() > 100 * PEL_TOL


# ------------------------------------------------------ prompts and tokens


def test_prompt_and_image_token_layout(eve_loaded, eve_ref_dir):
    import sentencepiece as spm

    from mlx_vlm_native.processors.eve import VICUNA_V1_SYSTEM

    _, processor = eve_loaded
    prompt = processor.format_prompt("What is this?", 1)
    assert prompt == VICUNA_V1_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    rendered = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == prompt  # the checkpoint's chat template agrees with the code
    sp = spm.SentencePieceProcessor(model_file=str(eve_ref_dir / "tokenizer.model"))
    head, tail = prompt.split("<image>")
    # tokenizer_image_token: chunks tokenized separately, one BOS, one -200 per image
    assert processor.tokenize(prompt) == [1] + sp.encode(head) + [-200] + sp.encode(tail)


def test_input_errors(eve_loaded):
    model, processor = eve_loaded
    image = make_image(50, 50)
    with pytest.raises(ValueError, match="one image per prompt"):
        processor.format_prompt("x", 2)
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        processor("USER: <image>\nx", images=[image, image])
    with pytest.raises(ValueError, match="videos"):
        processor("x", videos=[[image]])
    empty = processor.image_processor(image)
    empty[3] = 0
    with pytest.raises(ValueError, match="mask is empty"):
        model.image_tokens(empty)
    ragged = processor.image_processor(image)
    ragged[3, :5] = 0
    with pytest.raises(ValueError, match="does not align"):
        model.image_tokens(ragged)


# -------------------------------------------------------------- generation


def test_generate_is_deterministic_and_uses_the_image(eve_loaded):
    from mlx_vlm_native import generate

    model, processor = eve_loaded
    a, b = make_image(60, 100, seed=1), make_image(60, 100, seed=2)
    r1 = generate(model, processor, "Describe it.", images=[a], max_tokens=6)
    r2 = generate(model, processor, "Describe it.", images=[a], max_tokens=6)
    assert r1.text == r2.text and r1.prompt_tokens == r2.prompt_tokens
    inputs_a = processor(processor.format_prompt("Describe it.", 1), images=[a])
    inputs_b = processor(processor.format_prompt("Describe it.", 1), images=[b])
    la = model(mx.array(inputs_a.input_ids)[None], input_embeddings=model.get_input_embeddings(inputs_a)[0])
    lb = model(mx.array(inputs_b.input_ids)[None], input_embeddings=model.get_input_embeddings(inputs_b)[0])
    assert np.abs(np.array(la[0, -1]) - np.array(lb[0, -1])).max() > 1e-3


EXE = shutil.which("mlx-vlm-native") or os.path.join(os.path.dirname(sys.executable), "mlx-vlm-native")


def test_cli_generate_on_tiny_eve(eve_mlx_dir, tmp_path):
    image = tmp_path / "a.png"
    make_image(60, 100).save(image)
    r = subprocess.run(
        [EXE, "generate", "--model", str(eve_mlx_dir), "--image", str(image),
         "--prompt", "What is this?", "--max-tokens", "8", "--seed", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Prompt:" in r.stdout and "tokens-per-sec" in r.stdout
    n_prompt = int(r.stdout.split("Prompt: ")[1].split(" tokens")[0])
    assert n_prompt > 16  # 16 image tokens + the vicuna_v1 prompt
    r = subprocess.run(
        [EXE, "generate", "--model", str(eve_mlx_dir), "--image", str(image), str(image)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode != 0 and "one image per prompt" in r.stderr
