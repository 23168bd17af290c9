import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True, scope="session")
def kernel_verdict_cache(tmp_path_factory):
    """Kernel verdicts (native/validation.py) of a test run, subprocesses included,
    go to a temporary folder, never the user's cache."""
    os.environ["MLX_VLM_NATIVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel_verdicts"))


def make_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resampling differences show, unlike flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    noisy = base + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture
def vision_calls(monkeypatch):
    """The number of packed images in each call of the NaViT tower, as a list."""
    from mlx_vlm_native.models.qwen2_vision import VisionModel

    calls = []
    original = VisionModel.__call__

    def counting(self, pack, *args, **kwargs):
        calls.append(len(pack.grids))
        return original(self, pack, *args, **kwargs)

    monkeypatch.setattr(VisionModel, "__call__", counting)
    return calls


@pytest.fixture(scope="session")
def tiny_56_dir(tmp_path_factory):
    """A tiny random LLaVA-OneVision release folder with 56-px crops (short prompts),
    written once for the session; tests only read it."""
    from convert.write_hf_release import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_56"), "tiny-56")


@pytest.fixture(scope="module")
def tiny_56_model(tiny_56_dir):
    """(model, processor) of `tiny_56_dir`, loaded once per test module."""
    from mlx_vlm_native import load

    return load(str(tiny_56_dir))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random LLaVA-OneVision checkpoint as transformers itself writes it."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from convert.write_hf_release import write_checkpoint

    torch.set_num_threads(1)
    ours = write_checkpoint(tmp_path_factory.mktemp("tiny_ours"))
    hf_dir = tmp_path_factory.mktemp("tiny_hf")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ours, dtype=torch.float32)
    model.save_pretrained(hf_dir)
    for f in ours.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (hf_dir / f.name).write_bytes(f.read_bytes())
    return hf_dir


@pytest.fixture(scope="session")
def hf_model(tiny_hf_dir):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.set_num_threads(1)
    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_hf_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def mlx_model(tiny_hf_dir):
    from mlx_vlm_native import load

    return load(str(tiny_hf_dir))
