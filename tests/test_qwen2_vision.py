"""Qwen2-VL vision tower vs transformers on a pack of several images of
different sizes (fp32 max-abs-diff <= 1e-4)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_vlm_native.models.qwen2_vision import VisionConfig, VisionModel
from mlx_vlm_native.native.packing import pack, patchify

CONFIG = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, hidden_act="quick_gelu",
              rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})


def rerandomize(hf):
    """Fan-in-scaled weights, norms near 1, non-zero biases: layout bugs show."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = "norm" in name or "ln_q" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def towers():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    hf = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**CONFIG)).eval()
    rerandomize(hf)
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


CONFIG_25 = dict(depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                 hidden_act="silu", window_size=112, fullatt_block_indexes=[1, 3],
                 rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})


def test_window_index_matches_transformers():
    from transformers.vision_utils import get_vision_window_index

    from mlx_vlm_native.models.qwen2_vision import window_index

    grids = [(1, 12, 20), (1, 26, 8), (2, 12, 18)]
    ref_order, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    order, cu = window_index(grids, 2, 112, 14)
    assert order.tolist() == ref_order.tolist()
    assert cu.tolist() == ref_cu.tolist()
    assert window_index([(1, 12, 20), (1, 26, 8)], 2, 112, 14)[1].tolist() == [
        0, 64, 128, 160, 192, 224, 240, 304, 368, 432, 448]


def test_qwen2_5_tower_pack_matches():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    hf = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**CONFIG_25)).eval()
    rerandomize(hf)
    ours = VisionModel(VisionConfig.from_dict(CONFIG_25))
    ours.load_weights(list(ours.sanitize({k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}).items()))
    rng = np.random.default_rng(0)
    items = [patchify(rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)) for h, w in [(12, 20), (26, 8)]]
    items.append(patchify(rng.standard_normal((4, 3, 14 * 12, 14 * 18)).astype(np.float32)))
    p = pack(items)
    with torch.inference_mode():
        out = hf(torch.from_numpy(p.patches), grid_thw=torch.tensor(p.grids))
    assert np.abs(np.array(ours(p)) - out.pooler_output.numpy()).max() <= 1e-4
