"""OpenVision checkpoints: read the released open_clip layout, convert it to an
MLX folder, load either, and write tiny random ones in the released layout.

Released OpenVision 2 `*-vision-only` repos hold `open_clip_config.json`,
`open_clip_pytorch_model.bin` (or `open_clip_model.safetensors`) and, for the
caption decoder, `caption_decoder.safetensors` + `text_decoder_config.json`
and a BERT WordPiece vocabulary.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .models.base import check_weights
from .models.openvision import IMAGENET_MEAN as IMAGE_MEAN
from .models.openvision import IMAGENET_STD as IMAGE_STD
from .models.openvision import DecoderConfig, Model, ModelArgs, fused_qkv_key

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
        from .torch_pickle import load_torch_checkpoint

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
    from dataclasses import asdict

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
    from mlx.utils import tree_flatten

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


def convert(src, dst, dtype: Optional[str] = None) -> Path:
    """Released open_clip-layout folder -> MLX folder."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    model = load(src)
    if dtype is not None:
        from .convert import DTYPES, cast

        cast(model, DTYPES[dtype])
    return save(model, dst, tokenizer_src=src)


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


# ---- tiny random checkpoints in the released layout (tests, demos) ----

TINY_WORDS = (
    "a photo of the cat dog red blue green square circle on in with and small large "
    "image picture white black yellow two one sitting table grass sky tree car".split()
)


def write_vocab(path: Path, words=TINY_WORDS) -> list:
    """A WordPiece vocab with pad/bos/eos at 0/1/2 as in the released decoders."""
    tokens = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    Path(path).write_text("\n".join(tokens) + "\n")
    return tokens


def write_tiny_open_clip(dst, image_size: int = 28, patch_size: int = 7, width: int = 32,
                         layers: int = 2, head_width: int = 8, decoder_width: int = 24,
                         decoder_depth: int = 2, decoder_heads: int = 3,
                         seed: int = 0, weights_format: str = "safetensors") -> Path:
    """Random weights in the released open_clip + caption-decoder layout (torch
    names and shapes, OIHW conv, fused in_proj), the MoCo-v3 positional table
    stored as the JAX converter stores it, and a tiny BERT vocab."""
    from safetensors.numpy import save_file

    from .models.openvision import positional_table

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ln(prefix, d):
        return {f"{prefix}.weight": 1 + r(d), f"{prefix}.bias": r(d)}

    W, mlp, grid = width, 4 * width, image_size // patch_size
    vision = {
        "conv1.weight": r(W, 3, patch_size, patch_size),
        "class_embedding": r(W),
        "positional_embedding": np.array(positional_table(grid, W)),
        "proj": r(W, W),
        **ln("ln_post", W),
    }
    def block(prefix, d, hidden):
        return {
            **ln(f"{prefix}.ln_1", d), **ln(f"{prefix}.ln_2", d),
            f"{prefix}.attn.in_proj_weight": r(3 * d, d), f"{prefix}.attn.in_proj_bias": r(3 * d),
            f"{prefix}.attn.out_proj.weight": r(d, d), f"{prefix}.attn.out_proj.bias": r(d),
            f"{prefix}.mlp.c_fc.weight": r(hidden, d), f"{prefix}.mlp.c_fc.bias": r(hidden),
            f"{prefix}.mlp.c_proj.weight": r(d, hidden), f"{prefix}.mlp.c_proj.bias": r(d),
        }
    for i in range(layers):
        vision.update(block(f"transformer.resblocks.{i}", W, mlp))
    if weights_format == "bin":
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in vision.items()}, dst / "open_clip_pytorch_model.bin")
    else:
        save_file(vision, str(dst / "open_clip_model.safetensors"))
    config = {
        "model_cfg": {
            "embed_dim": W,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": W,
                           "patch_size": patch_size, "head_width": head_width,
                           "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True,
                           "output_tokens": True, "norm_kwargs": {"eps": 1e-6}},
        },
        "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
    }
    (dst / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))

    vocab = write_vocab(dst / "vocab.txt")
    D, V = decoder_width, len(vocab)
    decoder = {
        "token_embedding.weight": r(V, D, scale=0.5),
        "image_projection.weight": r(D, W),
        **ln("ln_final", D),
        "lm_head.weight": r(V, D, scale=0.5),
    }
    for i in range(decoder_depth):
        decoder.update(block(f"blocks.{i}", D, 4 * D))
    save_file(decoder, str(dst / DECODER_WEIGHTS))
    (dst / DECODER_CONFIG).write_text(json.dumps({
        "width": D, "depth": decoder_depth, "num_heads": decoder_heads, "mlp_dim": 4 * D,
        "vocab_size": V, "vision_width": W, "pad_id": 0, "bos_id": 1, "eos_id": 2,
    }, indent=2))
    return dst


def init_model(args: ModelArgs, seed: int = 0) -> Model:
    """A freshly initialised model for pretraining (MLX default inits; the
    positional table is the fixed sin-cos one)."""
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def main(argv=None) -> None:
    """`python -m mlx_vlm_native.openvision_checkpoint --src RELEASED --dst MLX [--dtype]`."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Convert a released OpenVision (open_clip layout) folder to MLX.")
    p.add_argument("--src", required=True, help="folder with open_clip_config.json (+ caption decoder)")
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    args = p.parse_args(argv)
    try:
        print(f"[INFO] Saved MLX model to {convert(args.src, args.dst, args.dtype)}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
           "yellow": (230, 220, 30), "white": (245, 245, 245), "black": (10, 10, 10)}


def write_synthetic_captions(dst, count: int = 256, size: int = 32, seed: int = 0,
                             shards: int = 0) -> Path:
    """Coloured squares/circles on a contrasting background with matching captions
    ("a red square on black"): `captions.jsonl` + images, or `shards` tar files."""
    import io
    import tarfile

    from PIL import Image, ImageDraw

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    records = []
    for i in range(count):
        fg, bg = rng.choice(len(names), 2, replace=False)
        shape = ["square", "circle"][int(rng.integers(2))]
        image = Image.new("RGB", (size, size), COLOURS[names[bg]])
        lo, hi = sorted(rng.integers(2, size - 2, 2))
        hi = max(hi, lo + size // 3)
        box = (lo, lo, min(hi, size - 1), min(hi, size - 1))
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[names[fg]])
        records.append((f"{i:05d}", image, f"a {names[fg]} {shape} on {names[bg]}"))
    if shards:
        for s in range(shards):
            with tarfile.open(dst / f"shard-{s:04d}.tar", "w") as tar:
                for key, image, caption in records[s::shards]:
                    for ext, data in (("jpg", _png_bytes(image)), ("txt", caption.encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return dst
    (dst / "images").mkdir(exist_ok=True)
    lines = []
    for key, image, caption in records:
        image.save(dst / "images" / f"{key}.png")
        lines.append(json.dumps({"image": f"images/{key}.png", "caption": caption}))
    (dst / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
