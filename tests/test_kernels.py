"""Native-kernel plumbing on the CPU: the custom vjp against autodiff, dispatch
(auto / forced / environment), errors that name the kernel, the shipped sources,
and the selftest command. The kernels themselves: test_kernels_metal.py and
test_kernels_cuda.py."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import SEGMENT_MIXES, pack
from mlx_vlm_native import native, packed_attention as pa
from mlx_vlm_native.models import qwen2_vision
from mlx_vlm_native.native import attention, kernels_source, rope


def dense_lse(q, k, cu, scale):
    seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    mask = mx.array(seg[:, None] == seg[None, :])
    s = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * scale
    return mx.logsumexp(mx.where(mask, s, -mx.inf), axis=-1).T


@pytest.mark.parametrize("lengths", SEGMENT_MIXES)
def test_custom_vjp_matches_autodiff_of_dense_reference(lengths):
    cu, (q, k, v, w) = pack(lengths, 2, 64)
    w_lse = mx.random.normal(q.shape[:2])

    def ours(q, k, v):
        out, lse = native.varlen_attention(q, k, v, cu, backend="reference", return_lse=True)
        return (out * w).sum() + (lse * w_lse).sum()

    def dense(q, k, v):
        out = pa.dense_attention(q, k, v, cu, 64**-0.5)
        return (out * w).sum() + (dense_lse(q, k, cu, 64**-0.5) * w_lse).sum()

    for a, b in zip(mx.grad(ours, (0, 1, 2))(q, k, v), mx.grad(dense, (0, 1, 2))(q, k, v)):
        assert mx.abs(a - b).max().item() <= 1e-5


def test_kernel_path_forward_matches_dense():
    cu, (q, k, v) = pack([1, 5, 17, 33], 2, 80, n=3)
    out = pa.packed_attention(q, k, v, cu, path="kernel")
    assert mx.abs(out - pa.packed_attention(q, k, v, cu, path="dense")).max().item() <= 1e-5


def test_rope_vjp_matches_autodiff():
    mx.random.seed(3)
    q, k = mx.random.normal((6, 2, 16)), mx.random.normal((6, 3, 16))
    cos, sin = mx.random.normal((6, 16)), mx.random.normal((6, 16))
    wq, wk = mx.random.normal(q.shape), mx.random.normal(k.shape)

    def ours(q, k, cos, sin):
        qr, kr = native.rope_2d(q, k, cos, sin, backend="reference")
        return (qr * wq).sum() + (kr * wk).sum()

    def plain(q, k, cos, sin):
        ref = qwen2_vision.apply_rope
        return (ref(q, cos, sin) * wq).sum() + (ref(k, cos, sin) * wk).sum()

    for a, b in zip(mx.grad(ours, (0, 1, 2, 3))(q, k, cos, sin), mx.grad(plain, (0, 1, 2, 3))(q, k, cos, sin)):
        assert mx.abs(a - b).max().item() <= 1e-5
    single, none = native.rope_2d(q, None, cos, sin, backend="reference")
    assert none is None and mx.abs(single - qwen2_vision.apply_rope(q, cos, sin)).max().item() <= 1e-6


def test_auto_dispatch(monkeypatch):
    cu, (q, k, v) = pack([3, 4], 1, 64, n=3)
    calls = []
    monkeypatch.setattr(native, "varlen_attention", lambda *a, **kw: calls.append(kw["backend"]) or a[0])
    pa.packed_attention(q, k, v, cu)
    assert calls == []  # no GPU here: the segmented reference
    monkeypatch.setattr(native, "gpu_backend", lambda: "metal")
    pa.packed_attention(q, k, v, cu)
    assert calls == ["metal"]
    cu5, (q5, k5, v5) = pack([3, 4], 1, 60, n=3)  # head dim the kernels lack: reference
    pa.packed_attention(q5, k5, v5, cu5)
    monkeypatch.setenv("MLX_VLM_NATIVE_ATTENTION", "segmented")  # forced reference for debugging
    pa.packed_attention(q, k, v, cu)
    assert calls == ["metal"]


def test_environment_disables_kernels(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert native.gpu_backend() == "metal"
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "0")
    assert native.gpu_backend() is None


def test_rotate_qk_uses_one_kernel_launch_on_a_gpu(monkeypatch):
    q, k, cos, sin = mx.ones((2, 1, 8)), mx.ones((2, 1, 8)) * 2, mx.ones((2, 8)), mx.zeros((2, 8))
    reference = qwen2_vision.rotate_qk(q, k, cos, sin)
    assert mx.array_equal(reference[0], q) and mx.array_equal(reference[1], k)  # zero angles
    calls = []
    monkeypatch.setattr(native, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(native, "rope_2d", lambda q, k, c, s: calls.append((q, k)) or ("q kernel", "k kernel"))
    assert qwen2_vision.rotate_qk(q, k, cos, sin) == ("q kernel", "k kernel")
    assert len(calls) == 1 and calls[0][1] is k


def test_kernel_failure_names_the_kernel():
    cu, (q, k, v) = pack([3, 4], 1, 64, n=3)
    with pytest.raises(RuntimeError, match="varlen_attention_fwd"):
        mx.eval(native.varlen_attention(q, k, v, cu, backend="metal"))
    with pytest.raises(RuntimeError, match="rope_2d"):
        mx.eval(native.rope_2d(q, k, mx.ones((7, 64)), mx.ones((7, 64)), backend="metal"))


def test_bad_inputs_are_named():
    cu, (q, k, v) = pack([3, 4], 1, 64, n=3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        native.varlen_attention(q, k, v, [0, 3, 6])
    with pytest.raises(ValueError, match="shape"):
        native.varlen_attention(q, k[:5], v, cu)
    with pytest.raises(ValueError, match="head dims"):
        native.varlen_attention(q[..., :60], k[..., :60], v[..., :60], cu, backend="metal")
    with pytest.raises(ValueError, match="backend"):
        native.varlen_attention(q, k, v, cu, backend="vulkan")
    with pytest.raises(ValueError, match="cos/sin"):
        native.rope_2d(q, None, mx.ones((7, 32)), mx.ones((7, 32)))


def test_work_items_cover_each_segment_once():
    cu = np.array([0, 1, 40, 104])
    items = np.array(attention.work_items(cu, 32)).reshape(-1, 2)
    assert items.tolist() == [[0, 0], [1, 1], [1, 33], [2, 40], [2, 72]]


def test_kernel_sources_ship_with_the_package():
    names = {"attention_common", "varlen_attention_fwd", "varlen_attention_bwd_dkdv", "varlen_attention_bwd_dq", "rope_2d"}
    for ext in (".metal", ".cu"):
        for name in names:
            assert kernels_source.read_source(name + ext).strip()
    with pytest.raises(FileNotFoundError, match="missing.metal"):
        kernels_source.read_source("missing.metal")
    assert kernels_source.KERNEL_DIR.parent.name == "native"


def test_rope_launch_shapes():
    q, k = mx.zeros((5, 3, 80), mx.float16), mx.zeros((5, 2, 80), mx.float16)
    launch = rope.rope_launch("metal", q, k, mx.zeros((5, 80)), mx.zeros((5, 80)), False)
    assert launch.grid == (40, 5, 5) and launch.output_shapes == [q.shape, k.shape]
    assert ("BACKWARD", False) in launch.template


def test_selftest_runs_without_a_gpu(capsys):
    from mlx_vlm_native import selftest

    assert selftest.main(["--quick", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "No GPU kernel was run" in out and "MISMATCH" not in out


def test_selftest_fails_on_a_mismatch(monkeypatch, capsys):
    from mlx_vlm_native import selftest

    real = native.varlen_attention
    monkeypatch.setattr(native, "varlen_attention", lambda q, k, v, cu, *a, **kw: real(q, k, v, cu, 0.9, **kw))
    assert selftest.main(["--quick", "--no-timing"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_selftest_timing_table(capsys):
    from mlx_vlm_native import selftest

    rows = selftest.timing_rows("reference", [1, 8], heads=1, head_dim=64, dtype=mx.float32, runs=1, dense_limit=2048)
    selftest.print_timings(rows, "kernel path")
    out = capsys.readouterr().out
    assert "| 1 | 1024 |" in out and out.count("\n|") == 4
    assert rows[1]["dense-mask SDPA"] == (None, None)  # 8 images exceed the dense limit here


def test_grad_of_a_packing_encoder_goes_through_the_kernel_backward(monkeypatch):
    """mx.grad of the Qwen2-VL tower with the kernel path: the custom vjp runs once
    per block and the gradients equal those of the dense-mask path."""
    import mlx.nn as nn

    from mlx_vlm_native.models.qwen2_vision import VisionConfig, VisionModel
    from mlx_vlm_native.packing import pack as pack_images, patchify

    config = VisionConfig.from_dict(dict(depth=2, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=2))
    mx.random.seed(0)
    model = VisionModel(config)
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32) for h, w in [(4, 6), (2, 2), (6, 2)]]
    p = pack_images([patchify(x) for x in images])
    weight = mx.random.normal(model(p).shape)
    backward_calls = []
    real_backward = attention.attention_backward
    monkeypatch.setattr(attention, "attention_backward", lambda *a: backward_calls.append(a[0]) or real_backward(*a))

    def grads(path):
        monkeypatch.setenv("MLX_VLM_NATIVE_ATTENTION", path)
        loss, g = nn.value_and_grad(model, lambda m: (m(p) * weight).sum())(model)
        mx.eval(loss, g)
        return loss, dict(nn.utils.tree_flatten(g))

    loss_k, g_k = grads("kernel")
    assert backward_calls == ["reference"] * config.depth
    loss_d, g_d = grads("dense")
    assert abs(loss_k.item() - loss_d.item()) <= 1e-4
    worst = max(mx.abs(g_k[n] - g_d[n]).max().item() for n in g_d)
    assert worst <= 1e-5, worst  # measured 2.4e-6


def test_selftest_is_a_cli_command():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mlx_vlm_native", "selftest", "--quick", "--no-timing"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checks passed" in r.stdout


needs_gpu = pytest.mark.skipif(native.gpu_backend() is None, reason="no Metal or CUDA backend: the kernels run in "
                               "test_kernels_metal.py / test_kernels_cuda.py on the CPU emulator instead")


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_gpu_kernels_match_reference(dtype):
    backend = native.gpu_backend()
    tol = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 5e-2}[dtype]
    for head_dim, lengths in itertools.product(native.SUPPORTED_HEAD_DIMS, SEGMENT_MIXES):
        cu, (q, k, v, w) = pack(lengths, 2, head_dim, dtype)
        out = native.varlen_attention(q, k, v, cu, backend=backend)
        ref = native.varlen_attention(q, k, v, cu, backend="reference")
        assert mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item() <= tol
        if dtype == mx.float32:
            def loss(b):
                return lambda q, k, v: (native.varlen_attention(q, k, v, cu, backend=b) * w).sum()

            for a, b in zip(mx.grad(loss(backend), (0, 1, 2))(q, k, v), mx.grad(loss("reference"), (0, 1, 2))(q, k, v)):
                assert mx.abs(a - b).max().item() <= tol
        cos, sin = mx.cos(q[:, 0].astype(mx.float32)), mx.sin(q[:, 0].astype(mx.float32))
        for got, want in zip(native.rope_2d(q, k, cos, sin, backend=backend), native.rope_2d(q, k, cos, sin, backend="reference")):
            assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= tol
