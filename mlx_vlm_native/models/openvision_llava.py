"""An OpenVision (2) encoder as the vision tower of a LLaVA-1.5-style VLM:
ViT patch tokens -> 2-layer GELU projector -> an mlx-lm language model, the
setting the OpenVision 2 paper evaluates its encoders in.

Each image is one square view (short side resized and centre crop, or with
`image_aspect_ratio: "pad"` padded to a square, or with "resize" stretched to
one; ImageNet mean/std) giving
(image_size / patch_size)^2 tokens at the image placeholder.
"""

import importlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .base import BaseModelArgs, MLPProjector, ProcessedInputs, VisionLanguageModel, scatter_features, text_config_for_mlx_lm
from .openvision import IMAGENET_MEAN, IMAGENET_STD, VisionConfig, VisionTransformer


@dataclass
class ModelArgs(BaseModelArgs):
    vision_config: dict
    text_config: dict
    model_type: str = "openvision_llava"
    image_token_index: int = -200
    vision_feature_layer: int = -1  # -1: the final block's tokens, as OpenVision exports them
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_mean: Tuple[float, ...] = IMAGENET_MEAN
    image_std: Tuple[float, ...] = IMAGENET_STD
    image_token_id: Optional[int] = None
    # "crop": short side + centre crop; "pad": LLaVA-1.5's pad to square; "resize": stretch to the square
    image_aspect_ratio: str = "crop"

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_model_type = self.text_config.get("model_type", "llama")
            module = language_module(self.text_model_type)
            self.text_config = module.ModelArgs.from_dict(text_config_for_mlx_lm(self.text_config))
        if self.image_token_id is not None:
            self.image_token_index = self.image_token_id
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")
        if self.image_aspect_ratio not in ("crop", "pad", "resize"):
            raise ValueError(f"unsupported image_aspect_ratio {self.image_aspect_ratio!r}; use 'crop', 'pad' or 'resize'")
        layers = self.vision_config.layers
        if not -layers <= self.vision_feature_layer < layers:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is outside the {layers} ViT blocks")


def language_module(model_type: str):
    try:
        return importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError as e:
        raise ValueError(f"mlx-lm has no language model {model_type!r}") from e


class Model(VisionLanguageModel):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.vision_tower = VisionTransformer(args.vision_config)
        self.multi_modal_projector = MLPProjector(
            args.vision_config.width, args.text_config.hidden_size, args.multimodal_projector_bias
        )
        self.language_model = language_module(args.text_model_type).Model(args.text_config)

    @property
    def layers(self):
        return self.language_model.layers

    def image_features(self, pixels: mx.array) -> mx.array:
        """(N, 3, S, S) normalised pixels -> (N, tokens, text hidden)."""
        x = pixels.transpose(0, 2, 3, 1)
        tokens = self.vision_tower(x, layer=self.args.vision_feature_layer)["tokens"]
        return self.multi_modal_projector(tokens)

    def encode_vision(self, batch: Sequence[ProcessedInputs]) -> List[Optional[mx.array]]:
        """Projected image tokens of every processed prompt in `batch` from ONE
        tower call (all views are the same size); one (tokens, D) array per prompt."""
        counts = [len(inputs.pixel_values) for inputs in batch]
        if not sum(counts):
            return [None] * len(batch)
        pixels = mx.array(np.concatenate([p for inputs in batch for p in inputs.pixel_values]))
        feats = self.image_features(pixels.astype(self.vision_tower.conv1.weight.dtype))
        out, start = [], 0
        for n in counts:
            out.append(feats[start:start + n].reshape(-1, feats.shape[-1]) if n else None)
            start += n
        return out

    def get_input_embeddings(self, inputs: ProcessedInputs, vision_features: Optional[mx.array] = None):
        """Token embeddings with image features at the placeholders, (1, L, D);
        1-D positions (None)."""
        ids = inputs.input_ids
        embeds = self.language_model.model.embed_tokens(mx.array(np.maximum(ids, 0)))
        if inputs.pixel_values:
            if vision_features is None:
                vision_features = self.encode_vision([inputs])[0]
            embeds = scatter_features(embeds, ids == self.args.image_token_index, vision_features.astype(embeds.dtype))
        return embeds[None], None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, positions=None) -> mx.array:
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def sanitize(self, weights: dict) -> dict:
        """transformers' LLaVA layout (`model.vision_tower.`, `model.multi_modal_projector.`,
        `model.language_model.`, `lm_head.`), LLaVA-1.5's `mm_projector.{0,2}`, and an
        open_clip-layout vision tower."""
        vision, rest = {}, {}
        for k, v in weights.items():
            if k.startswith("model.") and not k.startswith("model.language_model."):
                k = k[len("model."):]
            k = k.replace("mm_projector.0.", "multi_modal_projector.linear_1.")
            k = k.replace("mm_projector.2.", "multi_modal_projector.linear_2.")
            if k == "lm_head.weight":
                k = "language_model.lm_head.weight"
            if k.startswith("vision_tower."):
                vision[k[len("vision_tower."):]] = v
                continue
            if k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model."):]
            elif k.startswith("language_model.") and not k.startswith(
                ("language_model.model.", "language_model.lm_head.")
            ):
                k = "language_model.model." + k[len("language_model."):]
            rest[k] = v
        if getattr(self.args.text_config, "tie_word_embeddings", False):
            rest.pop("language_model.lm_head.weight", None)
        rest = {k: v for k, v in rest.items() if "rotary_emb.inv_freq" not in k}
        rest.update({"vision_tower." + k: v for k, v in VisionTransformer.sanitize(vision).items()})
        return rest
