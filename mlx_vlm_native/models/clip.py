"""OpenAI CLIP's vision tower (transformers' `CLIPVisionModel` layout), the
frozen teacher of EVE's patch-aligning layer."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import siglip
from .base import BaseModelArgs


@dataclass
class CLIPVisionConfig(BaseModelArgs):
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    model_type: str = "clip_vision_model"


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C, p = config.hidden_size, config.patch_size
        self.class_embedding = mx.zeros((C,))
        self.patch_embedding = nn.Conv2d(config.num_channels, C, p, p, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2 + 1, C)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = mx.broadcast_to(self.class_embedding, (x.shape[0], 1, x.shape[-1]))
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """OpenAI CLIP ViT (transformers' `CLIPVisionModel` layout); the blocks are
    SigLIP's, which share CLIP's structure."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        block = siglip.VisionConfig(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads, layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
        )
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = siglip.Encoder(block)
        self.encoder.layers = [siglip.EncoderLayer(block) for _ in range(config.num_hidden_layers)]
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixels: mx.array, output_layer: int = -2) -> mx.array:
        """(B, H, W, 3) -> hidden state `output_layer` of transformers' list
        (0 = after pre_layrnorm), CLS included."""
        layers = self.encoder.layers
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in layers[: output_layer % (len(layers) + 1)]:
            x = layer(x)
        return x

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            if "position_ids" in k:
                continue
            if k.endswith("patch_embedding.weight") and v.shape[1] == self.config.num_channels:
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out
