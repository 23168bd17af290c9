"""LLaVA-OneVision: SigLIP tower + 2-layer GELU projector + Qwen2 (mlx-lm).

Images go through AnyRes (base view + tiles, unpadded, `anyres_max_N`
down-sampled, a newline embedding after each row); several images in one
prompt use one square view each; video frames are 2x2 bilinear pooled.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen2

from .base import (
    BaseModelArgs, MLPProjector, ProcessedInputs, VisionLanguageModel, resize_bilinear, scatter_features,
    text_config_for_mlx_lm,
)
from .siglip import VisionConfig, VisionModel

LAYOUTS = (
    "Hub release (vision_tower.vision_model.*, language_model.model.*)",
    "transformers 5 (model.vision_tower.*, model.language_model.*)",
    "mlx-vlm / this project's (vision_tower.*, language_model.model.*, MLX conv)",
)


def select_best_resolution(size: Tuple[int, int], candidates) -> Tuple[int, int]:
    """The (height, width) candidate keeping the most pixels, then wasting fewest."""
    h, w = size
    best, best_effective, best_waste = None, 0, float("inf")
    for ch, cw in candidates:
        scale = min(cw / w, ch / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = ch * cw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ch, cw), effective, waste
    return best


@dataclass(frozen=True)
class AnyResLayout:
    """Where an image's AnyRes features go: tile grid, unpadded and final grid."""

    tiles: Tuple[int, int]  # crops per column, per row
    unpadded: Tuple[int, int]  # feature rows/cols after removing the padding
    rows: int  # feature rows after anyres_max_N down-sampling
    cols: int
    crop_top: int  # first kept row/col in the (tiles * side) feature map
    crop_left: int

    def num_tokens(self, side: int) -> int:
        return side * side + self.rows * (self.cols + 1)


def anyres_layout(
    image_size: Tuple[int, int], pinpoints, tile: int, side: int, max_tiles: int
) -> AnyResLayout:
    """Feature-grid geometry of one AnyRes image (`side` features per tile edge)."""
    h, w = image_size
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    gh, gw = best_h // tile, best_w // tile
    cur_h, cur_w = gh * side, gw * side
    top = left = 0
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        top = (cur_h - new_h) // 2
        cur_h -= 2 * top
    else:
        new_w = int(round(w * (cur_h / h), 7))
        left = (cur_w - new_w) // 2
        cur_w -= 2 * left
    rows, cols = cur_h, cur_w
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio > 1.1:
        rows, cols = int(cur_h // ratio), int(cur_w // ratio)
    return AnyResLayout((gh, gw), (cur_h, cur_w), rows, cols, top, left)


def parse_max_tiles(vision_aspect_ratio: str) -> int:
    if not vision_aspect_ratio.startswith("anyres_max_"):
        raise ValueError(
            f"unsupported vision_aspect_ratio {vision_aspect_ratio!r}: expected 'anyres_max_N'"
        )
    return int(vision_aspect_ratio[len("anyres_max_") :])


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict
    vision_config: dict
    model_type: str = "llava_onevision"
    image_token_index: int = 151646
    video_token_index: int = 151647
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
    vision_aspect_ratio: str = "anyres_max_9"
    image_grid_pinpoints: Optional[list] = None
    tie_word_embeddings: Optional[bool] = None
    # transformers 5 spells the token ids this way
    image_token_id: Optional[int] = None
    video_token_id: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            tie = self.text_config.get("tie_word_embeddings", self.tie_word_embeddings)
            self.text_config = qwen2.ModelArgs.from_dict(
                text_config_for_mlx_lm(self.text_config, tie)
            )
        if self.image_token_id is not None:
            self.image_token_index = self.image_token_id
        if self.video_token_id is not None:
            self.video_token_index = self.video_token_id
        if self.vision_feature_select_strategy != "full":
            raise ValueError(
                "vision_feature_select_strategy "
                f"{self.vision_feature_select_strategy!r} is not supported: SigLIP "
                "has no CLS token to drop, use 'full'"
            )
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError("a list of vision_feature_layer values is not supported")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")
        parse_max_tiles(self.vision_aspect_ratio)
        if self.image_grid_pinpoints is None:
            s = self.vision_config.image_size
            self.image_grid_pinpoints = [[s * i, s * j] for i in range(1, 7) for j in range(1, 7)]


class Model(VisionLanguageModel):
    layouts = LAYOUTS

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.vision_tower = VisionModel(args.vision_config)
        self.multi_modal_projector = MLPProjector(
            args.vision_config.hidden_size, args.text_config.hidden_size, args.multimodal_projector_bias
        )
        self.language_model = qwen2.Model(args.text_config)
        self.image_newline = mx.zeros((args.text_config.hidden_size,))

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def side(self) -> int:
        v = self.args.vision_config
        return v.image_size // v.patch_size

    def encode_tiles(self, pixels: mx.array) -> mx.array:
        """(N, 3, S, S) normalised pixels -> (N, side*side, text hidden)."""
        x = pixels.transpose(0, 2, 3, 1).astype(self.image_newline.dtype)
        feats = self.vision_tower(x, output_layer=self.args.vision_feature_layer)
        return self.multi_modal_projector(feats)

    def pack_anyres(self, tiles: mx.array, layout: AnyResLayout) -> mx.array:
        """Base view then the unpadded, down-sampled tile grid with newlines."""
        s, D = self.side, tiles.shape[-1]
        (gh, gw), (uh, uw) = layout.tiles, layout.unpadded
        grid = tiles[1:].reshape(gh, gw, s, s, D).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(gh * s, gw * s, D)
        grid = grid[layout.crop_top : layout.crop_top + uh, layout.crop_left : layout.crop_left + uw]
        if (layout.rows, layout.cols) != (uh, uw):
            grid = resize_bilinear(grid, layout.rows, layout.cols)
        newline = mx.broadcast_to(self.image_newline.astype(grid.dtype), (layout.rows, 1, D))
        grid = mx.concatenate([grid, newline], axis=1).reshape(-1, D)
        return mx.concatenate([tiles[0], grid])

    def image_features(self, pixel_values: List[np.ndarray], image_sizes, multi_image: bool) -> mx.array:
        counts = [len(p) for p in pixel_values]
        feats = self.encode_tiles(mx.array(np.concatenate(pixel_values)))
        out, start = [], 0
        newline = self.image_newline[None].astype(feats.dtype)
        for n, size in zip(counts, image_sizes):
            tiles = feats[start : start + n]
            start += n
            if multi_image:
                out += [tiles[0], newline]
            else:
                layout = self.layout(size)
                if n != layout.tiles[0] * layout.tiles[1] + 1:
                    raise ValueError(f"image of size {size} needs {layout.tiles} tiles + base, got {n}")
                out.append(self.pack_anyres(tiles, layout))
        return mx.concatenate(out)

    def layout(self, image_size) -> AnyResLayout:
        a = self.args
        return anyres_layout(
            image_size, a.image_grid_pinpoints, a.vision_config.image_size,
            self.side, parse_max_tiles(a.vision_aspect_ratio),
        )

    def video_features(self, frames: np.ndarray) -> mx.array:
        """(F, 3, S, S) -> F * ceil(side/2)^2 pooled tokens, then one newline."""
        feats = self.encode_tiles(mx.array(frames))
        F, _, D = feats.shape
        s, p = self.side, math.ceil(self.side / 2)
        pooled = [resize_bilinear(f.reshape(s, s, D), p, p).reshape(-1, D) for f in feats]
        return mx.concatenate(pooled + [self.image_newline[None].astype(feats.dtype)])

    def encode_vision(self, batch: Sequence[ProcessedInputs]) -> List[Optional[mx.array]]:
        """Each prompt's image features (AnyRes, or one view per image), then its
        videos'; one tower call per prompt."""
        return [self.prompt_features(inputs) for inputs in batch]

    def prompt_features(self, inputs: ProcessedInputs) -> Optional[mx.array]:
        parts = []
        if inputs.pixel_values:
            parts.append(self.image_features(inputs.pixel_values, inputs.image_sizes, inputs.multi_image))
        parts += [self.video_features(v) for v in inputs.video_frames]
        return mx.concatenate(parts) if parts else None

    def get_input_embeddings(self, inputs: ProcessedInputs, vision_features: Optional[mx.array] = None):
        """Token embeddings with image/video features at their placeholders,
        (1, L, D); plain 1-D positions (None)."""
        ids = inputs.input_ids
        embeds = self.language_model.model.embed_tokens(mx.array(ids))
        if vision_features is None:
            vision_features = self.prompt_features(inputs)
        if vision_features is not None:
            is_image = ids == self.args.image_token_index
            n_image = int(np.count_nonzero(is_image)) if inputs.pixel_values else 0
            for mask, features in ((is_image, vision_features[:n_image]),
                                   (ids == self.args.video_token_index, vision_features[n_image:])):
                if features.shape[0]:
                    embeds = scatter_features(embeds, mask, features)
        return embeds[None], None

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, positions=None) -> mx.array:
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def sanitize(self, weights: dict) -> dict:
        """Map the hub, transformers-5 and in-memory HF layouts to this module."""
        vision, rest = {}, {}
        for k, v in weights.items():
            if k.startswith("model."):
                k = k[len("model.") :]
            if k == "lm_head.weight":
                k = "language_model.lm_head.weight"
            if k.startswith("vision_tower."):
                vision[k[len("vision_tower.") :]] = v
                continue
            if k.startswith("language_model.") and not k.startswith(
                ("language_model.model.", "language_model.lm_head.")
            ):
                k = "language_model.model." + k[len("language_model.") :]
            rest[k] = v
        if self.args.text_config.tie_word_embeddings:
            rest.pop("language_model.lm_head.weight", None)
        rest = {k: v for k, v in rest.items() if "rotary_emb.inv_freq" not in k}
        vision = self.vision_tower.sanitize(vision)
        if not self.args.vision_config.vision_use_head:
            vision = {k: v for k, v in vision.items() if not k.startswith("head.")}
        rest.update({"vision_tower." + k: v for k, v in vision.items()})
        return rest
