"""Loading and saving models: local folders or Hub ids, HF or MLX layout."""

import importlib
import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models.base import check_weights

MODEL_REMAPPING = {
    "llava-onevision": "llava_onevision",
    "qwen2_5_vl": "qwen2_vl",
    "pointsv1.5_chat": "points_v15",
    "eve-qwen2": "eve",
}
SUPPORTED = ("llava_onevision", "qwen2_vl", "points_v15", "eve", "openvision_llava")

OPEN_CLIP_CONFIG = "open_clip_config.json"  # released OpenVision folders
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "open_clip_pytorch_model.bin"]
SIDE_FILE_PATTERNS = [
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]
NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


DEFAULT_MODEL = Path(__file__).parent / "default_model"


def default_model_path() -> str:
    """The small model shipped in the package (`train/default_model/` builds it)."""
    if not (DEFAULT_MODEL / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL}; rebuild it with "
            "`python train/default_model/build.py --install` or pass --model"
        )
    return str(DEFAULT_MODEL)


def get_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise download the Hub repo (weights + side files)."""
    path = Path(path_or_repo)
    if path.exists():
        if not any((path / f).exists() for f in ("config.json", OPEN_CLIP_CONFIG)):
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                path_or_repo,
                revision=revision,
                allow_patterns=WEIGHT_PATTERNS + SIDE_FILE_PATTERNS,
            )
        )
    except Exception as e:
        raise FileNotFoundError(
            f"{path_or_repo!r} is neither a local folder nor a reachable Hub repo: {e}"
        ) from e


def load_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def get_model_classes(config: dict):
    model_type = config.get("model_type")
    model_type = MODEL_REMAPPING.get(model_type, model_type)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model_type {config.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    arch = importlib.import_module(f"mlx_vlm_native.models.{model_type}")
    return arch.Model, arch.ModelArgs


def load_weights(path: Path) -> dict:
    """All tensors of a checkpoint folder: safetensors (lazy) or torch pickles (safe)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        weights = {}
        for f in files:
            weights.update(mx.load(str(f)))
        return weights
    pickles = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
    if pickles:
        from .torch_pickle import load_torch_checkpoint

        weights = {}
        for f in pickles:
            weights.update(load_torch_checkpoint(f))
        return weights
    raise FileNotFoundError(f"no *.safetensors, pytorch_model*.bin or *.pth weights in {path}")


def load_model(path: Path, lazy: bool = False, strict: bool = True) -> Tuple[nn.Module, dict]:
    config = load_config(path)
    model_class, args_class = get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(load_weights(path))
    quantization = config.get("quantization")
    if quantization is not None:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    if strict:
        check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=strict)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def load_processor(path: Path, model):
    """`processors/<model_type>.py` provides `Processor.from_pretrained(path, tokenizer, args)`."""
    from mlx_lm.utils import load_tokenizer

    model_type = MODEL_REMAPPING.get(model.model_type, model.model_type)
    module = importlib.import_module(f"mlx_vlm_native.processors.{model_type}")
    # transformers reads config.json on the way and warns that it does not know
    # our model types (openvision_llava, eve, ...): true, and not the tokenizer's business
    config_log = logging.getLogger("transformers.configuration_utils")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        tokenizer = load_tokenizer(path)
    finally:
        config_log.setLevel(level)
    return module.Processor.from_pretrained(path, tokenizer, model.args)


def load(
    path_or_repo: Optional[str] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
):
    """Load a model folder (MLX or HF layout) or Hub id -> (model, processor);
    without one, the embedded default model."""
    if path_or_repo is None:
        path_or_repo = default_model_path()
    path = get_model_path(path_or_repo, revision)
    model, _ = load_model(path, lazy=lazy)
    if adapter_path is not None:
        from .training.finetune import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    return model, load_processor(path, model)


def save_weights(path: Path, model: nn.Module, max_shard_gb: int = 5, progress=True) -> None:
    """Sharded safetensors + index; each shard is evaluated only as it is written,
    so with lazily loaded sources peak memory stays near one shard."""
    from mlx_lm.utils import make_shards
    from tqdm import tqdm

    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    shards = make_shards(weights, max_file_size_gb=max_shard_gb)
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    del weights
    bar = tqdm(total=len(shards), desc="Saving shards", unit="shard", disable=not progress)
    for i in range(len(shards)):
        shard, shards[i] = shards[i], None
        shard_name = name.format(i + 1, len(shards))
        tmp = path / (shard_name + ".partial.safetensors")
        mx.save_safetensors(str(tmp), shard, metadata={"format": "mlx"})
        tmp.replace(path / shard_name)
        index["weight_map"].update({k: shard_name for k in shard})
        del shard
        bar.update(1)
    bar.close()
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, processor and chat-template files."""
    for pattern in SIDE_FILE_PATTERNS:
        for f in Path(src).glob(pattern):
            if f.name not in NOT_COPIED:
                shutil.copy(f, Path(dst) / f.name)


def save_config(config: dict, path: Path) -> None:
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    (Path(path) / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
