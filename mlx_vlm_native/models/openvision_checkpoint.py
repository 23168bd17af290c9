"""OpenVision checkpoints: read the released open_clip layout or an MLX folder,
and save MLX folders (`mlx-vlm-native convert` turns one into the other).

Released OpenVision 2 `*-vision-only` repos hold `open_clip_config.json`,
`open_clip_pytorch_model.bin` (or `open_clip_model.safetensors`) and, for the
caption decoder, `caption_decoder.safetensors` + `text_decoder_config.json`
and a BERT WordPiece vocabulary.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .base import check_weights
from .openvision import IMAGENET_MEAN as IMAGE_MEAN
from .openvision import IMAGENET_STD as IMAGE_STD
from .openvision import DecoderConfig, Model, ModelArgs, fused_qkv_key
from ..weights.torch_pickle import load_torch_checkpoint

OPEN_CLIP_CONFIG = "open_clip_config.json"
DECODER_CONFIG = "text_decoder_config.json"
DECODER_WEIGHTS = "caption_decoder.safetensors"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_open_clip_config(path: Path) -> dict:
    cfg = json.loads((Path(path) / OPEN_CLIP_CONFIG).read_text())
    model_cfg = cfg.get("model_cfg", cfg)
    if "vision_cfg" not in model_cfg:
        raise ValueError(f"{path / OPEN_CLIP_CONFIG} has no vision_cfg")
    return model_cfg


def open_clip_weights(path: Path) -> dict:
    """The vision tower's tensors from an open_clip checkpoint folder."""
    path = Path(path)
    st = sorted(path.glob("open_clip_*.safetensors"))
    if st:
        weights = mx.load(str(st[0]))
    else:
        bins = sorted(path.glob("open_clip_pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"no open_clip_*.safetensors or open_clip_pytorch_model.bin in {path}")
        weights = load_torch_checkpoint(bins[0])
    if any(k.startswith("visual.") for k in weights):  # a full CLIP: drop the text tower
        weights = {k: v for k, v in weights.items() if k.startswith("visual.")}
    return weights


def args_from_open_clip(path: Path, keep_ratio: float = 0.35) -> ModelArgs:
    path = Path(path)
    vision = read_open_clip_config(path)["vision_cfg"]
    decoder = None
    if (path / DECODER_CONFIG).exists():
        decoder = json.loads((path / DECODER_CONFIG).read_text())
    return ModelArgs(vision_config=vision, decoder_config=decoder, keep_ratio=keep_ratio)


def open_clip_to_mlx(path: Path) -> tuple:
    """(ModelArgs, MLX-layout weights) of an open_clip-layout folder."""
    path = Path(path)
    args = args_from_open_clip(path)
    weights = Model.sanitize(open_clip_weights(path))
    if args.decoder_config is not None:
        if not (path / DECODER_WEIGHTS).exists():
            raise FileNotFoundError(f"{path} has {DECODER_CONFIG} but no {DECODER_WEIGHTS}")
        decoder = mx.load(str(path / DECODER_WEIGHTS))
        weights.update({"decoder." + fused_qkv_key(k): v for k, v in decoder.items()})
    return args, weights


def config_dict(args: ModelArgs) -> dict:
    cfg = {"model_type": args.model_type, "keep_ratio": args.keep_ratio,
           "vision_config": asdict(args.vision_config),
           "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD)}
    if args.decoder_config is not None:
        cfg["decoder_config"] = asdict(args.decoder_config)
    return cfg


def build(args: ModelArgs, weights: dict) -> Model:
    model = Model(args)
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path, attention_mask: Optional[str] = None) -> Model:
    """An OpenVision model from an MLX folder (config.json) or a released
    open_clip-layout folder; `attention_mask` overrides the decoder's mask."""
    path = Path(path)
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        args = ModelArgs.from_dict(cfg)
        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(mx.load(str(f)))
        weights = Model.sanitize(weights)
    elif (path / OPEN_CLIP_CONFIG).exists():
        args, weights = open_clip_to_mlx(path)
    else:
        raise FileNotFoundError(f"{path} has neither config.json nor {OPEN_CLIP_CONFIG}")
    if attention_mask is not None and args.decoder_config is not None:
        args.decoder_config = DecoderConfig.from_dict({**vars(args.decoder_config), "attention_mask": attention_mask})
    return build(args, weights)


def save(model: Model, dst, tokenizer_src: Optional[Path] = None) -> Path:
    """config.json + model.safetensors (+ tokenizer files) in `dst`."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config_dict(model.args), indent=2))
    if tokenizer_src is not None:
        copy_tokenizer(tokenizer_src, dst)
    return dst


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in Path(src).iterdir():
        if f.name in TOKENIZER_FILES or (f.suffix == ".txt" and "vocab" in f.name):
            shutil.copy(f, Path(dst) / ("vocab.txt" if f.suffix == ".txt" else f.name))


def load_tokenizer(path):
    """The caption tokenizer stored with a checkpoint: tokenizer.json (any HF
    tokenizer) or a WordPiece vocab.txt (the released BERT vocabulary, lower-case)."""
    path = Path(path)
    if (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    vocabs = sorted(path.glob("*vocab*.txt"))
    if not vocabs:
        raise FileNotFoundError(f"no tokenizer.json or *vocab*.txt in {path}")
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(vocabs[0]), do_lower_case=True)
