"""Every layout a user has, through the one `load()`: LLaVA-OneVision,
Qwen2-VL and Qwen2.5-VL as released on the Hub (transformers-4 names; Qwen's
flat config), as transformers 5 saves them (nested config), as mlx-vlm's own
converter writes them (plain, 4/8-bit affine, mxfp4, mixed 4/6-bit; for Qwen
`vision_tower.*` and MLX Conv3d patch weights), and this project's `convert`
output loading back in mlx-vlm; then the released layouts of the families
mlx-vlm does not have (POINTS1.5, EVE v1/v2, OpenVision 2).

Tolerances: float folders vs transformers, logits max-abs-diff <= 1e-4 (fp32);
quantized folders, greedy tokens equal to mlx-vlm's on the same folder and the
same prompt ids (and logits to 1e-4 of mlx-vlm's; 3e-2 for mxfp4, whose
embeddings dequantize to bfloat16; bf16 folders are compared after both models
cast their parameters to fp32)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import make_image
from mlx_vlm_native import load
from mlx_vlm_native.convert import convert
from mlx_vlm_native.generate import stream_from_inputs
from convert.write_hf_release import write_checkpoint

TOL = 1e-4
FAMILIES = {"tiny": "LlavaOnevisionForConditionalGeneration",
            "qwen2-vl-tiny": "Qwen2VLForConditionalGeneration",
            "qwen2.5-vl-tiny": "Qwen2_5_VLForConditionalGeneration"}
QUANTIZED = {
    "4bit": dict(quantize=True, q_bits=4, q_group_size=32),
    "8bit": dict(quantize=True, q_bits=8, q_group_size=32),
    "mxfp4": dict(quantize=True, q_bits=4, q_group_size=32, q_mode="mxfp4"),
    "mixed_4_6": dict(quantize=True, q_group_size=32, quant_predicate="mixed_4_6"),
    # what mlx-community mostly ships: bfloat16 weights, 4-bit with bfloat16 scales
    "bf16_4bit": dict(quantize=True, q_bits=4, q_group_size=32, dtype="bfloat16"),
}
BF16_ACTIVATIONS = ("mxfp4",)  # logits compared at 3e-2 there
BF16_WEIGHTS = ("bf16_4bit",)  # compared with both models' float parameters cast to fp32
GREEDY_TOKENS = 8


def mlx_vlm_or_skip():
    try:
        import mlx_vlm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mlx-vlm (the peer, test extra) cannot be imported: {e}")
    from mlx_vlm.convert import convert as peer_convert
    from mlx_vlm.utils import load_model as peer_load_model

    return peer_convert, peer_load_model


def is_qwen(folders) -> bool:
    return "Qwen" in type(folders["hf"]).__name__


def llava_hub_release(v5: Path, hub: Path) -> None:
    """llava-hf/llava-onevision-qwen2-*-ov-hf: transformers-4 key names
    (`vision_tower.vision_model.*`) and `rope_theta` in the text config."""
    weights = mx.load(str(v5 / "model.safetensors"))
    renamed = {}
    for k, v in weights.items():
        if k.startswith("model."):
            k = k[len("model.") :]
        if k.startswith("language_model.") and not k.startswith(("language_model.model.", "language_model.lm_head")):
            k = "language_model.model." + k[len("language_model.") :]
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        if k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        renamed[k] = v
    mx.save_safetensors(str(hub / "model.safetensors"), renamed, metadata={"format": "pt"})
    cfg = json.loads((v5 / "config.json").read_text())
    text = cfg["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    cfg.update(torch_dtype="float32", transformers_version="4.45.0.dev0")
    cfg.pop("dtype", None)
    (hub / "config.json").write_text(json.dumps(cfg))


def hub_release_config(v5: dict) -> dict:
    """A transformers-5 config in the shape of the released Qwen2-VL-2B /
    Qwen2.5-VL-3B config.json files: text keys at the top level, rope_scaling
    {type: mrope}, the vision config with model_type qwen2_vl / qwen2_5_vl,
    in_chans and spatial_patch_size, saved by transformers 4."""
    cfg = {k: v for k, v in v5.items() if k not in ("text_config", "dtype")}
    text = dict(v5["text_config"])
    rope = text.pop("rope_parameters")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings",
              "hidden_act", "tie_word_embeddings", "use_sliding_window", "sliding_window",
              "max_window_layers", "attention_dropout"):
        if k in text:
            cfg[k] = text[k]
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = {k: v for k, v in v5["vision_config"].items() if k not in ("rope_parameters", "dtype")}
    vision.update(model_type=v5["model_type"], in_chans=vision["in_channels"],
                  spatial_patch_size=vision["patch_size"])
    cfg.update(vision_config=vision, torch_dtype="float32", transformers_version="4.41.2")
    return cfg


@pytest.fixture(scope="module", params=list(FAMILIES))
def folders(request, tmp_path_factory):
    """{layout name: folder} for one family, and the transformers model."""
    import transformers

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    ours = write_checkpoint(root / "ours", request.param)
    hf = getattr(transformers, FAMILIES[request.param]).from_pretrained(ours, dtype=torch.float32).eval()
    v5 = root / "transformers5"
    hf.save_pretrained(v5)
    for f in ours.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, v5 / f.name)
    hub = root / "hub"
    shutil.copytree(v5, hub)
    if "Qwen" in FAMILIES[request.param]:
        (hub / "config.json").write_text(json.dumps(hub_release_config(json.loads((v5 / "config.json").read_text()))))
    else:
        llava_hub_release(v5, hub)
    # transformers 5's in-memory names (a `state_dict()` saved as is, e.g. by a training script)
    in_memory = root / "transformers5_state_dict"
    shutil.copytree(v5, in_memory)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    from safetensors.numpy import save_file

    save_file(state, str(in_memory / "model.safetensors"), metadata={"format": "pt"})
    return {"hf": hf, "root": root, "hub": hub, "transformers5": v5, "transformers5_state_dict": in_memory}


def peer_folder(folders, name: str) -> Path:
    """mlx-vlm's converter run on the Hub-layout folder (made once per name)."""
    peer_convert, _ = mlx_vlm_or_skip()
    out = folders["root"] / f"mlx_vlm_{name}"
    if not out.exists():
        peer_convert(str(folders["hub"]), str(out), **QUANTIZED.get(name, {}))
    return out


def image_inputs(processor, seed: int = 1):
    return processor(processor.format_prompt("What is here?", 1), images=[make_image(150, 200, seed)])


def ours_logits(model, inputs) -> np.ndarray:
    embeds, positions = model.get_input_embeddings(inputs)
    logits = model(mx.array(inputs.input_ids)[None], input_embeddings=embeds, positions=positions)
    return np.array(logits[0].astype(mx.float32))


def hf_logits(hf, inputs) -> np.ndarray:
    ids = torch.from_numpy(inputs.input_ids.astype(np.int64))[None]
    with torch.inference_mode():
        if inputs.pack is not None:
            return hf(
                input_ids=ids, mm_token_type_ids=torch.from_numpy(inputs.token_types.astype(np.int64))[None],
                pixel_values=torch.from_numpy(inputs.pack.patches), image_grid_thw=torch.tensor(inputs.image_grids),
            ).logits[0].numpy()
        return hf(
            input_ids=ids, pixel_values=torch.from_numpy(inputs.pixel_values[0])[None],
            image_sizes=torch.tensor([list(inputs.image_sizes[0])]), batch_num_images=torch.tensor([1]),
        ).logits[0].numpy()


def in_float32(*models):
    """Cast the float parameters (scales included) to fp32: a bf16 folder is then
    compared on what was read from it, not on two implementations' bf16 rounding
    (which flips greedy tokens of tiny random models)."""
    from mlx.utils import tree_map

    for m in models:
        m.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v, m.parameters()))


def peer_media(peer, inputs):
    """(pixel_values, keyword arguments) of our processed inputs in mlx-vlm's
    form, the pixels in the checkpoint's dtype as we (and transformers) feed the
    tower: mlx-vlm's LLaVA-OneVision would otherwise run its bf16 tower in fp32."""
    dtype = peer.language_model.model.norm.weight.dtype
    if inputs.pack is not None:
        pixels = mx.array(inputs.pack.patches).astype(dtype)
        return pixels, {"image_grid_thw": mx.array(np.asarray(inputs.image_grids))}
    return mx.array(inputs.pixel_values[0]).astype(dtype), {"image_sizes": [list(inputs.image_sizes[0])]}


def peer_logits(peer, ids, inputs) -> np.ndarray:
    pixels, kwargs = peer_media(peer, inputs)
    return np.array(peer(mx.array(ids)[None], pixels, **kwargs).logits[0].astype(mx.float32))


def peer_greedy(peer, inputs, n: int = GREEDY_TOKENS):
    """mlx-vlm's own generation loop (its KV cache and sampler), greedy."""
    from mlx_vlm.generate import generate_step

    pixels, kwargs = peer_media(peer, inputs)
    ids = mx.array([int(i) for i in inputs.input_ids])[None]
    steps = generate_step(ids, peer, pixels, None, max_tokens=n, temperature=0.0, **kwargs)
    return [int(token) for token, _ in steps]


def ours_greedy(model, processor, inputs, n: int = GREEDY_TOKENS):
    """Our generation path (KV cache, M-RoPE continuation), without stopping at EOS."""
    import time

    eos = processor.tokenizer.eos_token_ids
    processor.tokenizer.eos_token_ids = set()
    try:
        stream = stream_from_inputs(model, processor, inputs, time.perf_counter(), max_tokens=n)
        return [r.token for r in stream if r.token is not None]
    finally:
        processor.tokenizer.eos_token_ids = eos


@pytest.mark.parametrize("layout", ["hub", "transformers5", "transformers5_state_dict", "mlx_vlm_plain"])
def test_float_layouts_match_transformers(folders, layout):
    folder = peer_folder(folders, "plain") if layout == "mlx_vlm_plain" else folders[layout]
    model, processor = load(str(folder))
    inputs = image_inputs(processor)
    diff = np.abs(ours_logits(model, inputs) - hf_logits(folders["hf"], inputs)).max()
    print(f"{layout}: max|logits - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_mlx_vlm_folder_has_the_peer_layout(folders):
    """What makes these folders different from the Hub's (the reason Qwen's failed):
    MLX-layout convolution weights, and for Qwen `vision_tower.*` names."""
    weights = mx.load(str(peer_folder(folders, "plain") / "model.safetensors"))
    if is_qwen(folders):
        assert not any(k.startswith("visual.") for k in weights)
        assert weights["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)
    else:
        assert weights["vision_tower.vision_model.embeddings.patch_embedding.weight"].shape == (32, 14, 14, 3)


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_mlx_vlm_folders_match_the_peer(folders, name):
    _, peer_load_model = mlx_vlm_or_skip()
    folder = peer_folder(folders, name)
    config = json.loads((folder / "config.json").read_text())
    if name == "mixed_4_6":  # per-module settings beside the global ones
        assert any(isinstance(v, dict) for v in config["quantization"].values())
    model, processor = load(str(folder))
    peer = peer_load_model(folder)
    if name in BF16_WEIGHTS:
        in_float32(model, peer)
    inputs = image_inputs(processor, seed=2)
    diff = np.abs(ours_logits(model, inputs) - peer_logits(peer, inputs.input_ids, inputs)).max()
    ours, theirs = ours_greedy(model, processor, inputs), peer_greedy(peer, inputs)
    print(f"{name}: max|logits - mlx-vlm| = {diff:.2e}; tokens {ours} vs {theirs}")
    # mxfp4 embeddings dequantize to bfloat16 (in both), so activations are bf16 there
    assert diff <= (3e-2 if name in BF16_ACTIVATIONS else TOL)
    assert ours == theirs


@pytest.mark.parametrize("source", ["hub", "transformers5"])
def test_our_converted_folder_loads_in_mlx_vlm(folders, source, tmp_path):
    mlx_vlm_or_skip()
    out = convert(str(folders[source]), str(tmp_path / "ours"))
    if is_qwen(folders):
        weights = mx.load(str(out / "model.safetensors"))
        assert weights["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)
        config = json.loads((out / "config.json").read_text())
        assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
    from mlx_vlm import load as peer_load

    peer, peer_processor = peer_load(str(out))  # the peer's whole load, its processor included
    assert peer_processor is not None
    model, processor = load(str(out))
    inputs = image_inputs(processor, seed=3)
    ref = hf_logits(folders["hf"], inputs)
    peer_diff = np.abs(peer_logits(peer, inputs.input_ids, inputs) - ref).max()
    ours_diff = np.abs(ours_logits(model, inputs) - ref).max()
    print(f"convert {source}: mlx-vlm {peer_diff:.2e}, ours {ours_diff:.2e} vs transformers")
    assert peer_diff <= TOL and ours_diff <= TOL


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_our_quantized_folder_loads_in_mlx_vlm(folders, name, tmp_path):
    """`convert -q` with mlx-vlm's flags (--q-mode, --quant-predicate)."""
    _, peer_load_model = mlx_vlm_or_skip()
    out = convert(str(folders["hub"]), str(tmp_path / name), **QUANTIZED[name])
    peer = peer_load_model(out)
    model, processor = load(str(out))
    if name in BF16_WEIGHTS:
        in_float32(model, peer)
    inputs = image_inputs(processor, seed=4)
    ours, theirs = ours_greedy(model, processor, inputs), peer_greedy(peer, inputs)
    print(f"our {name} in mlx-vlm: tokens {ours} vs {theirs}")
    assert ours == theirs


def test_family_from_weight_names_alone(folders, tmp_path):
    """A config.json with neither model_type nor architectures still loads:
    the weight names tell the family."""
    folder = tmp_path / "anonymous"
    shutil.copytree(folders["hub"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("model_type", "architectures"):
        cfg.pop(key, None)
    (folder / "config.json").write_text(json.dumps(cfg))
    model, processor = load(str(folder))
    reference, _ = load(str(folders["hub"]))
    inputs = image_inputs(processor, seed=5)
    assert type(model) is type(reference)
    assert np.array_equal(ours_logits(model, inputs), ours_logits(reference, inputs))


def test_unknown_layout_names_layouts_and_unexpected_keys(folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folders["hub"], bad)
    weights = mx.load(str(bad / "model.safetensors"))
    tower = "visual." if is_qwen(folders) else "vision_tower.vision_model."
    weights = {k.replace(tower, "vision_encoder_v9.", 1): v for k, v in weights.items()}
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    with pytest.raises(ValueError) as e:
        load(str(bad))
    message = str(e.value)
    first_missing = "'visual.blocks.0.attn.proj.bias'" if is_qwen(folders) else "'vision_tower.embeddings."
    assert "missing" in message and first_missing in message
    assert "unexpected" in message and "vision_encoder_v9." in message
    assert "layouts tried" in message and "mlx-vlm" in message and "Hub release" in message


# ---------------------------------------------------------------- released Hub layouts of the other families


def fake_hub(monkeypatch, repos: dict, fetched: list):
    """huggingface_hub's listing and download over local folders: a download
    copies only the files matching `allow_patterns`, as the Hub does."""
    import fnmatch

    import huggingface_hub

    def list_repo_files(repo_id, revision=None, **_):
        return sorted(f.name for f in repos[repo_id].iterdir())

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **_):
        dst = repos[repo_id].parent / (repos[repo_id].name + "_snapshot")
        dst.mkdir(exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, dst / f.name)
                fetched.append(f.name)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def text_logits(model, processor, prompt="Hello there") -> np.ndarray:
    ids = processor.tokenizer.encode(prompt)
    return np.array(model(mx.array(ids)[None])[0])


def test_points_release_config_without_model_type(tmp_path, monkeypatch):
    """POINTS-1-5-Qwen-2-5-7B-Chat's config.json: no model_type, an auto_map to
    its own code. The family comes from `architectures`; the code never runs
    and nothing prompts (the tokenizer is loaded with trust_remote_code=False)."""
    import builtins

    src = write_checkpoint(tmp_path / "points", "points-tiny", seed=3)
    release = tmp_path / "release"
    shutil.copytree(src, release)
    cfg = json.loads((src / "config.json").read_text())
    (release / "config.json").write_text(json.dumps({
        "_commit_hash": None, "architectures": ["POINTSV15ChatModel"],
        "auto_map": {"AutoConfig": "configuration_pointsv15_chat.POINTSV15ChatConfig",
                     "AutoModelForCausalLM": "modeling_pointsv15_chat.POINTSV15ChatModel"},
        "llm_config": cfg["llm_config"], "torch_dtype": "float32", "transformers_version": None,
        "vision_config": cfg["vision_config"],
    }))
    ran = tmp_path / "REMOTE_CODE_RAN"
    for name in ("configuration_pointsv15_chat.py", "modeling_pointsv15_chat.py"):
        (release / name).write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    tokenizer_config = json.loads((release / "tokenizer_config.json").read_text())
    tokenizer_config.pop("tokenizer_class", None)  # so transformers would consult config.json
    (release / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    def no_prompt(*_):
        raise AssertionError("the load prompted for input")

    monkeypatch.setattr(builtins, "input", no_prompt)
    model, processor = load(str(release))
    reference, ref_processor = load(str(src))
    assert not ran.exists()
    assert np.array_equal(text_logits(model, processor), text_logits(reference, ref_processor))
    # and a Hub-id load fetches no code
    fetched = []
    fake_hub(monkeypatch, {"WePOINTS/POINTS-tiny": release}, fetched)
    load("WePOINTS/POINTS-tiny")
    assert "model.safetensors" in fetched and not any(f.endswith(".py") for f in fetched)


def test_eve_v1_bin_shards_by_hub_id(tmp_path, monkeypatch):
    """EVE-7B(-HD)-v1.0 ship `pytorch_model-0000x-of-0000N.bin` + index."""
    from convert.write_eve_release import write_checkpoint as write_eve

    local = write_eve(tmp_path / "local")
    repo = write_eve(tmp_path / "repo", weights_format="bin")
    state = torch.load(repo / "pytorch_model.bin", weights_only=True)
    (repo / "pytorch_model.bin").unlink()
    keys = sorted(state)
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, repo / name)
        index["weight_map"].update({k: name for k in part})
    (repo / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    fetched = []
    fake_hub(monkeypatch, {"BAAI/EVE-tiny-v1.0": repo}, fetched)
    model, processor = load("BAAI/EVE-tiny-v1.0")
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json"} <= set(fetched)
    reference, ref_processor = load(str(local))
    assert np.array_equal(text_logits(model, processor), text_logits(reference, ref_processor))


@pytest.mark.parametrize("width_key", ["mm_hidden_size", "vision_tower_hidden_size"])
def test_eve_v2_resolution_from_tower_name_and_width_key(tmp_path, width_key):
    """EVE-7B-HD-v2.0 without preprocessor_config.json: the canvas comes from
    `mm_vision_tower` ("...-res1600-..."); the tower width from `mm_hidden_size`
    (what EVEv2's trainer writes) or `vision_tower_hidden_size`."""
    from convert.write_eve_release import write_checkpoint_v2

    folder = write_checkpoint_v2(tmp_path / "v2", max_size=96)
    reference, ref_processor = load(str(folder))
    (folder / "preprocessor_config.json").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg[width_key] = cfg.pop("mm_hidden_size")
    (folder / "config.json").write_text(json.dumps(cfg))
    model, processor = load(str(folder))
    assert processor.image_processor.max_size == 96
    image = make_image(200, 300)
    assert processor.image_processor.grid(image.size) == ref_processor.image_processor.grid(image.size)
    text = processor.format_prompt("What?", 1)
    a, b = processor(text, images=[image]), ref_processor(text, images=[image])
    la = model(mx.array(a.input_ids)[None], input_embeddings=model.get_input_embeddings(a)[0])
    lb = reference(mx.array(b.input_ids)[None], input_embeddings=reference.get_input_embeddings(b)[0])
    assert np.array_equal(np.array(la), np.array(lb))
    cfg["mm_vision_tower"] = "openai/eve-anyratio-res1600-patch16"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load(str(folder))[1].image_processor.max_size == 1600


def test_openvision2_folders_through_load(tmp_path, monkeypatch):
    """A released `*-vision-only` open_clip folder and its converted MLX folder
    load with the same `load()`, which hands back the caption processor."""
    from convert.write_open_clip_release import write_tiny_open_clip
    from mlx_vlm_native.caption import caption

    released = write_tiny_open_clip(tmp_path / "released", weights_format="bin")
    image = make_image(40, 40)
    expected = caption(str(released), image, max_tokens=6)
    for folder in (released, convert(str(released), str(tmp_path / "mlx"))):
        model, processor = load(str(folder))
        assert type(model).__module__ == "mlx_vlm_native.models.openvision"
        assert caption(model, image, max_tokens=6, processor=processor) == expected
    fetched = []
    fake_hub(monkeypatch, {"UCSC-VLAA/openvision2-tiny-vision-only": released}, fetched)
    model, processor = load("UCSC-VLAA/openvision2-tiny-vision-only")
    assert {"open_clip_pytorch_model.bin", "caption_decoder.safetensors"} <= set(fetched)
    assert caption(model, image, max_tokens=6, processor=processor) == expected


def test_unknown_family_names_what_was_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooVLM"], "auto_map": {"AutoModel": "m.FooVLM"}}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"foo.weight": mx.zeros((2,))})
    with pytest.raises(ValueError, match=r"model_type None is not supported \(architectures/auto_map: \['FooVLM'\]"):
        load(str(tmp_path))


def test_offline_hub_id_uses_the_cached_snapshot(tmp_path, monkeypatch):
    """Without the Hub (HF_HUB_OFFLINE) the listing fails; the download then asks
    the cache for every weight format rather than giving up."""
    import huggingface_hub

    from mlx_vlm_native.utils import get_model_path

    asked = []

    def offline(*_, **__):
        raise OSError("offline")

    def cached(repo_id, revision=None, allow_patterns=None, **_):
        asked.extend(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert get_model_path("BAAI/EVE-7B-v1.0") == tmp_path
    assert {"*.safetensors", "pytorch_model*.bin", "pytorch_model.bin.index.json"} <= set(asked)
    assert not any(p.endswith(".py") for p in asked)
