"""Every training family's recipe is typed (training/config.py): the shipped
recipes parse, an unknown key is refused naming the nearest valid one, and an
out-of-range value is refused naming the key and the range, before any model
or data is loaded."""

import json
import math
from pathlib import Path

import pytest

from mlx_vlm_native.train import load_recipe, main
from mlx_vlm_native.training import eve, navit, openvision2
from mlx_vlm_native.training.config import (ConfigError, EveConfig, NavitConfig, OpenVision2Config, eve_config,
                                            family_config, navit_config, openvision2_config)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "train").glob("**/*.json"))
RUN_FIELDS = {"eve": {"model": "runs/eve-init", "output": "runs/stage", "data": {"jsonl": "captions.jsonl"}}}


def shipped(name: str) -> dict:
    recipe = load_recipe(REPO / name)
    return {**recipe, **RUN_FIELDS.get(recipe.get("family"), {})}


def changed(recipe: dict, path: str, value) -> dict:
    """`recipe` with the key at dotted `path` set to `value` (a copy)."""
    recipe = json.loads(json.dumps(recipe))
    *sections, key = path.split(".")
    inner = recipe
    for section in sections:
        inner = inner.setdefault(section, {})
    inner[key] = value
    return recipe


def test_every_shipped_recipe_parses_and_round_trips():
    assert len(SHIPPED) >= 7
    for path in SHIPPED:
        recipe = shipped(path.relative_to(REPO))
        family = recipe.get("family", "finetune")
        config = family_config(family, recipe, path)
        if family != "finetune":  # the record a run writes (recipe.json) parses again to the same config
            import dataclasses

            assert family_config(family, json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_the_shipped_values_are_read():
    cfg = navit_config(shipped("train/navit/shapes.json"))
    assert (cfg.batching.seq_len, cfg.batching.sequences, cfg.token_drop.max_rate, cfg.token_drop.schedule.to) == \
        (256, 4, 0.5, 0.0)
    assert cfg.optim.lr == 3e-3 and cfg.optim.bias_correction and not cfg.optim.decay_all  # the builder's defaults
    hp = eve_config(shipped("train/eve/stage3.json")).hyperparameters
    assert (hp.learning_rate, hp.batch_size, hp.steps, hp.warmup_ratio) == (2e-5, 2, 300, 0.03)
    reference = eve_config({**shipped("train/eve/stage1.json"), "scale": "reference", "steps": 5}).hyperparameters
    assert (reference.batch_size, reference.steps) == (16, 5)  # per_device_batch_size when batch_size is left out
    ov = openvision2_config(shipped("train/openvision2/stage2.json"))
    assert (ov.model.image_size, ov.model.keep_ratio, ov.optim.betas, ov.augment.inception_crop) == \
        (224, 0.35, [0.9, 0.95], 0.4)


NAVIT, EVE, OV2 = "train/navit/shapes.json", "train/eve/stage1.json", "train/openvision2/stage1.json"


@pytest.mark.parametrize("recipe, path, value, message", [
    # misspelt keys, at the top and in sections
    (NAVIT, "grad_acumulation", 2, "unknown key 'grad_acumulation'; did you mean 'grad_accumulation'"),
    (NAVIT, "batching.seq_length", 64, "unknown key 'batching.seq_length'; did you mean 'seq_len'"),
    (NAVIT, "token_drop.max_rte", 0.3, "unknown key 'token_drop.max_rte'; did you mean 'max_rate'"),
    (EVE, "lerning_rate", 1e-4, "unknown key 'lerning_rate'; did you mean 'learning_rate'"),
    (EVE, "laptop.bacth_size", 4, "unknown key 'laptop.bacth_size'; did you mean 'batch_size'"),
    (OV2, "grad_acumulation", 2, "unknown key 'grad_acumulation'; did you mean 'grad_accumulation'"),
    (OV2, "model.keep_ration", 0.5, "unknown key 'model.keep_ration'; did you mean 'keep_ratio'"),
    (OV2, "model.vision_config", {"widht": 64}, "unknown key 'model.vision_config.widht'; did you mean 'width'"),
    # values out of range, of the wrong type, or inconsistent with others
    (NAVIT, "steps", 0, r"steps must be >= 1, got 0"),
    (NAVIT, "grad_accumulation", 0, r"grad_accumulation must be in \[1, 65536\], got 0"),
    (NAVIT, "optim.lr", float("nan"), "optim.lr must be a finite number"),
    (NAVIT, "optim.lr", -1e-3, r"optim.lr must be in \(0, 1\]"),
    (NAVIT, "token_drop.max_rate", 1.0, r"token_drop.max_rate must be in \[0, 1\), got 1.0"),
    (NAVIT, "batching.mode", "ragged", "unknown batching mode 'ragged'; use one of packed, padded, square"),
    (NAVIT, "batching.sequences", 0, r"batching.sequences must be >= 1, got 0"),
    (NAVIT, "model.patch_size", -16, r"model.patch_size must be >= 1, got -16"),
    (NAVIT, "image.min_side", 400, r"image.min_side must be in \[1, 192\] \(up to max_side\), got 400"),
    (NAVIT, "model.num_heads", 5, r"model.hidden_size must be a multiple of model.num_heads \(5\)"),
    (NAVIT, "steps", "300", r"steps must be an integer, got '300' \(a string\)"),
    (EVE, "stage", 4, r"stage must be in \[1, 3\], got 4"),
    (EVE, "laptop.learning_rate", 0.0, r"laptop.learning_rate must be in \(0, 1\], got 0.0"),
    (EVE, "laptop.warmup_ratio", 1.5, r"laptop.warmup_ratio must be in \[0, 1\), got 1.5"),
    (EVE, "laptop.lr_scheduler", "linear", "laptop.lr_scheduler must be one of 'cosine', got 'linear'"),
    (EVE, "batch_size", 0, r"batch_size must be >= 1, got 0"),
    (EVE, "learning_rate", math.inf, "learning_rate must be a finite number"),
    (EVE, "prompt_format", "chatml", "prompt_format must be one of 'plain', 'vicuna_v1'"),
    (EVE, "scale", "reference", "the reference scale is given in epochs: pass --steps"),
    (EVE, "grad_accumulation", -1, r"grad_accumulation must be in \[1, 65536\], got -1"),
    (OV2, "batch_size", 0, r"batch_size must be in \[1, 1048576\], got 0"),
    (OV2, "steps", -5, r"steps must be >= 1, got -5"),
    (OV2, "model.keep_ratio", 1.5, r"model.keep_ratio must be in \(0, 1\], got 1.5"),
    (OV2, "model.image_size", 80, r"model.image_size must be a multiple of model.patch_size \(14\), got 80"),
    (OV2, "model.vision", "XXL", "model.vision must be one of"),
    (OV2, "optim.betas", [0.9, 1.5], r"optim.betas must be two numbers in \[0, 1\)"),
    (OV2, "augment.colour_jitter", 2.0, r"augment.colour_jitter must be in \[0.0, 1.0\], got 2.0"),
    (OV2, "image_fit", "stretch", "unknown image_fit 'stretch'; use one of crop, pad, resize"),
    (OV2, "loss_weight", 0, "loss_weight must be > 0, got 0"),
])
def test_keys_and_values_are_checked(recipe, path, value, message):
    bad = changed(shipped(recipe), path, value)
    family = bad["family"]
    with pytest.raises(ConfigError, match=message):
        family_config(family, bad)


def test_required_keys_are_named():
    recipe = shipped(NAVIT)
    del recipe["steps"]
    with pytest.raises(ConfigError, match="missing key 'steps'"):
        navit_config(recipe)
    with pytest.raises(ConfigError, match="missing key 'optim.lr'"):
        openvision2_config(changed(shipped(OV2), "optim", {"warmup_steps": 3}))
    with pytest.raises(ConfigError, match="missing key 'model'"):
        eve_config({k: v for k, v in shipped(EVE).items() if k != "model"})


def refuse_loading(monkeypatch):
    """Any model, tokenizer or data read from here on fails the test."""
    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the recipe was checked")

    for module, name in ((navit, "open_data"), (navit, "Model"), (eve, "get_model_path"), (eve, "load"),
                         (eve, "read_records"), (openvision2, "load_text_tokenizer"), (openvision2, "open_dataset")):
        monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("task, recipe, path, value, message", [
    (navit, NAVIT, "keep_checkpoints", -1, "keep_checkpoints must be >= 0"),
    (eve, EVE, "align_loss_weight", -1.0, r"align_loss_weight must be >= 0.0"),
    (openvision2, OV2, "model.attention_mask", "full", "model.attention_mask must be one of 'prefix', 'causal'"),
])
def test_run_refuses_before_loading_anything(monkeypatch, tmp_path, task, recipe, path, value, message):
    refuse_loading(monkeypatch)
    bad = changed(shipped(recipe), path, value)
    bad["output"] = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        task.run(bad, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, path, value, message", [
    (NAVIT, "checkpoint_evry", 10, "unknown key 'checkpoint_evry'; did you mean 'checkpoint_every'"),
    (EVE, "laptop.steps", 0, r"laptop.steps must be >= 1, got 0"),
    (OV2, "optim.warmup_steps", -2, "optim.warmup_steps must be >= 0, got -2"),
])
def test_the_cli_names_the_recipe_file_and_the_key(monkeypatch, tmp_path, recipe, path, value, message):
    refuse_loading(monkeypatch)
    file = tmp_path / "recipe.json"
    file.write_text(json.dumps(changed(shipped(recipe), path, value)))
    with pytest.raises(SystemExit, match=f"error: {file}: {message}"):
        main(["--recipe", str(file), "--output", str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "run").exists()


def test_cli_flags_are_checked_too(monkeypatch, tmp_path):
    refuse_loading(monkeypatch)
    with pytest.raises(SystemExit, match=r"shapes.json: steps must be >= 1, got 0"):
        main(["--recipe", str(REPO / NAVIT), "--steps", "0", "--output", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=r"stage2.json: batch_size must be in \[1, 1048576\], got -4"):
        main(["--recipe", str(REPO / "train/openvision2/stage2.json"), "--batch-size", "-4"])
    with pytest.raises(SystemExit, match="--batch-size does not apply to the navit family"):
        main(["--recipe", str(REPO / NAVIT), "--batch-size", "8"])
    with pytest.raises(SystemExit, match="--tokenizer does not apply to the eve family"):
        main(["--recipe", str(REPO / EVE), "--tokenizer", "bert"])


def test_configs_pass_through_the_tasks_helpers():
    """The tasks' helpers take the typed sections or the dicts they took before."""
    cfg = navit_config(shipped(NAVIT))
    assert isinstance(cfg, NavitConfig) and navit_config(cfg) is cfg
    assert navit.model_args(cfg, ["a", "b"]).patch_size == 16
    assert isinstance(eve_config(shipped(EVE)), EveConfig)
    ov = openvision2_config(shipped(OV2))
    assert isinstance(ov, OpenVision2Config) and openvision2_config(ov) is ov
    assert openvision2.model_args(ov.model, 100, {"pad": 0, "bos": 1, "eos": 2}).vision_config.image_size == 84
