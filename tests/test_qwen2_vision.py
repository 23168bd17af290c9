"""Qwen2-VL vision tower vs transformers on a pack of several images of
different sizes (fp32 max-abs-diff <= 1e-4)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_vlm_native.models.qwen2_vision import VisionConfig, VisionModel
from mlx_vlm_native.packing import pack, patchify

CONFIG = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, hidden_act="quick_gelu",
              rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def towers():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    hf = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    ours = VisionModel(VisionConfig.from_dict(CONFIG))
    weights = {f"visual.{k}": mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}
    ours.load_weights(list(ours.sanitize(weights).items()))
    return hf, ours


def test_pack_of_mixed_images_matches(towers):
    hf, ours = towers
    rng = np.random.default_rng(0)
    sizes = [(12, 20), (26, 8), (2, 2), (4, 6)]  # patch grids
    items = [patchify(rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)) for h, w in sizes]
    items.append(patchify(rng.standard_normal((4, 3, 14 * 6, 14 * 4)).astype(np.float32)))  # a 4-frame video
    p = pack(items)
    with torch.inference_mode():
        out = hf(torch.from_numpy(p.patches), grid_thw=torch.tensor(p.grids))
    merged = np.array(ours(p))
    assert merged.shape == out.pooler_output.shape
    assert np.abs(merged - out.pooler_output.numpy()).max() <= 1e-4
    hidden = np.array(ours(p, merge=False))
    assert np.abs(hidden - out.last_hidden_state.numpy()).max() <= 1e-4


def test_packing_equals_one_image_at_a_time(towers):
    _, ours = towers
    rng = np.random.default_rng(1)
    items = [patchify(rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)) for h, w in [(4, 4), (8, 2)]]
    together = np.array(ours(pack(items)))
    alone = np.concatenate([np.array(ours(pack([it]))) for it in items])
    assert np.abs(together - alone).max() <= 1e-5
