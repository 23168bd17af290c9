"""SigLIP vision transformer (the LLaVA-OneVision tower), with the optional
attention-pooling head so that full SigLIP vision checkpoints load too."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs

ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu": nn.gelu,
    "quick_gelu": nn.gelu_fast_approx,
}


@dataclass
class VisionConfig(BaseModelArgs):
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = True
    model_type: str = "siglip_vision_model"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported SigLIP hidden_act {self.hidden_act!r}")


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        heads = lambda t: t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches, config.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        # pixels: (B, H, W, C) channels-last, as MLX convolutions expect
        x = self.patch_embedding(pixels)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.weight[None, : x.shape[1]]


class PoolingHead(nn.Module):
    """Multi-head attention pooling from a learned probe (SigLIP's head)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.probe = mx.zeros((1, 1, D))
        self.attention = nn.MultiHeadAttention(D, config.num_attention_heads, bias=True)
        self.layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        probe = mx.broadcast_to(self.probe, (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x, x)
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.vision_use_head:
            self.head = PoolingHead(config)

    def __call__(
        self, pixels: mx.array, output_layer: Optional[int] = None
    ) -> mx.array:
        """`output_layer=None`: post-LayerNorm last hidden state. Otherwise the
        hidden state at that index of HF's `hidden_states` tuple (0 = embeddings,
        -1 = last encoder layer before the final LayerNorm)."""
        layers = self.encoder.layers
        x = self.embeddings(pixels)
        if output_layer is None:
            for layer in layers:
                x = layer(x)
            return self.post_layernorm(x)
        stop = output_layer % (len(layers) + 1)
        for layer in layers[:stop]:
            x = layer(x)
        return x

    def pooled(self, pixels: mx.array) -> mx.array:
        return self.head(self(pixels))

    def sanitize(self, weights: dict) -> dict:
        """HF SigLIP keys (with or without `vision_model.`) -> this module's."""
        out = {}
        channels = self.config.num_channels
        for k, v in weights.items():
            if "position_ids" in k:
                continue
            if k.startswith("vision_model."):
                k = k[len("vision_model.") :]
            if k.endswith("patch_embedding.weight") and v.shape[1] == channels:
                v = v.transpose(0, 2, 3, 1)  # (O, C, kh, kw) -> (O, kh, kw, C)
            if k.startswith("head.attention.in_proj_"):
                kind = k.rsplit("_", 1)[-1]  # weight or bias
                for name, part in zip(("query", "key", "value"), mx.split(v, 3, axis=0)):
                    out[f"head.attention.{name}_proj.{kind}"] = part
                continue
            out[k] = v
        return out
