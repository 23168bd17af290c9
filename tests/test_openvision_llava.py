"""OpenVision encoder as a LLaVA-style vision tower: projector + mlx-lm LLM."""

import mlx.core as mx
import numpy as np
import pytest

from convert.write_open_clip_release import write_vocab
from mlx_vlm_native.models import openvision_checkpoint as ovc
from mlx_vlm_native.models import openvision_llava as ol
from mlx_vlm_native.processors.openvision_llava import Processor

TEXT_CONFIG = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 37, "rms_norm_eps": 1e-6,
               "max_position_embeddings": 256, "tie_word_embeddings": False}
VISION_CONFIG = {"image_size": 28, "patch_size": 7, "width": 32, "layers": 2, "head_width": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    root = tmp_path_factory.mktemp("ov_llava")
    write_vocab(root / "vocab.txt")
    tokenizer = ovc.load_tokenizer(root)
    tokenizer.eos_token = "[EOS]"
    args = ol.ModelArgs(vision_config=dict(VISION_CONFIG), text_config=dict(TEXT_CONFIG), vision_feature_layer=-2)
    mx.random.seed(0)
    model = ol.Model(args)
    mx.eval(model.parameters())
    return model, Processor(TokenizerWrapper(tokenizer), args)


def test_image_features_sit_at_the_placeholders(setup):
    model, processor = setup
    image = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)
    inputs = processor("a <image> photo of the cat", images=[image])
    ids = inputs.input_ids
    assert (ids == -200).sum() == 16 and inputs.pixel_values[0].shape == (1, 3, 28, 28)
    embeds = np.array(model.get_input_embeddings(inputs)[0][0])
    x = mx.array(inputs.pixel_values[0]).transpose(0, 2, 3, 1)
    tokens = model.vision_tower(x, layer=-2)["tokens"]  # the second-to-last block
    expected = model.multi_modal_projector(tokens)[0]
    np.testing.assert_allclose(embeds[ids == -200], np.array(expected), atol=1e-6)
    text = model.language_model.model.embed_tokens(mx.array(ids[ids != -200]))
    np.testing.assert_allclose(embeds[ids != -200], np.array(text), atol=0)
    last = model.multi_modal_projector(model.vision_tower(x)["tokens"])[0]
    assert np.abs(np.array(last) - np.array(expected)).max() > 1e-3  # the layer choice matters


def test_generate_end_to_end(setup):
    from mlx_vlm_native.generate import generate

    model, processor = setup
    image = np.zeros((28, 28, 3), np.uint8)
    result = generate(model, processor, "describe", images=[image], max_tokens=3)
    assert result.prompt_tokens == 16 + 1 and result.generation_tokens >= 1


def test_errors_and_sanitize(setup):
    model, processor = setup
    with pytest.raises(ValueError, match="2 image placeholder"):
        processor("<image> and <image>", images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="videos"):
        processor("x", videos=[[np.zeros((8, 8, 3), np.uint8)]])
    with pytest.raises(ValueError, match="vision_feature_layer"):
        ol.ModelArgs(vision_config=dict(VISION_CONFIG), text_config=dict(TEXT_CONFIG), vision_feature_layer=5)
    with pytest.raises(ValueError, match="no language model"):
        ol.ModelArgs(vision_config=dict(VISION_CONFIG), text_config={**TEXT_CONFIG, "model_type": "nope"})
    w = {"model.vision_tower.conv1.weight": mx.zeros((32, 3, 7, 7)),
         "model.vision_tower.transformer.resblocks.0.attn.in_proj_weight": mx.zeros((96, 32)),
         "model.mm_projector.0.weight": mx.zeros((32, 32)),
         "model.language_model.layers.0.self_attn.q_proj.weight": mx.zeros((32, 32)),
         "lm_head.weight": mx.zeros((37, 32))}
    out = model.sanitize(w)
    assert sorted(out) == sorted([
        "vision_tower.conv1.weight", "vision_tower.blocks.0.attn.in_proj.weight",
        "multi_modal_projector.linear_1.weight", "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.lm_head.weight"])
    assert out["vision_tower.conv1.weight"].shape == (32, 7, 7, 3)


def test_folder_loads_through_load(setup, tmp_path):
    """Registered model_type: a saved folder comes back through `load()`."""
    import json

    from mlx_vlm_native import load
    from mlx_vlm_native.utils import save_weights

    model, processor = setup
    save_weights(tmp_path, model, progress=False)
    config = {"model_type": "openvision_llava", "vision_config": VISION_CONFIG, "text_config": TEXT_CONFIG,
              "vision_feature_layer": -2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    processor.tokenizer._tokenizer.save_pretrained(str(tmp_path))
    loaded, loaded_processor = load(str(tmp_path))
    image = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)
    inputs = loaded_processor("a <image> photo", images=[image])
    ids = mx.array(np.where(inputs.input_ids < 0, 0, inputs.input_ids))[None]
    a = model(ids, input_embeddings=model.get_input_embeddings(inputs)[0])
    b = loaded(ids, input_embeddings=loaded.get_input_embeddings(inputs)[0])
    assert np.array_equal(np.array(a), np.array(b))


def test_pad_mode_keeps_the_whole_picture(setup):
    model, _ = setup
    from mlx_vlm_native.processors.image import center_crop_pixels, pad_to_square_pixels

    image = np.full((20, 60, 3), 128, np.uint8)
    image[:, :6] = (255, 0, 0)  # a red strip on the far left of a 3:1 picture
    from PIL import Image

    mean, std = ol.IMAGENET_MEAN, ol.IMAGENET_STD
    red = (np.array([1.0, 0, 0]) - mean) / std
    padded = pad_to_square_pixels(Image.fromarray(image), 30, mean, std)
    cropped = center_crop_pixels(Image.fromarray(image), 30, mean, std)
    assert np.abs(padded[15, 1] - red).max() < 0.3  # the strip survives padding ...
    assert np.abs(cropped - red).max(axis=-1).min() > 1.0  # ... and is cut away by the crop
    assert np.abs(padded[0, 15] - 0).max() < 0.05  # the pad is the mean colour (0 after normalising)
    args = ol.ModelArgs(vision_config=dict(VISION_CONFIG), text_config=dict(TEXT_CONFIG), image_aspect_ratio="pad")
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        ol.ModelArgs(vision_config=dict(VISION_CONFIG), text_config=dict(TEXT_CONFIG), image_aspect_ratio="stretch")
    processor = Processor(setup[1].tokenizer, args)
    np.testing.assert_allclose(processor.pixels(image)[0].transpose(1, 2, 0),
                               pad_to_square_pixels(Image.fromarray(image), 28, mean, std))


def test_batched_encoder_call_equals_one_by_one(setup):
    model, processor = setup
    rng = np.random.default_rng(1)
    images = [(rng.random((30 + 5 * i, 40, 3)) * 255).astype(np.uint8) for i in range(3)]
    batch = [processor("<image> a", images=images[:1]), processor("the", images=[]),
             processor("<image> <image> b", images=images[1:])]
    together = model.encode_vision(batch)
    assert together[1] is None and together[2].shape[0] == 2 * 16
    for inputs, feats in zip(batch, together):
        alone = np.array(model.get_input_embeddings(inputs)[0][0])
        np.testing.assert_allclose(np.array(model.get_input_embeddings(inputs, vision_features=feats)[0][0]),
                                   alone, atol=1e-5)
