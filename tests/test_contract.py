"""The model contract (`models/base.VisionLanguageModel`) and the processor
contract (`processors/base.Processor`): every VLM family of the registry
implements both, and on each family's tiny random checkpoint they do what
generate, chat, serve, batch_generate and finetuning rely on."""

import dataclasses
import importlib

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import make_image
from convert.write_eve_release import write_checkpoint as write_eve
from convert.write_eve_release import write_checkpoint_v2 as write_eve_v2
from convert.write_hf_release import write_checkpoint
from mlx_vlm_native.models.base import TEXT, VisionLanguageModel
from mlx_vlm_native.processors.base import Processor
from mlx_vlm_native.utils import DEFAULT_MODEL, FAMILIES, load

CAPTIONERS = {"openvision2"}  # an image captioner (`caption`), not a chat VLM
CHECKPOINTS = {  # a tiny checkpoint of each VLM family: (family module, writer)
    "llava_onevision": ("llava_onevision", lambda path: write_checkpoint(path, "tiny")),
    "qwen2_vl": ("qwen2_vl", lambda path: write_checkpoint(path, "qwen2-vl-tiny")),
    "points_v15": ("points_v15", lambda path: write_checkpoint(path, "points-tiny")),
    "eve": ("eve", write_eve),
    "eve-qwen2": ("eve_v2", write_eve_v2),
    "openvision_llava": ("openvision_llava", lambda path: DEFAULT_MODEL),
}
MROPE_FAMILIES = {"qwen2_vl"}  # the families whose positions are not plain 1-D ones
CONTRACT = ("layers", "encode_vision", "get_input_embeddings", "__call__")
PROCESSOR_CONTRACT = ("format_prompt", "num_prompt_tokens", "__call__")  # format_messages: where a template renders


def test_every_registered_vlm_family_implements_the_contract():
    vlms = [f.module for f in FAMILIES if f.module not in CAPTIONERS]
    assert sorted(vlms) == sorted({module for module, _ in CHECKPOINTS.values()})
    for module in vlms:
        model_class = importlib.import_module(f"mlx_vlm_native.models.{module}").Model
        assert issubclass(model_class, VisionLanguageModel), module
        for name in CONTRACT:
            assert getattr(model_class, name) is not getattr(VisionLanguageModel, name), (module, name)
        processor_class = importlib.import_module(f"mlx_vlm_native.processors.{module}").Processor
        assert issubclass(processor_class, Processor), module
        for name in PROCESSOR_CONTRACT:
            assert getattr(processor_class, name) is not getattr(Processor, name), (module, name)


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    module, writer = CHECKPOINTS[request.param]
    model, processor = load(str(writer(tmp_path_factory.mktemp(request.param))))
    return module, model, processor


def test_contract_on_a_tiny_checkpoint(loaded):
    module, model, processor = loaded
    assert isinstance(processor, Processor) and processor.image_token_id is not None
    with_image = processor(processor.format_prompt("What is here?", 1), images=[make_image(60, 90, 3)])
    text_only = processor(processor.format_prompt("Hello there.", 0))

    # one vision pass for a batch: features for the prompt with an image, None without
    features = model.encode_vision([with_image, text_only])
    assert len(features) == 2 and features[1] is None
    assert features[0].ndim == 2 and features[0].shape[0] > 0

    # the batch's features embed the prompt exactly as encoding it alone does
    embeds, positions = model.get_input_embeddings(with_image, vision_features=features[0])
    alone, alone_positions = model.get_input_embeddings(with_image)
    L = len(with_image.input_ids)
    assert embeds.shape[:2] == (1, L)
    assert np.array_equal(np.array(embeds), np.array(alone))
    if module in MROPE_FAMILIES:
        assert positions.shape == (3, L) and np.array_equal(positions, alone_positions)
        assert not np.array_equal(positions, np.broadcast_to(np.arange(L), (3, L)))  # not 1-D ones
    else:
        assert positions is None and alone_positions is None

    # a prompt prefilled in two chunks with its positions gives the whole forward's logits
    ids = mx.array(with_image.input_ids)[None]
    whole = model(ids, input_embeddings=embeds, positions=positions)
    cache, k = make_prompt_cache(model), L // 2
    model(ids[:, :k], cache=cache, input_embeddings=embeds[:, :k], positions=positions)
    last = model(ids[:, k:], cache=cache, input_embeddings=embeds[:, k:], positions=positions)
    np.testing.assert_allclose(np.array(last[0, -1]), np.array(whole[0, -1]), atol=1e-5)

    # a token-only step continues from what the cache holds: as the prompt with that token appended
    token = int(mx.argmax(whole[0, -1]).item())
    step = model(mx.array([[token]]), cache=cache)
    longer = dataclasses.replace(
        with_image, input_ids=np.append(with_image.input_ids, token).astype(np.int32),
        token_types=None if with_image.token_types is None else np.append(with_image.token_types, TEXT),
    )
    longer_embeds, longer_positions = model.get_input_embeddings(longer, vision_features=features[0])
    reference = model(mx.array(longer.input_ids)[None], input_embeddings=longer_embeds, positions=longer_positions)
    np.testing.assert_allclose(np.array(step[0, -1]), np.array(reference[0, -1]), atol=1e-5)

    # a text-only prompt needs no vision features
    text_embeds, _ = model.get_input_embeddings(text_only, vision_features=features[1])
    assert text_embeds.shape[:2] == (1, len(text_only.input_ids))
