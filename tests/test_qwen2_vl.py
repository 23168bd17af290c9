"""Qwen2-VL and Qwen2.5-VL (packed tower + M-RoPE decoder) against transformers
on tiny random checkpoints that transformers loads and re-saves (fp32;
tolerances: logits max-abs-diff <= 1e-4 at every position, greedy tokens equal;
bf16: see BF16_TOL)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import make_image
from mlx_vlm_native import batch_generate, generate, load, stream_generate
from mlx_vlm_native.models import qwen2_vl
from convert.write_hf_release import TINY_MAX_PIXELS, TINY_MIN_PIXELS, write_checkpoint

TOL = 1e-4
# bf16 weights and activations in both against transformers' bf16 on the CPU: max |diff| over
# all logits (scale ~4) and its mean. Measured on whichever path the run loads: with host ops
# 0.086 / 0.0098 (Qwen2-VL), 0.068 / 0.0089 (Qwen2.5-VL); plain MLX (MLX_VLM_NATIVE_HOST_OPS=0)
# 0.109 / 0.0096 and 0.066 / 0.0091; transformers' own bf16 logits are up to 0.118 (Qwen2-VL) and
# 0.077 (Qwen2.5-VL) from its fp32 ones.
BF16_TOL, BF16_MEAN_TOL = 0.15, 0.015
FAMILIES = {"qwen2-vl-tiny": "Qwen2VLForConditionalGeneration",
            "qwen2.5-vl-tiny": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(transformers model, its saved folder, our model, our processor)."""
    import transformers

    torch.set_num_threads(1)
    ours_dir = write_checkpoint(tmp_path_factory.mktemp("ours"), request.param)
    cls = getattr(transformers, FAMILIES[request.param])
    hf = cls.from_pretrained(ours_dir, dtype=torch.float32).eval()
    hf_dir = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(hf_dir)
    for f in ours_dir.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, hf_dir / f.name)
    model, processor = load(str(hf_dir))
    return hf, hf_dir, model, processor


def hf_processor(hf_dir):
    """transformers' processor without its (torchvision) video processor."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImagesOnly(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImagesOnly(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS),
        tokenizer=AutoTokenizer.from_pretrained(hf_dir),
        chat_template=(hf_dir / "chat_template.jinja").read_text(),
    )


def hf_logits(hf, inputs):
    kwargs = dict(
        input_ids=torch.from_numpy(inputs.input_ids.astype(np.int64))[None],
        mm_token_type_ids=torch.from_numpy(inputs.token_types.astype(np.int64))[None],
    )
    n_image = sum(t * h * w for t, h, w in inputs.image_grids)
    if inputs.image_grids:
        kwargs["pixel_values"] = torch.from_numpy(inputs.pack.patches[:n_image])
        kwargs["image_grid_thw"] = torch.tensor(inputs.image_grids)
    if inputs.video_grids:
        kwargs["pixel_values_videos"] = torch.from_numpy(inputs.pack.patches[n_image:])
        kwargs["video_grid_thw"] = torch.tensor(inputs.video_grids)
        if "Qwen2_5" in type(hf).__name__:
            kwargs["second_per_grid_ts"] = torch.tensor(inputs.video_seconds_per_grid)
    with torch.inference_mode():
        return hf(**kwargs).logits[0].numpy()


def mlx_logits(model, inputs):
    embeds, positions = model.get_input_embeddings(inputs)
    return np.array(model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions)[0])


def test_processor_matches_transformers(family):
    _, hf_dir, _, processor = family
    images = [make_image(300, 500, 1), make_image(90, 60, 2)]
    text = processor.format_prompt("Compare these.", num_images=2)
    ref = hf_processor(hf_dir)(text=[text], images=images, return_tensors="np")
    ours = processor(text, images=images)
    assert np.array_equal(ours.input_ids, ref["input_ids"][0])
    assert np.array_equal(ours.token_types, ref["mm_token_type_ids"][0])
    assert [list(g) for g in ours.image_grids] == ref["image_grid_thw"].tolist()
    assert np.abs(ours.pack.patches - ref["pixel_values"]).max() <= 1e-5


@pytest.mark.parametrize("case", ["two_images", "video_and_image", "text_only"])
def test_logits_match(family, case):
    hf, _, model, processor = family
    images, videos = [], []
    if case == "two_images":
        images = [make_image(300, 500, 1), make_image(120, 70, 2)]
    elif case == "video_and_image":
        videos = [[make_image(100, 140, s) for s in range(4)]]  # 2 temporal patches
        images = [make_image(80, 200, 5)]
    text = processor.format_prompt("What is here?", len(images), len(videos))
    inputs = processor(text, images=images, videos=videos)
    ours, ref = mlx_logits(model, inputs), hf_logits(hf, inputs)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_text_prompt_after_image_prompt_uses_plain_positions(family):
    """The M-RoPE positions of the last image prompt must not leak into a
    plain `model(ids)` call."""
    hf, _, model, processor = family
    mlx_logits(model, processor(processor.format_prompt("x", 1), images=[make_image(200, 200)]))
    ids = processor(processor.format_prompt("Hello there, how are you?")).input_ids
    ours = np.array(model(mx.array(ids)[None])[0])
    with torch.inference_mode():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0].numpy()
    assert np.abs(ours - ref).max() <= TOL


def test_greedy_tokens_identical(family):
    hf, _, model, processor = family
    image = make_image(250, 330, 3)
    text = processor.format_prompt("Describe the picture.", 1)
    inputs = processor(text, images=[image])
    stream = stream_generate(model, processor, text, images=[image], max_tokens=12, apply_chat_template=False)
    ours = [r.token for r in stream if r.token is not None]
    kwargs = dict(
        input_ids=torch.from_numpy(inputs.input_ids.astype(np.int64))[None],
        mm_token_type_ids=torch.from_numpy(inputs.token_types.astype(np.int64))[None],
        pixel_values=torch.from_numpy(inputs.pack.patches), image_grid_thw=torch.tensor(inputs.image_grids),
    )
    with torch.inference_mode():
        ref = hf.generate(**kwargs, max_new_tokens=12, do_sample=False)[0, len(inputs.input_ids):].tolist()
    eos = set(processor.tokenizer.eos_token_ids)
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert len(ours) >= 1
    assert ours == ref


def test_rope_index_matches_transformers(family):
    hf, _, model, processor = family
    videos = [[make_image(100, 140, s) for s in range(4)]]
    images = [make_image(80, 200, 5), make_image(150, 60, 6)]
    inputs = processor(processor.format_prompt("q", 2, 1), images=images, videos=videos)
    kwargs = dict(
        input_ids=torch.from_numpy(inputs.input_ids.astype(np.int64))[None],
        mm_token_type_ids=torch.from_numpy(inputs.token_types.astype(np.int64))[None],
        image_grid_thw=torch.tensor(inputs.image_grids), video_grid_thw=torch.tensor(inputs.video_grids),
    )
    if "Qwen2_5" in type(hf).__name__:
        kwargs["second_per_grid_ts"] = torch.tensor(inputs.video_seconds_per_grid)
    ref_pos, ref_delta = hf.model.get_rope_index(**kwargs)
    pos, delta = qwen2_vl.rope_index(
        inputs.token_types, inputs.image_grids, inputs.video_grids, 2,
        model.args.video_time_intervals(inputs.video_seconds_per_grid),
    )
    assert np.array_equal(pos, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta[0, 0])


def test_batch_of_prompts_runs_one_encoder_call(family, vision_calls):
    _, _, model, processor = family
    prompts = ["One image.", "Two images.", "No image.", "A tall image."]
    images = [[make_image(120, 200, 1)], [make_image(60, 60, 2), make_image(300, 90, 3)], [], [make_image(400, 50, 4)]]
    singles = [generate(model, processor, p, images=i, max_tokens=6) for p, i in zip(prompts, images)]
    vision_calls.clear()  # the single-prompt runs above
    batched = batch_generate(model, processor, prompts, images=images, max_tokens=6)
    assert vision_calls == [4]  # one packed call holding all four images
    assert [r.text for r in batched] == [r.text for r in singles]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in singles]


def test_hub_config_layout_loads_the_same(family, tmp_path):
    """The hub's flat config (text keys at the top, rope_scaling type mrope)."""
    _, hf_dir, model, processor = family
    config = json.loads((hf_dir / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k != "model_type"})
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    for f in hf_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    flat, _ = load(str(tmp_path))
    inputs = processor(processor.format_prompt("x", 1), images=[make_image(140, 90)])
    assert np.array_equal(mlx_logits(flat, inputs), mlx_logits(model, inputs))


def test_bad_inputs(family):
    _, hf_dir, model, processor = family
    with pytest.raises(ValueError, match="1 image placeholder"):
        processor(processor.format_prompt("x", 1), images=[])
    config = json.loads((hf_dir / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match="mrope_section"):
        qwen2_vl.ModelArgs.from_dict(config)


def test_bf16_logits_match_transformers(family, tmp_path):
    """A bf16 folder (our convert) against transformers in bf16, two images; the
    path the model takes is this run's (host ops, or plain MLX in .ci/run's second pass)."""
    import copy

    from mlx_vlm_native.convert import convert

    hf, hf_dir, _, _ = family
    convert(str(hf_dir), str(tmp_path / "bf16"), dtype="bfloat16")
    model, processor = load(str(tmp_path / "bf16"))
    assert model.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
    images = [make_image(300, 500, 1), make_image(120, 70, 2)]
    inputs = processor(processor.format_prompt("What is here?", 2), images=images)
    embeds, positions = model.get_input_embeddings(inputs)
    ours = model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions)[0]
    assert ours.dtype == mx.bfloat16
    ours = np.array(ours.astype(mx.float32))
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.inference_mode():
        ref = hf_bf16(
            input_ids=torch.from_numpy(inputs.input_ids.astype(np.int64))[None],
            mm_token_type_ids=torch.from_numpy(inputs.token_types.astype(np.int64))[None],
            pixel_values=torch.from_numpy(inputs.pack.patches), image_grid_thw=torch.tensor(inputs.image_grids),
        ).logits[0].float().numpy()
    diff = np.abs(ours - ref)
    assert diff.max() <= BF16_TOL and diff.mean() <= BF16_MEAN_TOL, (diff.max(), diff.mean())
