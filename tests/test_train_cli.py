"""`mlx-vlm-native train` as mlx_lm.lora: no recipe needed (the embedded
model and the measured defaults), mlx-lm's flag names, packaged recipes by
name, -c JSON/YAML; the typed recipe refuses unknown keys (naming the nearest)
and every out-of-range value (naming the key and range) before anything is
loaded; data that is not a regular file, an output that is a file, a rank
above a layer's dimension and a token limit no record fits are errors."""

import json
import os

import pytest
from PIL import Image

from mlx_vlm_native import train as train_cli
from mlx_vlm_native.training.config import ConfigError, FinetuneConfig, finetune_config
from mlx_vlm_native.training.finetune import run


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("chats")
    lines = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 4):
        Image.new("RGB", (64, 48), rgb).save(root / f"{i}.png")
        lines.append({"images": [f"{i}.png"], "conversations": [
            {"from": "human", "value": "<image>\nTag this picture."}, {"from": "gpt", "value": f"colour={name}"}]})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def cli(*args):
    train_cli.main([str(a) for a in args] + ["--no-progress"])


def test_no_recipe_finetunes_the_embedded_model_with_mlx_lm_flags(chats, tmp_path, capsys):
    cli("--data", chats / "train.jsonl", "--iters", 2, "--batch-size", 2, "--learning-rate", 1e-3,
        "--lora-rank", 4, "--lora-scale", 10, "--num-layers", 2, "--adapter-path", tmp_path / "ad",
        "--output", tmp_path / "run")
    config = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"]["rank"] == 4 and config["lora_parameters"]["scale"] == 10.0
    assert all(".layers.2." in k or ".layers.3." in k for k in config["lora_parameters"]["keys"])
    assert "step 2: loss" in capsys.readouterr().out
    # --resume-adapter-file starts from those weights; --steps is --iters' alias
    cli("--data", chats, "--steps", 1, "--batch-size", 2, "--lora-rank", 4, "--lora-scale", 10, "--num-layers", 2,
        "--resume-adapter-file", tmp_path / "ad/adapters.safetensors", "--adapter-path", tmp_path / "ad2",
        "--output", tmp_path / "run2")
    assert (tmp_path / "ad2/adapters.safetensors").exists()


def test_packaged_recipe_by_name_and_yaml_config(chats, tmp_path):
    assert {"lora", "dora", "full", "qlora"} <= set(train_cli.packaged_recipes())
    cli("--recipe", "dora", "--data", chats / "train.jsonl", "--iters", 1, "--batch-size", 1,
        "--output", tmp_path / "dora")
    assert json.loads((tmp_path / "dora/adapters/adapter_config.json").read_text())["fine_tune_type"] == "dora"
    (tmp_path / "c.yaml").write_text(f"data:\n  train: {chats / 'train.jsonl'}\nsteps: 1\nmicro_batch_size: 1\n"
                                     f"method: full\noutput: {tmp_path / 'full'}\noptim:\n  lr: 1.0e-4\n")
    cli("-c", tmp_path / "c.yaml")
    assert (tmp_path / "full/model/config.json").exists()
    (tmp_path / "bad.yaml").write_text("steps: 1\ngrad_acumulation: 2\n")
    with pytest.raises(SystemExit, match="unknown key 'grad_acumulation'; did you mean 'grad_accumulation'"):
        cli("-c", tmp_path / "bad.yaml", "--data", chats)


@pytest.mark.parametrize("recipe, message", [
    ({"grad_acumulation": 2}, "unknown key 'grad_acumulation'; did you mean 'grad_accumulation'"),
    ({"optim": {"learning_rate": 1e-3}}, "unknown key 'optim.learning_rate'; did you mean 'lr'"),
    ({"steps": "12"}, r"steps must be an integer, got '12' \(a string\)"),
    ({"steps": 0}, r"steps must be >= 1"),
    ({"micro_batch_size": 0}, r"micro_batch_size must be in \[1, 4096\]"),
    ({"micro_batch_size": -3}, r"micro_batch_size must be in \[1, 4096\]"),
    ({"grad_accumulation": 0}, r"grad_accumulation must be in \[1, 65536\]"),
    ({"lora": {"rank": 0}}, r"lora.rank must be in \[1, 4096\]"),
    ({"lora": {"rank": 10**9}}, r"lora.rank must be in \[1, 4096\]"),
    ({"lora": {"scale": float("nan")}}, "lora.scale must be a finite number"),
    ({"data": {"valid_fraction": 1.0}}, r"data.valid_fraction must be in \(0, 1\)"),
    ({"data": {"valid_fraction": -0.1}}, r"data.valid_fraction must be in \(0, 1\)"),
    ({"optim": {"lr": 0}}, r"optim.lr must be in \(0, 1\]"),
    ({"optim": {"lr": -1e-3}}, r"optim.lr must be in \(0, 1\]"),
    ({"optim": {"lr": float("inf")}}, "optim.lr must be a finite number"),
    ({"optim": {"lr": float("nan")}}, "optim.lr must be a finite number"),
    ({"optim": {"lr": 50.0}}, r"optim.lr must be in \(0, 1\]"),
    ({"on_too_long": "truncate"}, "on_too_long must be one of 'skip', 'error'"),
    ({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    ({"keep_checkpoints": -1}, "keep_checkpoints must be >= 0"),
    ({"method": "qlora"}, "method must be one of 'lora', 'dora', 'full'"),
    ({"max_tokens": 0}, "max_tokens must be >= 8"),
    ({"mask_prompt": "yes"}, "mask_prompt must be true or false"),
])
def test_recipe_keys_and_values_are_checked(recipe, message):
    with pytest.raises(ConfigError, match=message):
        finetune_config(recipe)


def test_defaults_are_a_valid_recipe():
    cfg = finetune_config({})
    assert cfg == FinetuneConfig() and cfg.method == "lora" and cfg.mask_prompt


def test_data_must_be_a_regular_file_and_output_a_folder(chats, tmp_path):
    def data(path, **kw):
        return {"data": {"train": str(path)}, "output": str(tmp_path / "o"), "steps": 1, **kw}

    with pytest.raises(ConfigError, match="has no train.jsonl"):
        run(data(tmp_path))
    with pytest.raises(ConfigError, match="not a regular file"):
        run(data("/dev/zero"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        run(data(tmp_path / "fifo"))
    with pytest.raises(FileNotFoundError, match="file not found"):
        run(data(tmp_path / "nope.jsonl"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output: .*afile is a file, not a folder"):
        run(data(chats / "train.jsonl", output=str(tmp_path / "afile" / "run")))


def test_rank_above_a_layers_dimension_and_a_limit_no_record_fits(chats, tmp_path):
    base = {"data": {"train": str(chats / "train.jsonl")}, "output": str(tmp_path / "o"), "steps": 1}
    with pytest.raises(ValueError, match=r"LoRA rank 200 exceeds the smaller dimension 128 .* use a rank in \[1, 128\]"):
        run({**base, "lora": {"rank": 200}}, progress=False)
    with pytest.raises(ValueError, match="no sample of .* fits the 16-token limit .*the shortest has \\d+ tokens"):
        run({**base, "max_tokens": 16}, progress=False)


def test_mask_prompt_off_trains_on_every_token(chats):
    from mlx_vlm_native import load
    from mlx_vlm_native.training.finetune import ConversationFile, tokenize

    _, processor = load()
    conversation = ConversationFile(chats / "train.jsonl").read(0)
    _, answers = tokenize(processor, conversation)
    inputs, every = tokenize(processor, conversation, mask_prompt=False)
    placeholders = (inputs.input_ids == processor.image_token_id)
    assert answers.sum() < every.sum() == (~placeholders).sum()


def test_full_finetuning_keeps_the_vision_tower_unless_told():
    assert finetune_config({"method": "full"}).frozen == [r"^vision_tower\."]
    assert finetune_config({"method": "full", "freeze": []}).frozen == []
    assert finetune_config({}).frozen == []


def test_a_line_over_the_limit_is_named(tmp_path, monkeypatch):
    from mlx_vlm_native.training import finetune

    monkeypatch.setattr(finetune, "MAX_LINE_BYTES", 100)
    (tmp_path / "d.jsonl").write_text('{"messages": []}\n' + "x" * 500 + "\n")
    with pytest.raises(finetune.RecordError, match="d.jsonl, line 2: longer than 100 bytes"):
        finetune.ConversationFile(tmp_path / "d.jsonl", on_bad_record="skip")
    with pytest.raises(ValueError, match="not a regular file"):
        finetune.ConversationFile("/dev/zero")
