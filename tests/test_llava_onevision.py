"""LLaVA-OneVision in MLX against transformers on a tiny random checkpoint
(fp32; tolerances: features and logits max-abs-diff <= 1e-4, greedy tokens equal)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.generate import generate_step

from conftest import make_image

TOL = 1e-4


def hf_pixels(inputs):
    """Our per-image tile stacks as transformers' zero-padded 5-D batch."""
    n = max(len(p) for p in inputs.pixel_values)
    padded = [np.concatenate([p, np.zeros((n - len(p), *p.shape[1:]), p.dtype)]) for p in inputs.pixel_values]
    return torch.from_numpy(np.stack(padded))


def hf_forward(hf_model, inputs):
    kwargs = dict(input_ids=torch.from_numpy(inputs.input_ids.astype(np.int64))[None])
    if inputs.pixel_values:
        kwargs.update(
            pixel_values=hf_pixels(inputs),
            image_sizes=torch.tensor([list(s) for s in inputs.image_sizes]),
            batch_num_images=torch.tensor([len(inputs.pixel_values)]),
        )
    if inputs.video_frames:
        kwargs["pixel_values_videos"] = torch.from_numpy(np.stack(inputs.video_frames))
    with torch.inference_mode():
        return hf_model(**kwargs).logits[0].numpy()


def mlx_logits(model, inputs):
    embeds, positions = model.get_input_embeddings(inputs)
    return np.array(model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions)[0])


def test_vision_tower_matches(hf_model, mlx_model):
    model, processor = mlx_model
    pixels = processor.image_processor.anyres_crops(np.asarray(make_image(500, 800)).transpose(2, 0, 1))
    with torch.inference_mode():
        out = hf_model.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True)
    ref = out.hidden_states[-1].numpy()
    ours = np.array(model.vision_tower(mx.array(pixels.transpose(0, 2, 3, 1)), output_layer=-1))
    assert np.abs(ours - ref).max() <= TOL
    full = np.array(model.vision_tower(mx.array(pixels.transpose(0, 2, 3, 1))))
    assert np.abs(full - out.last_hidden_state.numpy()).max() <= TOL


@pytest.mark.parametrize("h,w", [(384, 384), (500, 800), (1000, 300), pytest.param(2000, 2200, marks=pytest.mark.slow)])
def test_packed_image_features_match(hf_model, mlx_model, h, w):
    """Projector + AnyRes packing (unpad, anyres_max_9 down-sampling, newlines)."""
    model, processor = mlx_model
    inputs = processor("<image>", images=[make_image(h, w)])
    with torch.inference_mode():
        ref = hf_model.model.get_image_features(
            pixel_values=hf_pixels(inputs),
            image_sizes=torch.tensor([[h, w]]),
            batch_num_images=torch.tensor([1]),
        ).pooler_output[0].numpy()
    n_expected = processor.num_image_tokens((h, w), multi_image=False)
    assert ref.shape[0] == n_expected == len(inputs.input_ids)
    ours = np.array(model.image_features(inputs.pixel_values, inputs.image_sizes, False))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_token_counts_match_transformers_processor(mlx_model):
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor as HFProcessor,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    _, processor = mlx_model
    hf = HFProcessor.__new__(HFProcessor)  # no tokenizer/video processor needed here
    hf.image_processor = LlavaOnevisionImageProcessorPil()
    hf.num_image_tokens = 729
    hf.vision_aspect_ratio = "anyres_max_9"
    for h, w in [(384, 384), (500, 800), (1000, 300), (2000, 2200), (37, 901), (3000, 500)]:
        assert processor.num_image_tokens((h, w), False) == hf._get_number_of_features(h, w, 384, 384)
    assert processor.num_image_tokens((500, 800), False) == 4829
    assert processor.num_image_tokens((2000, 2200), False) == 7274


def test_single_image_logits_match(hf_model, mlx_model):
    model, processor = mlx_model
    prompt = processor.format_prompt("What is shown in this image?", num_images=1)
    inputs = processor(prompt, images=[make_image(300, 520, 3)])
    ref = hf_forward(hf_model, inputs)
    ours = mlx_logits(model, inputs)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_multi_image_logits_match(hf_model, mlx_model):
    model, processor = mlx_model
    prompt = processor.format_prompt("Compare the two images.", num_images=2)
    inputs = processor(prompt, images=[make_image(200, 500, 1), make_image(640, 320, 2)])
    assert (inputs.input_ids == model.args.image_token_index).sum() == 2 * (729 + 1)
    assert np.abs(mlx_logits(model, inputs) - hf_forward(hf_model, inputs)).max() <= TOL


def test_video_logits_match(hf_model, mlx_model):
    model, processor = mlx_model
    frames = [make_image(240, 320, s) for s in range(4)]
    prompt = processor.format_prompt("Describe this video.", num_videos=1)
    inputs = processor(prompt, videos=[frames])
    assert (inputs.input_ids == model.args.video_token_index).sum() == 4 * 14 * 14 + 1
    assert np.abs(mlx_logits(model, inputs) - hf_forward(hf_model, inputs)).max() <= TOL


def test_greedy_generation_matches(hf_model, mlx_model):
    model, processor = mlx_model
    prompt = processor.format_prompt("Describe the picture in detail.", num_images=1)
    inputs = processor(prompt, images=[make_image(420, 380, 5)])
    embeds = model.get_input_embeddings(inputs)[0][0]
    ours = [t for t, _ in generate_step(mx.array(inputs.input_ids), model, max_tokens=20, input_embeddings=embeds)]
    ids = torch.from_numpy(inputs.input_ids.astype(np.int64))[None]
    with torch.inference_mode():
        ref = hf_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=hf_pixels(inputs),
            image_sizes=torch.tensor([list(inputs.image_sizes[0])]), batch_num_images=torch.tensor([1]),
            max_new_tokens=20, min_new_tokens=20, do_sample=False,
        )[0, ids.shape[1]:].tolist()
    assert len(set(ours)) > 3, "degenerate test: the model repeats one token"
    assert ours == ref


def test_placeholder_count_mismatch_is_an_error(mlx_model):
    _, processor = mlx_model
    prompt = processor.format_prompt("two?", num_images=2)
    with pytest.raises(ValueError, match="2 image placeholder"):
        processor(prompt, images=[make_image(64, 64)])


def test_prompt_longer_than_context_is_an_error(mlx_model):
    from mlx_vlm_native import generate

    model, processor = mlx_model
    limit = model.args.text_config.max_position_embeddings
    model.args.text_config.max_position_embeddings = 100
    try:
        with pytest.raises(ValueError, match="context is 100 tokens"):
            generate(model, processor, "hi", images=[make_image(64, 64)])
    finally:
        model.args.text_config.max_position_embeddings = limit
