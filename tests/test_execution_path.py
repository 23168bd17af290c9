"""The execution path, chosen once when a model is loaded (`native/execution.py`):
on the CPU the NumPy host ops are installed and recorded; on a GPU (simulated
here by MLX's default device reporting one) and under MLX_VLM_NATIVE_HOST_OPS=0
the model is plain MLX, and then the forward of every family wraps in
`mx.compile` and gives the eager logits."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import make_image
from convert.write_open_clip_release import write_tiny_open_clip
from mlx_vlm_native.models import navit
from mlx_vlm_native.native import cpu_backend, execution
from mlx_vlm_native.native.packing import pack
from mlx_vlm_native.utils import FAMILIES, load, load_model
from test_contract import CHECKPOINTS, write_checkpoint

VLM_CHECKPOINTS = {**CHECKPOINTS, "qwen2_5_vl": ("qwen2_vl", lambda path: write_checkpoint(path, "qwen2.5-vl-tiny"))}
COMPILE_TOL = 1e-4  # compiled vs eager logits, fp32 (compile may fuse elementwise ops)


def host_op_modules(model) -> list:
    return cpu_backend.installed(model)


@pytest.fixture
def simulated_gpu(monkeypatch):
    """MLX's default device reports a GPU (there is none here: only what is
    decided from the device is exercised, nothing is run on it)."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("qwen2_vl"), "qwen2-vl-tiny")


def test_cpu_load_records_host_ops(qwen2_vl_dir, monkeypatch):
    monkeypatch.delenv(execution.HOST_OPS_ENV, raising=False)
    model, _ = load(str(qwen2_vl_dir))
    assert model.execution_path == execution.ExecutionPath("cpu", True, None)
    assert "NumPy host ops" in str(model.execution_path)
    kinds = {type(m) for _, m in model.named_modules()}
    assert {cpu_backend.Linear, cpu_backend.QuickGELU, cpu_backend.PackedAttention} <= kinds


def test_simulated_gpu_load_is_plain_mlx(qwen2_vl_dir, simulated_gpu):
    model, _ = load(str(qwen2_vl_dir))
    assert model.execution_path.device == "gpu" and not model.execution_path.host_ops
    assert str(model.execution_path).startswith("gpu: plain MLX")
    assert host_op_modules(model) == []
    assert type(model.language_model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_host_ops_off_on_the_cpu(qwen2_vl_dir, monkeypatch):
    monkeypatch.setenv(execution.HOST_OPS_ENV, "0")
    model, _ = load(str(qwen2_vl_dir))
    assert model.execution_path == execution.ExecutionPath("cpu", False, None)
    assert host_op_modules(model) == [] and "MLX_VLM_NATIVE_HOST_OPS=0" in str(model.execution_path)
    monkeypatch.setenv(execution.HOST_OPS_ENV, "yes")
    with pytest.raises(ValueError, match="MLX_VLM_NATIVE_HOST_OPS must be 0 or 1"):
        load(str(qwen2_vl_dir))


def forward_of(model, processor):
    """The whole forward of one image prompt: vision, embeddings, logits."""
    inputs = processor(processor.format_prompt("What is here?", 1), images=[make_image(60, 90, 3)])
    ids = mx.array(inputs.input_ids)[None]

    def forward():
        features = model.encode_vision([inputs])[0]
        embeds, positions = model.get_input_embeddings(inputs, features)
        return model(ids, input_embeddings=embeds, positions=positions)

    return forward


def assert_compiles(model, forward):
    eager = forward()
    compiled = mx.compile(forward, inputs=model.state)  # the weights are traced inputs, not constants
    for _ in range(2):  # traced, then the cached graph
        out = compiled()
        assert out.shape == eager.shape
        diff = mx.abs(out - eager).max().item()
        assert diff <= COMPILE_TOL, diff


def test_every_family_is_covered():
    assert {m for m, _ in VLM_CHECKPOINTS.values()} | {"openvision2"} == {f.module for f in FAMILIES}


@pytest.mark.parametrize("name", sorted(VLM_CHECKPOINTS))
def test_plain_forward_compiles_for_every_family(name, tmp_path, simulated_gpu):
    _, writer = VLM_CHECKPOINTS[name]
    model, processor = load(str(writer(tmp_path)))
    assert not model.execution_path.host_ops and host_op_modules(model) == []
    assert_compiles(model, forward_of(model, processor))


def test_openvision2_captioner_compiles(tmp_path, simulated_gpu):
    model, _ = load_model(write_tiny_open_clip(tmp_path / "ov2"))
    assert host_op_modules(model) == []
    pixels = mx.array(np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32))
    text = mx.array([[1, 5, 7, 2], [1, 4, 2, 0]])
    assert_compiles(model, lambda: model(pixels, text, keep_ratio=1.0))


def test_navit_compiles(simulated_gpu):
    mx.random.seed(0)
    model = navit.Model(navit.ModelArgs(num_classes=3, hidden_size=32, num_layers=2, num_heads=2, patch_size=8))
    assert execution.apply(model).device == "gpu" and host_op_modules(model) == []
    images = [make_image(h, w, i) for i, (h, w) in enumerate([(32, 48), (24, 24), (40, 16)])]
    p = pack([navit.image_tokens(im, 8) for im in images], merge=1)
    assert_compiles(model, lambda: model(p))


def test_host_ops_keep_a_model_out_of_compile(qwen2_vl_dir, monkeypatch):
    """What the tests above rule out: the CPU path evaluates inside its forward."""
    monkeypatch.delenv(execution.HOST_OPS_ENV, raising=False)
    model, processor = load(str(qwen2_vl_dir))
    assert model.execution_path.host_ops
    forward = forward_of(model, processor)
    with pytest.raises(ValueError, match="eval"):
        mx.compile(forward, inputs=model.state)()


def test_host_ops_and_plain_paths_agree(qwen2_vl_dir, monkeypatch):
    monkeypatch.delenv(execution.HOST_OPS_ENV, raising=False)
    host, processor = load(str(qwen2_vl_dir))
    monkeypatch.setenv(execution.HOST_OPS_ENV, "0")
    plain, _ = load(str(qwen2_vl_dir))
    diff = mx.abs(forward_of(host, processor)() - forward_of(plain, processor)()).max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_compiled_rotary_equals_the_formula_for_every_shape(dtype):
    """`apply_rotary`'s shapeless compiled kernel (traced once) against the
    uncompiled rotate-half formula, over the shapes the towers and M-RoPE give it:
    (N, H, D) with (N, 1, D) tables, (B, H, L, D) with (L, D) or (B, 1, L, D),
    several head dims in one process. Within 1e-6 relative in fp32 (a fused
    multiply-add may round once less), one rounding in bf16."""
    from mlx_vlm_native.models.base import apply_rotary

    rng = np.random.default_rng(0)
    shapes = [((6, 2, 8), (6, 1, 8)), ((2, 4, 5, 16), (5, 16)), ((2, 4, 5, 16), (2, 1, 5, 16)),
              ((1, 3, 9, 64), (9, 64)), ((40, 12, 80), (40, 1, 80)), ((6, 2, 8), (6, 1, 8))]
    for x_shape, table_shape in shapes:
        x = mx.array(rng.standard_normal(x_shape).astype(np.float32)).astype(dtype)
        angles = mx.array(rng.uniform(-4, 4, table_shape).astype(np.float32))
        cos, sin = mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)
        half = x_shape[-1] // 2
        expected = x * cos + mx.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin
        got = apply_rotary(x, cos, sin)
        assert got.shape == expected.shape and got.dtype == dtype
        tol = (1e-6 if dtype == mx.float32 else 2 ** -7) * float(mx.abs(expected.astype(mx.float32)).max())
        diff = float(mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max())
        assert diff <= tol, (x_shape, table_shape, diff)
