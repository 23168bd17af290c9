"""POINTS1.5 (WeChat AI): the Qwen2-VL NaViT tower used without its own merger,
a 2x2 PatchMerger-style projector (LayerNorm, 2-layer GELU MLP) and a Qwen2.5
decoder with plain 1-D RoPE.

Two released layouts load: the original one, whose decoder is a "CustomLlama"
(`llm.lm.*`, fused key/value and gate/up weights), and the Qwen2 one
(`llm.model.*`) that later POINTS checkpoints use.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models import qwen2

from ..native.packing import pack_of_packs, split_by_prompt
from .base import BaseModelArgs, ProcessedInputs, VisionLanguageModel, scatter_features, text_config_for_mlx_lm
from .qwen2_vision import PatchMerger, VisionConfig, VisionModel

LAYOUTS = (
    "Hub release, CustomLlama decoder (llm.lm.*, vision_encoder.*, vision_projector.*)",
    "Qwen2 decoder (llm.model.*)",
    "this project's converted folders",
)

# CustomLlama config names -> Qwen2 names
CUSTOM_LLAMA_CONFIG = {
    "num_layers": "num_hidden_layers",
    "num_kv_heads": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "layernorm_epsilon": "rms_norm_eps",
    "rotary_emb_base": "rope_theta",
    "max_sequence_length": "max_position_embeddings",
}
# CustomLlama weight names (under llm.lm.layers.N.) -> Qwen2 names
CUSTOM_LLAMA_LAYER = {
    "attention.query_dense": "self_attn.q_proj",
    "attention.dense": "self_attn.o_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def llm_config_for_qwen2(cfg: dict) -> dict:
    cfg = dict(cfg)
    for old, new in CUSTOM_LLAMA_CONFIG.items():
        if old in cfg:
            cfg.setdefault(new, cfg.pop(old))
    if cfg.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"rotary_pct {cfg['rotary_pct']} is not supported (only full rotary)")
    if cfg.get("hidden_act", "silu") not in ("silu", "swiglu"):
        raise ValueError(f"unsupported llm hidden_act {cfg['hidden_act']!r}")
    cfg["hidden_act"] = "silu"
    cfg.setdefault("max_position_embeddings", 16384)
    cfg.setdefault("tie_word_embeddings", False)
    return text_config_for_mlx_lm(cfg)


@dataclass
class ModelArgs(BaseModelArgs):
    vision_config: dict
    llm_config: dict
    model_type: str = "pointsv1.5_chat"
    image_token_id: Optional[int] = None  # from the tokenizer's <|image_pad|> when absent

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.llm_config, dict):
            self.llm_config = qwen2.ModelArgs.from_dict(llm_config_for_qwen2(self.llm_config))
        if self.vision_config.windowed:
            raise ValueError("POINTS1.5 uses the Qwen2-VL tower; a windowed (2.5-VL) tower is not supported")

    @property
    def text_config(self):
        return self.llm_config


def split_custom_llama(key: str, value: mx.array, args: ModelArgs) -> dict:
    """One CustomLlama decoder weight -> Qwen2-named weights."""
    c = args.llm_config
    head_dim = c.hidden_size // c.num_attention_heads
    if ".attention.key_value_dense." in key:
        # rows are interleaved per kv head: [k_head0, v_head0, k_head1, ...]
        kv = value.reshape(c.num_key_value_heads, 2, head_dim, *value.shape[1:])
        k, v = kv[:, 0].reshape(-1, *value.shape[1:]), kv[:, 1].reshape(-1, *value.shape[1:])
        base, kind = key.split(".attention.key_value_dense.")
        return {f"{base}.self_attn.k_proj.{kind}": k, f"{base}.self_attn.v_proj.{kind}": v}
    if ".mlp.dense_h_to_4h." in key:
        # swiglu(x) = x1 * silu(x2): the first half is "up", the second "gate"
        up, gate = mx.split(value, 2, axis=0)
        base, kind = key.split(".mlp.dense_h_to_4h.")
        return {f"{base}.mlp.up_proj.{kind}": up, f"{base}.mlp.gate_proj.{kind}": gate}
    for old, new in CUSTOM_LLAMA_LAYER.items():
        key = key.replace(f".{old}.", f".{new}.")
    return {key: value}


class Model(VisionLanguageModel):
    layouts = LAYOUTS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.vision_encoder = VisionModel(args.vision_config, merger=False)
        self.vision_projector = PatchMerger(args.vision_config, out_dim=args.llm_config.hidden_size)
        self.llm = qwen2.Model(args.llm_config)

    @property
    def layers(self):
        return self.llm.layers

    def encode_vision(self, batch: Sequence[ProcessedInputs]) -> List[Optional[mx.array]]:
        """Projected tokens of every prompt's images from ONE packed tower call."""
        packs = [inputs.pack for inputs in batch if inputs.pack is not None]
        if not packs:
            return [None] * len(batch)
        features = self.vision_projector(self.vision_encoder(pack_of_packs(packs), merge=False))
        return split_by_prompt(features, batch)

    def get_input_embeddings(self, inputs: ProcessedInputs, vision_features: Optional[mx.array] = None):
        """(1, L, D) embeddings with the image tokens in place; POINTS' decoder has
        plain 1-D RoPE (positions None)."""
        embeds = self.llm.model.embed_tokens(mx.array(inputs.input_ids))
        if inputs.pack is not None:
            if vision_features is None:
                vision_features = self.encode_vision([inputs])[0]
            embeds = scatter_features(embeds, inputs.token_types > 0, vision_features)
        return embeds[None], None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, positions=None) -> mx.array:
        return self.llm(inputs, cache=cache, input_embeddings=input_embeddings)

    def sanitize(self, weights: dict) -> dict:
        out, vision = {}, {}
        for k, v in weights.items():
            if "rotary_emb.inv_freq" in k or k.startswith("vision_encoder.merger."):
                continue  # the tower's own merger is unused by POINTS
            if k.startswith("vision_encoder."):
                vision[k[len("vision_encoder.") :]] = v
            elif k.startswith("llm.lm.layers."):
                out.update(split_custom_llama("llm.model.layers." + k[len("llm.lm.layers.") :], v, self.args))
            elif k == "llm.lm.embed_in.weight":
                out["llm.model.embed_tokens.weight"] = v
            elif k == "llm.lm.final_layer_norm.weight":
                out["llm.model.norm.weight"] = v
            elif k == "llm.embed_out.weight":
                out["llm.lm_head.weight"] = v
            else:
                out[k] = v
        if self.args.llm_config.tie_word_embeddings:
            out.pop("llm.lm_head.weight", None)
        out.update({"vision_encoder." + k: v for k, v in self.vision_encoder.sanitize(vision).items()})
        return out
