"""OpenVision 2 pretraining task: caption-only loss on masked visual tokens,
two-stage (low then high resolution) curriculum. Recipes: `train/openvision2/`."""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models import openvision_checkpoint as ovc
from ..models.openvision import DecoderConfig, Model, ModelArgs, VisionConfig
from .checkpoint import latest_checkpoint, resume_state
from .config import OpenVision2Model, openvision2_config, parse
from ..processors.image import FIT_PIXELS
from .data import augmented_pixels, batches, open_dataset, tokenize_captions
from .loop import TrainConfig, train
from .optim import build_optimizer
from .stream import rank_batches


def load_text_tokenizer(name: str):
    """A checkpoint/vocab folder (see `openvision_checkpoint.load_tokenizer`) or a Hub id."""
    if Path(name).is_dir():
        return ovc.load_tokenizer(name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def model_section(cfg) -> OpenVision2Model:
    return cfg if isinstance(cfg, OpenVision2Model) else parse(OpenVision2Model, cfg, "model")


def special_ids(tokenizer, cfg) -> dict:
    """pad/bos/eos: the recipe's, else the released [PAD]/[BOS]/[EOS], else the tokenizer's.
    `cfg`: the recipe's `model` section (or its dict)."""
    cfg = model_section(cfg)
    vocab = tokenizer.get_vocab()
    fallback = {
        "pad": vocab.get("[PAD]", tokenizer.pad_token_id),
        "bos": vocab.get("[BOS]", tokenizer.bos_token_id or tokenizer.cls_token_id),
        "eos": vocab.get("[EOS]", tokenizer.eos_token_id or tokenizer.sep_token_id),
    }
    chosen = {k: getattr(cfg, f"{k}_token_id") for k in fallback}
    ids = {k: fallback[k] if chosen[k] is None else chosen[k] for k in fallback}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"the tokenizer has no {missing[0]} token; set model.{missing[0]}_token_id")
    return ids


def model_args(cfg, vocab_size: int, ids: dict) -> ModelArgs:
    """From a recipe's `model` section (or its dict): variants (`vision`, `decoder`) or explicit configs."""
    cfg = model_section(cfg)
    size, patch = cfg.image_size, cfg.patch_size
    if cfg.vision_config is not None:
        vision = VisionConfig.from_dict({**cfg.vision_config, "image_size": size, "patch_size": patch})
    else:
        vision = VisionConfig.from_variant(cfg.vision, size, patch)
    extra = {"pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
             "attention_mask": cfg.attention_mask}
    if cfg.decoder_config is not None:
        decoder = DecoderConfig.from_dict({**cfg.decoder_config, "vocab_size": vocab_size,
                                           "vision_width": vision.width, **extra})
    else:
        decoder = DecoderConfig.from_variant(cfg.decoder, vision.width, vocab_size, **extra)
    return ModelArgs(vision_config=vision, decoder_config=decoder, keep_ratio=cfg.keep_ratio)


def init_model(args: ModelArgs, seed: int = 0) -> Model:
    """A freshly initialised model for pretraining (MLX default inits; the
    positional table is the fixed sin-cos one)."""
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def initial_model(init: Optional[str], args: ModelArgs, seed: int = 0):
    """Fresh weights, or stage 2: the `init` checkpoint with the positional
    table regenerated for this stage's grid."""
    model = init_model(args, seed=seed)
    if not init:
        return model
    init = Path(init)
    ckpt = latest_checkpoint(init) if init.is_dir() else None
    if ckpt is not None:
        weights = mx.load(str(ckpt / "weights.safetensors"))
    else:
        weights = dict(tree_flatten(ovc.load(init).trainable_parameters()))
    expected = dict(tree_flatten(model.trainable_parameters()))
    for k, v in weights.items():
        if k in expected and expected[k].shape != v.shape:
            raise ValueError(f"init weight '{k}' has shape {tuple(v.shape)}, this stage expects "
                             f"{tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"init checkpoint {init} is missing '{missing[0]}'")
    model.load_weights([(k, v) for k, v in weights.items() if k in expected], strict=False)
    model.vision.set_image_size(args.vision_config.image_size)
    mx.eval(model.parameters())
    return model


def run(recipe, resume: Optional[str] = None, progress: bool = True, on_step=None) -> dict:
    """Train from a recipe (a dict or an OpenVision2Config), checked whole before
    the tokenizer, the model or the data is read."""
    cfg = openvision2_config(recipe)
    seed, mcfg = cfg.seed, cfg.model
    fit = FIT_PIXELS[cfg.image_fit]
    tokenizer = load_text_tokenizer(cfg.tokenizer)
    ids = special_ids(tokenizer, mcfg)
    args = model_args(mcfg, len(tokenizer), ids)
    model = initial_model(cfg.init, args, seed)
    total = cfg.steps
    optimizer = build_optimizer(cfg.optim.as_dict(), total)
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"

    start_step, position, rng_key = resume_state(resume, ckpt_dir, model, optimizer, total)

    size, max_len = args.vision_config.image_size, mcfg.max_text_len
    mean = ovc.IMAGE_MEAN if cfg.image_mean is None else cfg.image_mean
    std = ovc.IMAGE_STD if cfg.image_std is None else cfg.image_std
    dtype = getattr(mx, cfg.compute_dtype) if cfg.compute_dtype else mx.float32

    augment = cfg.augment
    area_min = augment.inception_crop if augment else None
    jitter = augment.colour_jitter if augment else 0.0

    def to_pixels(sample):
        if area_min is None:
            return fit(sample.image, size, mean, std)
        return augmented_pixels(sample, size, mean, std, seed, area_min, jitter)

    def collate(samples):
        pixels = np.stack([to_pixels(s) for s in samples])
        text = tokenize_captions(tokenizer, [s.caption for s in samples], max_len,
                                 ids["bos"], ids["eos"], ids["pad"])
        return mx.array(pixels, dtype=dtype), mx.array(text)

    weight = cfg.loss_weight

    def loss_fn(model, batch, key):
        pixels, text = batch
        loss, count = model.loss(pixels, text, key=key)
        return weight * loss, count

    dataset = open_dataset(cfg.data.as_spec(), seed=seed)
    group = mx.distributed.init()
    stream = batches(dataset, cfg.batch_size, collate, position)
    if group.size() > 1:
        stream = rank_batches(stream, group.rank(), group.size())
    config = TrainConfig(
        steps=total,
        grad_accumulation=cfg.grad_accumulation,
        compute_dtype=cfg.compute_dtype,
        grad_checkpoint=cfg.grad_checkpoint,
        checkpoint_dir=str(ckpt_dir),
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        progress=progress,
    )
    result = train(model, loss_fn, optimizer, stream, config, start_step=start_step,
                   checkpoint_layers=model.layers, batch_size_of=lambda b: b[0].shape[0],
                   on_step=on_step, seed=seed, rng_key=rng_key)
    if group.rank() == 0:
        final = ovc.save(model, out / "model")
        tokenizer.save_pretrained(str(final))
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    result["model"] = model
    return result
