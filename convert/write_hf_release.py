"""Random-weight checkpoints in their released layouts, at any geometry: tiny
ones for tests and the demo, real-size ones for benchmarks.

    python convert/write_hf_release.py OUT [--preset tiny|llava-onevision-0.5b|qwen2-vl-tiny|...]

Offline stand-in for a Hub download: feed it to `mlx-vlm-native convert`,
load it in transformers, or benchmark at the real 0.5B geometry.

LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL ones load in transformers as well as
here, which is what makes them parity fixtures; POINTS1.5 ones are written in
its own key layout (original CustomLlama decoder or Qwen2 decoder). No torch
is needed.
"""

import argparse
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_vlm_native.models import llava_onevision, points_v15, qwen2_vl
from mlx_vlm_native.processors.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
QWEN2_VL_SPECIAL_TOKENS = SPECIAL_TOKENS + [
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is shown in this image? Describe the picture in detail.",
    "A red circle and a blue square on a white background.",
    "The cat sits on the mat next to a green ball.",
    "How many objects are there? There are three objects.",
    "Describe this video. A yellow triangle moves from left to right.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Where is the star? The star is at the top left of the image.",
    "Compare the two images: the first is bright, the second is dark.",
]

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)

PRESETS = {
    # tiny widths at the real 384-px / 14-px geometry (729 tokens per tile)
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=384, patch_size=14),
        text=dict(TINY_TEXT),
        vocab_size=None,
        # untied: with tied embeddings a random model just repeats its last token
        tie_word_embeddings=False,
    ),
    # 56-px crops (4x4 tokens per tile): short sequences for training tests
    "tiny-56": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=56, patch_size=14),
        text=dict(TINY_TEXT),
        vocab_size=None,
        tie_word_embeddings=False,
    ),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf sizes
    "llava-onevision-0.5b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                    num_attention_heads=16, image_size=384, patch_size=14),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2),
        vocab_size=152000,
        tie_word_embeddings=True,
    ),
    "qwen2-vl-tiny": dict(
        family="qwen2_vl",
        vision=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu"),
        text=TINY_TEXT, mrope_section=[2, 3, 3], tie_word_embeddings=False,
    ),
    "qwen2.5-vl-tiny": dict(
        family="qwen2_5_vl",
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, hidden_act="silu",
                    window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2),
        text=TINY_TEXT, mrope_section=[2, 3, 3], tie_word_embeddings=False,
    ),
    # POINTS1.5 as released: CustomLlama decoder names with fused k/v and gate/up
    # Qwen2-VL-2B's tower (675M) before a Qwen2-0.5B-sized decoder: the GPU acceptance run's geometry
    "qwen2-vl-0.5b": dict(
        family="qwen2_vl",
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu"),
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2),
        mrope_section=[8, 12, 12], tie_word_embeddings=True, vocab_size=152000,
    ),
    # Qwen/Qwen2-VL-2B-Instruct's config.json geometry (the tower above, a Qwen2-1.5B decoder)
    "qwen2-vl-2b": dict(
        family="qwen2_vl",
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu"),
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2),
        mrope_section=[16, 24, 24], tie_word_embeddings=True, vocab_size=151936,
        pixels=(56 * 56, 28 * 28 * 16384),  # the release's min_pixels, max_pixels
    ),
    "points-tiny": dict(
        family="points_v15", llm_layout="custom_llama",
        vision=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu"),
        text=TINY_TEXT, tie_word_embeddings=False,
    ),
    # later POINTS checkpoints: a Qwen2ForCausalLM decoder
    "points-tiny-qwen2": dict(
        family="points_v15", llm_layout="qwen2",
        vision=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu"),
        text=TINY_TEXT, tie_word_embeddings=False,
    ),
}
# small pixel budgets keep the tiny NaViT models' token counts test-sized
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 56 * 56, 28 * 28 * 256


def build_tokenizer(path: Path, vocab_size: int = 500, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on a fixed
    corpus (deterministic), saved with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(special_tokens)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )
    wrapped.save_pretrained(str(path))
    return wrapped


def hf_config(preset: str, vocab_size: int, image_token: int, video_token: int) -> dict:
    p = PRESETS[preset]
    side = p["vision"]["image_size"]
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_token_index": image_token,
        "video_token_index": video_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)],
        "tie_word_embeddings": p["tie_word_embeddings"],
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "num_channels": 3, "vision_use_head": False,
            **p["vision"],
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": p["tie_word_embeddings"], "hidden_act": "silu", **p["text"],
        },
    }


def random_weights(model, seed: int):
    """(name, fp32 array) of every parameter of `model`, one at a time: fan-in-scaled
    normal weights, norms near 1, small non-zero biases, so that attention
    patterns are far from uniform and layout bugs show. The model's own
    parameters are only read for their shapes (MLX leaves them unevaluated)."""
    rng = np.random.default_rng(seed)
    for k, v in tree_flatten(model.parameters()):
        shape = v.shape
        if ("norm" in k or "ln_q" in k) and k.endswith("weight"):
            a = 1 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("bias") or k == "image_newline":
            a = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in k or "position_embedding" in k:
            a = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        yield k, mx.array(a.astype(np.float32))


def randomize(model, seed: int) -> dict:
    """Every parameter of `random_weights`, in one dict."""
    return dict(random_weights(model, seed))


def to_hf_layout(weights: dict) -> dict:
    """This project's parameter names -> transformers 5's in-memory layout."""
    out = {}
    for k, v in weights.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model.") :]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        else:
            k = "model." + k
        if k.endswith("patch_embedding.weight"):
            v = v.transpose(0, 3, 1, 2)
        out[k] = v
    return out


def write_checkpoint(path, preset: str = "tiny", seed: int = 1) -> Path:
    family = PRESETS[preset].get("family", "llava_onevision")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return write_qwen2_vl_checkpoint(path, preset, seed)
    if family == "points_v15":
        return write_points_checkpoint(path, preset, seed)
    return write_llava_onevision_checkpoint(path, preset, seed)


def write_llava_onevision_checkpoint(path, preset: str, seed: int) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    vocab = PRESETS[preset]["vocab_size"] or len(tok)
    config = hf_config(preset, vocab, tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"))
    model = llava_onevision.Model(llava_onevision.ModelArgs.from_dict(config))
    weights = to_hf_layout(randomize(model, seed))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    side = config["vision_config"]["image_size"]
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "size": {"height": side, "width": side},
        "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "rescale_factor": 1 / 255, "resample": 3,
        "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_convert_rgb": True, "do_pad": True,
    }, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def qwen2_vl_vision_config(p: dict, text_hidden: int) -> dict:
    if p["family"] == "qwen2_5_vl":
        return {"model_type": "qwen2_5_vl_vision", "out_hidden_size": text_hidden, **p["vision"]}
    return {"model_type": "qwen2_vl_vision", "hidden_size": text_hidden, **p["vision"]}


def qwen2_vl_config(preset: str, tok) -> dict:
    """transformers-5 layout: nested text_config with rope_parameters."""
    p = PRESETS[preset]
    ids = tok.convert_tokens_to_ids
    arch = "Qwen2_5_VLForConditionalGeneration" if p["family"] == "qwen2_5_vl" else "Qwen2VLForConditionalGeneration"
    return {
        "architectures": [arch],
        "model_type": p["family"],
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "tie_word_embeddings": p["tie_word_embeddings"],
        "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
        "vision_config": qwen2_vl_vision_config(p, p["text"]["hidden_size"]),
        "text_config": {
            "model_type": p["family"] + "_text", "vocab_size": p.get("vocab_size") or len(tok), "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "hidden_act": "silu",
            "tie_word_embeddings": p["tie_word_embeddings"],
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": p["mrope_section"]},
            **p["text"],
        },
    }


def qwen2_vl_preprocessor_config(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "rescale_factor": 1 / 255, "resample": 3,
    }


def vision_to_hub_layout(weights: dict, prefix: str) -> dict:
    """Tower weights under `prefix`, with the patch embedding as the Conv3d it is."""
    out = {}
    for k, v in weights.items():
        if k == "patch_embed.proj.weight":
            v = v.reshape(v.shape[0], 3, 2, 14, 14)
        out[prefix + k] = v
    return out


def qwen2_vl_hub_name(k: str) -> Optional[str]:
    """Our parameter name -> the hub release's (None: not in the release)."""
    if k.startswith("visual."):
        return k
    if k.startswith("language_model.model."):
        return "model." + k[len("language_model.model.") :]
    if k == "language_model.lm_head.weight":
        return "lm_head.weight"
    return None


def write_qwen2_vl_checkpoint(path, preset: str, seed: int, dtype: Optional[str] = None,
                              shard_bytes: Optional[int] = None) -> Path:
    """The hub release of `preset`: one fp32 `model.safetensors` by default; with
    `shard_bytes`, tensors are drawn one at a time and written in shards of about
    that size with a `model.safetensors.index.json` (peak memory near one shard:
    how billion-parameter presets are written), in `dtype` ("bfloat16", ...) if given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    tok = build_tokenizer(path, special_tokens=QWEN2_VL_SPECIAL_TOKENS, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    config = qwen2_vl_config(preset, tok)
    model = qwen2_vl.Model(qwen2_vl.ModelArgs.from_dict(config))
    cast = (lambda v: v.astype(getattr(mx, dtype))) if dtype else (lambda v: v)
    if shard_bytes is None:
        weights = randomize(model, seed)
        vision = {k[len("visual.") :]: v for k, v in weights.items() if k.startswith("visual.")}
        hub = vision_to_hub_layout(vision, "visual.")
        for k, v in weights.items():
            name = qwen2_vl_hub_name(k)
            if name is not None and not k.startswith("visual."):
                hub[name] = v
        mx.save_safetensors(str(path / "model.safetensors"), {k: cast(v) for k, v in hub.items()},
                            metadata={"format": "pt"})
    else:
        write_shards(path, ((qwen2_vl_hub_name(k), k, v) for k, v in random_weights(model, seed)), cast, shard_bytes)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    pixels = p.get("pixels")
    prep = qwen2_vl_preprocessor_config(*pixels) if pixels else qwen2_vl_preprocessor_config()
    (path / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
    (path / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    return path


def write_shards(path: Path, tensors, cast, shard_bytes: int) -> None:
    """(hub name or None, our name, array) -> `model-0000i-of-0000n.safetensors` shards
    and their index; the Qwen2-VL patch embedding is written as its Conv3d."""
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(path / name), current, metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, ours, v in tensors:
        if name is None:
            continue
        if ours.startswith("visual."):
            (name, v), = vision_to_hub_layout({ours[len("visual.") :]: v}, "visual.").items()
        v = cast(v)
        mx.eval(v)
        current[name] = v
        size += v.nbytes
        if size >= shard_bytes:
            flush()
    flush()
    n = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (path / name).rename(path / final)
        weight_map.update({k: final for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def points_llm_config(p: dict, vocab_size: int) -> dict:
    t = p["text"]
    if p["llm_layout"] == "custom_llama":
        return {
            "model_type": "custom_llama", "hidden_size": t["hidden_size"], "num_layers": t["num_hidden_layers"],
            "num_attention_heads": t["num_attention_heads"], "num_kv_heads": t["num_key_value_heads"],
            "ffn_hidden_size": t["intermediate_size"], "hidden_act": "swiglu", "norm_type": "rms_norm",
            "layernorm_epsilon": 1e-5, "rotary_emb_base": 1000000.0, "rotary_pct": 1.0,
            "qkv_proj_bias": True, "out_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
            "vocab_size": vocab_size, "max_sequence_length": 16384, "tie_word_embeddings": False,
        }
    return {"model_type": "qwen2", "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 16384, "tie_word_embeddings": False, "hidden_act": "silu", **t}


def to_custom_llama_layout(weights: dict, num_kv_heads: int) -> dict:
    """Qwen2-named decoder weights (`llm.model.*`) -> POINTS1.5's CustomLlama names."""
    out = {}
    for k, v in weights.items():
        if k == "llm.model.embed_tokens.weight":
            out["llm.lm.embed_in.weight"] = v
        elif k == "llm.model.norm.weight":
            out["llm.lm.final_layer_norm.weight"] = v
        elif k == "llm.lm_head.weight":
            out["llm.embed_out.weight"] = v
        elif k.startswith("llm.model.layers."):
            layer, name = k[len("llm.model.layers.") :].split(".", 1)
            base = f"llm.lm.layers.{layer}."
            if name.startswith(("self_attn.v_proj.", "mlp.gate_proj.")):
                continue  # fused below with k_proj / up_proj
            if name.startswith("self_attn.k_proj."):
                kind = name.rsplit(".", 1)[1]
                keys, values = v, weights[k.replace("k_proj", "v_proj")]
                per_head = keys.reshape(num_kv_heads, -1, *keys.shape[1:])
                fused = mx.stack([per_head, values.reshape(per_head.shape)], axis=1)
                out[base + "attention.key_value_dense." + kind] = fused.reshape(-1, *keys.shape[1:])
            elif name.startswith("mlp.up_proj."):
                gate = weights[k.replace("up_proj", "gate_proj")]
                out[base + "mlp.dense_h_to_4h.weight"] = mx.concatenate([v, gate])
            else:
                renames = {"self_attn.q_proj.": "attention.query_dense.", "self_attn.o_proj.": "attention.dense.",
                           "mlp.down_proj.": "mlp.dense_4h_to_h."}
                for old, new in renames.items():
                    name = name.replace(old, new)
                out[base + name] = v
        else:
            out[k] = v
    return out


def write_points_checkpoint(path, preset: str, seed: int) -> Path:
    p = PRESETS[preset]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # POINTS formats its prompt itself: the tokenizer keeps the Qwen2-VL template
    tok = build_tokenizer(path, special_tokens=QWEN2_VL_SPECIAL_TOKENS, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    config = {
        "architectures": ["POINTSV15ChatModel"],
        "model_type": "pointsv1.5_chat",
        "vision_config": {"model_type": "qwen2_vl", "hidden_size": p["text"]["hidden_size"], **p["vision"]},
        "llm_config": points_llm_config(p, len(tok)),
    }
    model = points_v15.Model(points_v15.ModelArgs.from_dict(config))
    weights = randomize(model, seed)
    vision = {k[len("vision_encoder.") :]: v for k, v in weights.items() if k.startswith("vision_encoder.")}
    out = vision_to_hub_layout(vision, "vision_encoder.")
    # the released checkpoints still carry the tower's own (unused) merger
    width = p["vision"]["embed_dim"] * 4
    rng = np.random.default_rng(seed + 1)
    for name, shape in [("ln_q.weight", (p["vision"]["embed_dim"],)), ("ln_q.bias", (p["vision"]["embed_dim"],)),
                        ("mlp.0.weight", (width, width)), ("mlp.0.bias", (width,)),
                        ("mlp.2.weight", (p["text"]["hidden_size"], width)), ("mlp.2.bias", (p["text"]["hidden_size"],))]:
        out["vision_encoder.merger." + name] = mx.array(rng.standard_normal(shape).astype(np.float32))
    rest = {k: v for k, v in weights.items() if not k.startswith("vision_encoder.")}
    if p["llm_layout"] == "custom_llama":
        rest = to_custom_llama_layout(rest, p["text"]["num_key_value_heads"])
    out.update(rest)
    mx.save_safetensors(str(path / "model.safetensors"), out, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(qwen2_vl_preprocessor_config(), indent=2))
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write a random-weight checkpoint in a released layout.")
    p.add_argument("out")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    print(write_checkpoint(a.out, a.preset, a.seed))
