"""OpenVision 2 pretraining task: caption-only loss on masked visual tokens,
two-stage (low then high resolution) curriculum. Recipes: `train/openvision2/`."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models import openvision_checkpoint as ovc
from ..models.openvision import DecoderConfig, Model, ModelArgs, VisionConfig
from .checkpoint import latest_checkpoint, resume_state
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


def special_ids(tokenizer, cfg: dict) -> dict:
    """pad/bos/eos: the recipe's, else the released [PAD]/[BOS]/[EOS], else the tokenizer's."""
    vocab = tokenizer.get_vocab()
    fallback = {
        "pad": vocab.get("[PAD]", tokenizer.pad_token_id),
        "bos": vocab.get("[BOS]", tokenizer.bos_token_id or tokenizer.cls_token_id),
        "eos": vocab.get("[EOS]", tokenizer.eos_token_id or tokenizer.sep_token_id),
    }
    ids = {k: cfg.get(f"{k}_token_id", v) for k, v in fallback.items()}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"the tokenizer has no {missing[0]} token; set model.{missing[0]}_token_id")
    return ids


def model_args(cfg: dict, vocab_size: int, ids: dict) -> ModelArgs:
    """From a recipe's `model` section: variants (`vision`, `decoder`) or explicit configs."""
    size, patch = cfg["image_size"], cfg.get("patch_size", 14)
    if "vision_config" in cfg:
        vision = VisionConfig.from_dict({**cfg["vision_config"], "image_size": size, "patch_size": patch})
    else:
        vision = VisionConfig.from_variant(cfg["vision"], size, patch)
    extra = {"pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
             "attention_mask": cfg.get("attention_mask", "prefix")}
    if "decoder_config" in cfg:
        decoder = DecoderConfig.from_dict({**cfg["decoder_config"], "vocab_size": vocab_size,
                                           "vision_width": vision.width, **extra})
    else:
        decoder = DecoderConfig.from_variant(cfg["decoder"], vision.width, vocab_size, **extra)
    return ModelArgs(vision_config=vision, decoder_config=decoder, keep_ratio=cfg.get("keep_ratio", 0.35))


def init_model(args: ModelArgs, seed: int = 0) -> Model:
    """A freshly initialised model for pretraining (MLX default inits; the
    positional table is the fixed sin-cos one)."""
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def initial_model(recipe: dict, args: ModelArgs):
    """Fresh weights, or stage 2: the `init` checkpoint with the positional
    table regenerated for this stage's grid."""
    init = recipe.get("init")
    model = init_model(args, seed=recipe.get("seed", 0))
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


def run(recipe: dict, resume: Optional[str] = None, progress: bool = True, on_step=None) -> dict:
    seed = recipe.get("seed", 0)
    mcfg = recipe["model"]
    fit_name = recipe.get("image_fit", "crop")
    if fit_name not in FIT_PIXELS:
        raise ValueError(f"unknown image_fit {fit_name!r}; use one of {', '.join(FIT_PIXELS)}")
    fit = FIT_PIXELS[fit_name]
    tokenizer = load_text_tokenizer(recipe["tokenizer"])
    ids = special_ids(tokenizer, mcfg)
    args = model_args(mcfg, len(tokenizer), ids)
    model = initial_model(recipe, args)
    total = recipe["steps"]
    optimizer = build_optimizer(recipe["optim"], total)
    out = Path(recipe["output"])
    ckpt_dir = out / "checkpoints"

    start_step, position, rng_key = resume_state(resume, ckpt_dir, model, optimizer, total)

    size, max_len = args.vision_config.image_size, mcfg.get("max_text_len", 128)
    mean, std = recipe.get("image_mean", ovc.IMAGE_MEAN), recipe.get("image_std", ovc.IMAGE_STD)
    dtype = getattr(mx, recipe["compute_dtype"]) if recipe.get("compute_dtype") else mx.float32

    augment = recipe.get("augment") or {}
    area_min, jitter = augment.get("inception_crop"), augment.get("colour_jitter", 0.0)

    def to_pixels(sample):
        if area_min is None:
            return fit(sample.image, size, mean, std)
        return augmented_pixels(sample, size, mean, std, seed, area_min, jitter)

    def collate(samples):
        pixels = np.stack([to_pixels(s) for s in samples])
        text = tokenize_captions(tokenizer, [s.caption for s in samples], max_len,
                                 ids["bos"], ids["eos"], ids["pad"])
        return mx.array(pixels, dtype=dtype), mx.array(text)

    weight = recipe.get("loss_weight", 1.0)

    def loss_fn(model, batch, key):
        pixels, text = batch
        loss, count = model.loss(pixels, text, key=key)
        return weight * loss, count

    dataset = open_dataset(recipe["data"], seed=seed)
    group = mx.distributed.init()
    stream = batches(dataset, recipe["batch_size"], collate, position)
    if group.size() > 1:
        stream = rank_batches(stream, group.rank(), group.size())
    config = TrainConfig(
        steps=total,
        grad_accumulation=recipe.get("grad_accumulation", 1),
        compute_dtype=recipe.get("compute_dtype"),
        grad_checkpoint=recipe.get("grad_checkpoint", False),
        checkpoint_dir=str(ckpt_dir),
        checkpoint_every=recipe.get("checkpoint_every", 0),
        keep_checkpoints=recipe.get("keep_checkpoints", 0),
        progress=progress,
    )
    result = train(model, loss_fn, optimizer, stream, config, start_step=start_step,
                   checkpoint_layers=model.layers, batch_size_of=lambda b: b[0].shape[0],
                   on_step=on_step, seed=seed, rng_key=rng_key)
    if group.rank() == 0:
        final = ovc.save(model, out / "model")
        tokenizer.save_pretrained(str(final))
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    result["model"] = model
    return result
