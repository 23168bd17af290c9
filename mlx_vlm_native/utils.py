"""Loading and saving models: local folders or Hub ids, HF or MLX layout."""

import fnmatch
import importlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer, make_shards
from tqdm import tqdm

from .models import openvision_checkpoint
from .weights.validation import check_config
from .adapters import load_adapters
from .models.base import check_weights
from .native import execution
from .weights.files import check_safetensors, read_json_file, read_weight_file, weight_files


@dataclass(frozen=True)
class Family:
    """How a checkpoint names one model family (`models/<module>.py`)."""

    module: str
    model_types: Tuple[str, ...]  # config.json `model_type` spellings
    architectures: Tuple[str, ...] = ()  # `architectures` / `auto_map` class names
    weight_prefixes: Tuple[str, ...] = ()  # keys only this family's checkpoints have
    model_module: str = ""  # `models/<model_module>.py` where it is not `models/<module>.py`


# The one registry of families: every loader, converter and processor looks here.
FAMILIES = (
    Family("llava_onevision", ("llava_onevision", "llava-onevision"),
           ("LlavaOnevisionForConditionalGeneration",), ("image_newline", "model.image_newline")),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"),
           ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
           ("visual.patch_embed.", "model.visual.patch_embed.", "vision_tower.patch_embed.")),
    Family("points_v15", ("pointsv1.5_chat",), ("POINTSV15ChatModel",), ("vision_projector.",)),
    Family("eve", ("eve",), ("EVELlamaForCausalLM",)),
    Family("eve_v2", ("eve-qwen2",), ("EVEQwen2ForCausalLM",)),
    Family("openvision_llava", ("openvision_llava",)),
    Family("openvision2", ("openvision2",), model_module="openvision"),  # also released open_clip folders
)

OPEN_CLIP_CONFIG = "open_clip_config.json"  # released OpenVision folders
MLX_LM_WEIGHT_FILES = "model*.safetensors"  # the files `mlx_lm.utils.load_model` reads itself
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
TORCH_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin"]
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


def hub_patterns(repo_files) -> list:
    """The files a Hub-id load fetches: safetensors when the repo has them, else
    its torch `.bin` shards (EVE v1, open_clip); never code (`*.py`)."""
    names = [f.rsplit("/", 1)[-1] for f in repo_files]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    weights = SAFETENSORS_PATTERNS if has_safetensors else TORCH_BIN_PATTERNS
    if has_safetensors and not any(n.startswith("open_clip_") and n.endswith(".safetensors") for n in names):
        weights = weights + ["open_clip_pytorch_model.bin"]  # OpenVision: decoder in safetensors, tower in .bin
    return weights + SIDE_FILE_PATTERNS


def get_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise the Hub repo's weights and side files."""
    path = Path(path_or_repo)
    if path.exists():
        if not any((path / f).exists() for f in ("config.json", OPEN_CLIP_CONFIG)):
            raise FileNotFoundError(f"{path} has no config.json or {OPEN_CLIP_CONFIG}: not a model folder")
        return path
    try:
        patterns = hub_patterns(huggingface_hub.list_repo_files(path_or_repo, revision=revision))
    except Exception:  # offline (HF_HUB_OFFLINE): the cached snapshot, whichever weights it holds
        patterns = SAFETENSORS_PATTERNS + TORCH_BIN_PATTERNS + SIDE_FILE_PATTERNS
    try:
        return Path(huggingface_hub.snapshot_download(path_or_repo, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{path_or_repo!r} is neither a local folder nor a reachable Hub repo: {e}"
        ) from e


def load_config(path: Path) -> dict:
    """config.json; a released open_clip folder (OpenVision) has none."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / OPEN_CLIP_CONFIG).exists():
        return {"model_type": "openvision2"}
    config = read_json_file(path / "config.json")
    check_config(config, str(path / "config.json"))
    return config


def _class_names(config: dict) -> set:
    names = set(config.get("architectures") or [])
    names.update(str(v).rsplit(".", 1)[-1] for v in (config.get("auto_map") or {}).values())
    return names


def detect_family(config: dict, weight_keys=()) -> Family:
    """The family of a checkpoint from its `model_type`, else its
    `architectures`/`auto_map` class names (POINTS1.5 has no model_type),
    else the names of its weights."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = _class_names(config)
    for family in FAMILIES:
        if names & set(family.architectures):
            return family
    for family in FAMILIES:
        if family.weight_prefixes and any(k.startswith(family.weight_prefixes) for k in weight_keys):
            return family
    raise ValueError(
        f"model_type {model_type!r} is not supported (architectures/auto_map: "
        f"{sorted(names) or 'none'}; no weight names of a known family); "
        f"supported: {', '.join(t for f in FAMILIES for t in f.model_types)}"
    )


def family_of(model_type: str) -> Family:
    return detect_family({"model_type": model_type})


def load_weights(path: Path) -> dict:
    """All tensors of a checkpoint folder: safetensors (lazy) or torch pickles (safe)."""
    weights = {}
    for f in weight_files(path):
        weights.update(read_weight_file(f))
    return weights


def load_model(path: Path, lazy: bool = False, strict: bool = True) -> Tuple[nn.Module, dict]:
    """The model of a folder and its config. Its execution path is chosen here,
    once, for MLX's default device (`native.execution.apply`: NumPy host ops on
    the CPU, plain MLX on a GPU) and recorded as `model.execution_path`."""
    path = Path(path)
    config = load_config(path)
    if (path / "config.json").exists():
        model, config = load_with_mlx_lm(path, config, lazy, strict)
    else:  # a released open_clip folder (OpenVision): mlx-lm's loader needs a config.json
        model = openvision_checkpoint.load(path)
        config = openvision_checkpoint.config_dict(model.args)
    execution.apply(model)
    model.eval()
    return model, config


def load_with_mlx_lm(path: Path, config: dict, lazy: bool = False, strict: bool = True) -> Tuple[nn.Module, dict]:
    """`mlx_lm.utils.load_model` with the folder's family: mlx-lm reads
    `model*.safetensors`, the quantization metadata (`quantization`,
    `quantization_config`, `hf_quant_config.json`) and quantizes as the
    checkpoint is stored. Before it, every safetensors header is checked and
    the weights it does not read (torch pickles, other safetensors names) are
    read here; `loading_classes` adds them and the named-key check."""
    files = weight_files(path)
    read_by_mlx_lm = [f for f in files if fnmatch.fnmatch(f.name, MLX_LM_WEIGHT_FILES)]
    names = [name for f in read_by_mlx_lm for name in check_safetensors(f)]
    others = {}
    for f in files:
        if f not in read_by_mlx_lm:
            others.update(read_weight_file(f))
    check_quantization_metadata(path, config)
    family = detect_family(config, names + list(others))
    config.setdefault("model_type", family.model_types[0])
    arch = importlib.import_module(f"mlx_vlm_native.models.{family.model_module or family.module}")
    # mlx-lm's strict also demands model*.safetensors files; the weights are checked in `loading_classes`
    model, config = mlx_lm_load_model(path, lazy=lazy, strict=False, model_config=config,
                                      get_model_classes=loading_classes(arch, others, strict))
    model.__class__ = arch.Model  # the loading steps belonged to this load only
    return model, config


def check_quantization_metadata(path: Path, config: dict) -> None:
    """Without a `quantization` entry, mlx-lm takes the quantization from
    `quantization_config` (config.json's, its text_config's, or
    `hf_quant_config.json`) and needs its `quant_method`: name the file and
    the key rather than let a bare KeyError out."""
    if config.get("quantization") is not None:
        return
    where = path / "config.json"
    found = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not found and (path / "hf_quant_config.json").exists():
        where = path / "hf_quant_config.json"
        found = read_json_file(where)
    if found and (not isinstance(found, dict) or "quant_method" not in found):
        keys = ", ".join(sorted(found)) if isinstance(found, dict) else type(found).__name__
        raise ValueError(f"{where}: the quantization metadata has no 'quant_method', which says how the "
                         f"weights are quantized (it has: {keys})")


def loading_classes(arch, others: dict, checked: bool) -> Callable[..., tuple]:
    """mlx-lm's `get_model_classes` hook: the family's Model, whose `sanitize`
    first adds `others` (the weights mlx-lm did not read) and maps every
    release layout, and whose `load_weights`, called after mlx-lm quantized
    the model, first names the missing, unexpected or mis-shaped keys and the
    layouts the family knows (when `checked`)."""

    class Loading(arch.Model):
        def sanitize(self, weights: dict) -> dict:
            return super().sanitize({**others, **weights})

        def load_weights(self, weights, strict=False):  # mlx-lm's strict, always False here
            if checked:
                check_weights(self, dict(weights), getattr(self, "layouts", ()))
            return super().load_weights(weights, strict=checked)

    return lambda config: (Loading, arch.ModelArgs)


def load_processor(path: Path, model):
    """`processors/<family>.py` provides `Processor.from_pretrained(path, tokenizer, args)`."""
    family = family_of(model.model_type)
    module = importlib.import_module(f"mlx_vlm_native.processors.{family.module}")
    if family.module == "openvision2":  # a caption tokenizer (tokenizer.json or a BERT vocab), not a chat one
        return module.Processor.from_pretrained(path, openvision_checkpoint.load_tokenizer(path), model.args)
    # transformers reads config.json on the way and warns that it does not know
    # our model types (openvision_llava, eve, ...): true, and not the tokenizer's business
    config_log = logging.getLogger("transformers.configuration_utils")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        # never run (or ask to run) a checkpoint's own code: POINTS1.5 has an auto_map
        tokenizer = load_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False})
    finally:
        config_log.setLevel(level)
    return module.Processor.from_pretrained(path, tokenizer, model.args)


def load(
    path_or_repo: Optional[str] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
):
    """Load a model folder or Hub id -> (model, processor): released Hub and
    transformers-5 layouts, mlx-vlm / mlx-community folders (plain or
    quantized, mixed included) and this project's; without one, the embedded
    default model."""
    if path_or_repo is None:
        path_or_repo = default_model_path()
    path = get_model_path(path_or_repo, revision)
    model, _ = load_model(path, lazy=lazy)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
        model.eval()
    return model, load_processor(path, model)


def save_weights(path: Path, model, max_shard_gb: int = 5, progress=True) -> None:
    """Sharded safetensors + index of a model's parameters (or a dict of
    weights); each shard is evaluated only as it is written, so with lazily
    loaded sources peak memory stays near one shard."""
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters())) if isinstance(model, nn.Module) else dict(model)
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
