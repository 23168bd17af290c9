"""Tiny random EVE (v1) checkpoints in the reference's own layout
(`EVELlamaForCausalLM.state_dict()`: `model.` prefix, nn.Sequential indices,
OIHW convs, the CLIP teacher registered twice, the patch-aligning layer and
`rotary_emb.inv_freq`), plus a tiny CLIP vision teacher in transformers'
`CLIPVisionModel` layout and a tiny LLaMA sentencepiece tokenizer.

Layout fixtures for the tests and offline demos: the converter must turn these into MLX folders.
"""

import io
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from safetensors.numpy import save_file

from convert.write_hf_release import build_tokenizer as build_qwen2_tokenizer
from mlx_vlm_native.processors.eve import VICUNA_V1_SYSTEM
from mlx_vlm_native.processors.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4)
TINY_VISION = dict(mm_hidden_size=32, image_size=112, image_size_clip=56, patch_stride=14, conv_stride=2)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=56, patch_size=14)

# "{system} USER: <image>\n{question} ASSISTANT:" for one user turn
VICUNA_V1_TEMPLATE = (
    "{{ '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' ' }}{% else %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TOKENIZER_TEXT = [
    VICUNA_V1_SYSTEM,
    "USER: What is in the image? ASSISTANT: A red square on a blue background.",
    "Describe this picture in detail. There is a small green circle near the top.",
] + [f"a photo of a {c} {s} on the {p}." for c in ("red", "green", "blue", "yellow", "white")
     for s in ("circle", "square", "triangle", "stripe") for p in ("left", "right", "top")]


def build_tokenizer(path: Path, vocab_size: int = 320) -> int:
    """A LLaMA sentencepiece BPE (byte fallback, <unk>=0 <s>=1 </s>=2) trained in
    memory and saved through transformers; returns the vocabulary size."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(path), add_bos_token=True)
    tok.chat_template = VICUNA_V1_TEMPLATE
    tok.save_pretrained(str(path))
    return len(tok)


class _Init:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape, std=0.1) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def norm(self, n: int) -> np.ndarray:
        return (1 + self.rng.standard_normal(n) * 0.1).astype(np.float32)


def clip_vision_weights(init: _Init, cfg: dict) -> Dict[str, np.ndarray]:
    """transformers' CLIPVisionModel keys (`vision_model.*`)."""
    C, I, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"]
    n = (cfg["image_size"] // p) ** 2 + 1
    w = {
        "vision_model.embeddings.class_embedding": init.normal(C),
        "vision_model.embeddings.patch_embedding.weight": init.normal(C, 3, p, p, std=0.05),
        "vision_model.embeddings.position_embedding.weight": init.normal(n, C),
    }
    for name in ("pre_layrnorm", "post_layernorm"):
        w[f"vision_model.{name}.weight"], w[f"vision_model.{name}.bias"] = init.norm(C), init.normal(C)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[pre + f"self_attn.{proj}.weight"] = init.normal(C, C)
            w[pre + f"self_attn.{proj}.bias"] = init.normal(C)
        w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"] = init.normal(I, C), init.normal(I)
        w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"] = init.normal(C, I), init.normal(C)
        for ln in ("layer_norm1", "layer_norm2"):
            w[pre + f"{ln}.weight"], w[pre + f"{ln}.bias"] = init.norm(C), init.normal(C)
    return w


def clip_vision_config(cfg: dict) -> dict:
    return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
            "projection_dim": cfg["hidden_size"], **cfg}


def eve_weights(init: _Init, text: dict, vocab: int, C: int, patch: int, clip: dict) -> Dict[str, np.ndarray]:
    """`EVELlamaForCausalLM.state_dict()` of a training-built model."""
    D, I, L = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    head_dim = D // text["num_attention_heads"]
    w = {"model.embed_tokens.weight": init.normal(vocab, D, std=0.5),
         "model.norm.weight": init.norm(D), "lm_head.weight": init.normal(vocab, D)}
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    for i in range(L):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[pre + f"self_attn.{proj}.weight"] = init.normal(D, D)
        w[pre + "self_attn.rotary_emb.inv_freq"] = inv_freq
        w[pre + "mlp.gate_proj.weight"] = init.normal(I, D)
        w[pre + "mlp.up_proj.weight"] = init.normal(I, D)
        w[pre + "mlp.down_proj.weight"] = init.normal(D, I)
        w[pre + "input_layernorm.weight"] = init.norm(D)
        w[pre + "post_attention_layernorm.weight"] = init.norm(D)
    vt = "model.vision_tower."
    w[vt + "patch_embedding.weight"] = init.normal(C, 3, patch, patch, std=0.05)
    w[vt + "class_embedding"] = init.normal(C, std=1.0)
    w[vt + "split_embedding"] = init.normal(C, std=1.0)
    for att in ("local_attention", "global_attention"):
        for part, out in (("q", C), ("kv", 2 * C)):
            w[vt + f"{att}.{part}.0.weight"] = init.norm(C)
            w[vt + f"{att}.{part}.0.bias"] = init.normal(C)
            w[vt + f"{att}.{part}.1.weight"] = init.normal(out, C, std=0.5)
        w[vt + f"{att}.proj.weight"] = init.normal(C, C)
        w[vt + f"{att}.proj.bias"] = init.normal(C)
    w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"] = init.normal(D, C), init.normal(D)
    w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"] = init.normal(D, D), init.normal(D)
    pal, T = "model.vision_tower_compressor.", clip["hidden_size"]
    for j in range(len(range(0, L + 1, 4))):
        w[pal + f"norm_layer.{j}.0.weight"] = init.norm(D)
        w[pal + f"norm_layer.{j}.0.bias"] = init.normal(D)
        w[pal + f"norm_layer.{j}.1.weight"] = init.normal(T, D)
    w[pal + "input_layer.weight"], w[pal + "input_layer.bias"] = init.normal(T, D), init.normal(T)
    w[pal + "output_layer.weight"], w[pal + "output_layer.bias"] = init.normal(T, T), init.normal(T)
    return w


def save_tensors(weights: Dict[str, np.ndarray], path: Path, weights_format: str) -> None:
    if weights_format == "safetensors":
        save_file(weights, str(path / "model.safetensors"))
    elif weights_format == "bin":
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, str(path / "pytorch_model.bin"))
    else:
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', not {weights_format!r}")


def write_clip_teacher(path, seed: int = 7, clip: Optional[dict] = None) -> Path:
    """A tiny random CLIP vision tower folder, as `CLIPVisionModel.save_pretrained` lays it out."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clip = {**TINY_CLIP, **(clip or {})}
    save_tensors(clip_vision_weights(_Init(seed), clip), path, "safetensors")
    (path / "config.json").write_text(json.dumps(clip_vision_config(clip), indent=2))
    pre = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
           "crop_size": clip["image_size"], "size": clip["image_size"]}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return path


def write_checkpoint(
    path,
    seed: int = 0,
    weights_format: str = "safetensors",
    image_size: int = TINY_VISION["image_size"],
    teacher_seed: int = 7,
) -> Path:
    """A tiny EVE-7B-v1.0-shaped folder: config.json, preprocessor_config.json,
    tokenizer and weights with the teacher/aligner/inv_freq keys included."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(path)
    v = TINY_VISION
    clip = TINY_CLIP
    weights = eve_weights(_Init(seed), TINY_TEXT, vocab, v["mm_hidden_size"], v["patch_stride"], clip)
    teacher = clip_vision_weights(_Init(teacher_seed), clip)
    for prefix in ("model.vision_clip.backbone.", "model.vision_tower_compressor.clip_layer.backbone."):
        weights.update({prefix + k: t for k, t in teacher.items()})
    save_tensors(weights, path, weights_format)
    config = {
        "architectures": ["EVELlamaForCausalLM"], "model_type": "eve", **TINY_TEXT,
        "num_key_value_heads": TINY_TEXT["num_attention_heads"], "vocab_size": vocab,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "tie_word_embeddings": False, "hidden_act": "silu", "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "transformers_version": "4.31.0", "mm_hidden_size": v["mm_hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": f"openai/eve-patch14-anypixel-{image_size}",
        "mm_vision_tower_clip": "openai/clip-vit-tiny-patch14-56", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "requires_cliploss": True,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    pre = {"image_size": image_size, "image_size_clip": v["image_size_clip"],
           "patch_stride": v["patch_stride"], "conv_stride": v["conv_stride"],
           "patch_stride_clip": clip["patch_size"], "image_mean": list(OPENAI_CLIP_MEAN),
           "image_std": list(OPENAI_CLIP_STD), "do_resize": False, "do_center_crop": False,
           "do_normalize": True, "rescale_factor": 1 / 255}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return path


# ------------------------------------------------------------------- EVEv2

TINY_V2_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)


def eve_v2_weights(init: _Init, text: dict, vocab: int, C: int, old_names: bool) -> Dict[str, np.ndarray]:
    """`EVEQwen2ForCausalLM.state_dict()` with `add_moe=True`: every decoder
    layer has text weights and `moe_*` vision twins."""
    D, I = text["hidden_size"], text["intermediate_size"]
    H, KV = text["num_attention_heads"], text["num_key_value_heads"]
    hd = D // H
    w = {"model.embed_tokens.weight": init.normal(vocab, D, std=0.5),
         "model.norm.weight": init.norm(D), "lm_head.weight": init.normal(vocab, D)}
    for i in range(text["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for m in ("", "moe_"):
            for name, out in (("q_proj", H * hd), ("k_proj", KV * hd), ("v_proj", KV * hd)):
                w[pre + f"self_attn.{m}{name}.weight"] = init.normal(out, D)
                w[pre + f"self_attn.{m}{name}.bias"] = init.normal(out)
            w[pre + f"self_attn.{m}o_proj.weight"] = init.normal(D, H * hd)
            mlp = pre + ("moe_mlp." if m else "mlp.")
            w[mlp + "gate_proj.weight"] = init.normal(I, D)
            w[mlp + "up_proj.weight"] = init.normal(I, D)
            w[mlp + "down_proj.weight"] = init.normal(D, I)
            w[pre + f"{m}input_layernorm.weight"] = init.norm(D)
            w[pre + f"{m}post_attention_layernorm.weight"] = init.norm(D)
        w[pre + "self_attn.rotary_emb.inv_freq"] = (
            1.0 / 1e6 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    vt = "model.vision_tower."
    w[vt + "patch_embedding.0.weight"] = init.normal(C, 3, 16, 16, std=0.05)
    w[vt + "patch_embedding.0.bias"] = init.normal(C)
    w[vt + "patch_embedding.2.weight"] = init.normal(D, C, 2, 2)
    w[vt + "patch_embedding.2.bias"] = init.normal(D)
    cls_name, split_name = ("start_embedding", "end_embedding") if old_names else ("class_embedding", "split_embedding")
    w[vt + cls_name] = init.normal(D, std=0.5)
    w[vt + split_name] = init.normal(D, std=0.5)
    return w


def write_checkpoint_v2(path, seed: int = 0, old_names: bool = False, max_size: int = 64) -> Path:
    """A tiny EVE-7B-HD-v2.0-shaped folder (`model_type` "eve-qwen2", Qwen2
    byte-level tokenizer). `old_names` writes the CLS/split embeddings with the
    pre-March-2025 names `start_embedding`/`end_embedding`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = len(build_qwen2_tokenizer(path, chat_template=VICUNA_V1_TEMPLATE.replace("</s>", "<|im_end|>")))
    C = 32
    save_tensors(eve_v2_weights(_Init(seed), TINY_V2_TEXT, vocab, C, old_names), path, "safetensors")
    config = {
        "architectures": ["EVEQwen2ForCausalLM"], "model_type": "eve-qwen2", **TINY_V2_TEXT,
        "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "float32", "add_moe": True, "moe_part": "layernorm-self_attn-mlp",
        "mm_hidden_size": C, "mm_vision_tower": f"openai/eve-anyratio-res{max_size}-patch16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    pre = {"max_size": max_size, "patch_stride": 16, "dense_stride": 2, "image_mean": list(OPENAI_CLIP_MEAN),
           "image_std": list(OPENAI_CLIP_STD), "do_resize": False, "do_center_crop": False}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return path
