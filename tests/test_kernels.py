"""Native-kernel plumbing on the CPU: the custom vjp against autodiff, dispatch
(auto / forced / environment), errors that name the kernel, the shipped sources,
and the selftest command. The kernels themselves: test_kernels_metal.py and
test_kernels_cuda.py."""

import itertools
import json
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import SEGMENT_MIXES, pack
from mlx_vlm_native import native
from mlx_vlm_native.native import packed_attention as pa
from mlx_vlm_native.models import qwen2_vision
from mlx_vlm_native.native import attention, kernels_source, rope, validation
from mlx_vlm_native.native import backend as native_backend


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


class SimulatedKernels:
    """A simulated GPU backend: MLX's default device reports a GPU of `backend`,
    and each kernel launch runs the pure-MLX reference of the same kernel, fails
    to build ("fail") or returns wrong numbers ("wrong"). Launches are counted
    by kernel name."""

    def __init__(self, monkeypatch, backend="metal", behaviour="ok"):
        self.behaviour, self.launches = behaviour, []
        monkeypatch.setattr(native_backend, "runs_on_gpu", lambda: True)
        monkeypatch.setattr(native_backend, "available_backend", lambda: backend)
        monkeypatch.setattr(kernels_source, "build_kernel", self.build)

    def build(self, spec):
        if self.behaviour == "fail":
            raise RuntimeError(f"Unable to build {spec.language} library (simulated)")
        return lambda **launch: self.launch(spec.name, **launch)

    def launch(self, name, inputs, template, output_shapes, **_):
        self.launches.append(name)
        template = dict(template)
        if name.startswith("varlen_attention"):
            q, k, v, cu, scale = inputs[0], inputs[1], inputs[2], np.array(inputs[-3]), inputs[-1]
            if name.startswith("varlen_attention_fwd"):
                outs = attention.reference_forward(q, k, v, cu, scale)
            else:
                dq, dk, dv = attention.reference_backward(q, k, v, *inputs[3:6], cu, scale)
                outs = (dk, dv) if name.endswith("dkdv") else (dq,)
        else:  # rope_2d: k is q again when there is none
            q, k, cos, sin = inputs
            outs = (rope.reference_rope(q, cos, sin, template["BACKWARD"]),
                    rope.reference_rope(k, cos, sin, template["BACKWARD"]) if template["HK"] else mx.zeros((1,), q.dtype))
        outs = list(outs)
        return [o * 1.5 + 0.25 for o in outs] if self.behaviour == "wrong" else outs


@pytest.fixture(autouse=True)
def fresh_verdicts(tmp_path, monkeypatch):
    """Each test its own verdict cache and a process that has checked nothing."""
    monkeypatch.setenv("MLX_VLM_NATIVE_CACHE_DIR", str(tmp_path / "verdicts"))
    monkeypatch.delenv("MLX_VLM_NATIVE_KERNELS", raising=False)
    monkeypatch.delenv("MLX_VLM_NATIVE_ATTENTION", raising=False)
    validation.forget_session()
    yield
    validation.forget_session()


def test_auto_dispatch_without_a_gpu(monkeypatch):
    monkeypatch.setattr(native_backend, "runs_on_gpu", lambda: False)  # whatever this machine has
    cu, (q, k, v) = pack([3, 4], 1, 64, n=3)
    calls = []
    monkeypatch.setattr(native, "varlen_attention", lambda *a, **kw: calls.append(kw["backend"]) or a[0])
    pa.packed_attention(q, k, v, cu)
    assert calls == []  # the segmented path
    assert not validation.cache_file().exists()  # nothing to validate


def test_auto_dispatch_on_a_simulated_gpu_uses_validated_kernels(monkeypatch):
    gpu = SimulatedKernels(monkeypatch)
    cu, (q, k, v) = pack([3, 4, 17], 2, 64, n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that passes warns nothing
        out = pa.packed_attention(q, k, v, cu)
    assert mx.abs(out - pa.packed_attention(q, k, v, cu, path="dense")).max().item() <= 1e-5
    checks = len(gpu.launches)
    assert checks >= 3 and gpu.launches[-1] == "varlen_attention_fwd"  # checked (fwd + bwd), then used
    pa.packed_attention(q, k, v, cu)
    assert len(gpu.launches) == checks + 1  # checked once per process
    cached = validation.cached_verdicts("metal")
    assert list(cached) == ["varlen_attention metal float32 D=64"] and cached["varlen_attention metal float32 D=64"].ok
    validation.forget_session()  # a new process reads the verdict: no check again
    pa.packed_attention(q, k, v, cu)
    assert len(gpu.launches) == checks + 2
    q60, k60, v60 = (x[..., :60] for x in (q, k, v))  # a head dim the kernels lack: the MLX path, no check
    pa.packed_attention(q60, k60, v60, cu)
    assert len(gpu.launches) == checks + 2
    monkeypatch.setenv("MLX_VLM_NATIVE_ATTENTION", "segmented")  # forced path for debugging
    pa.packed_attention(q, k, v, cu)
    assert len(gpu.launches) == checks + 2


@pytest.mark.parametrize("behaviour,reason", [("fail", "failed to compile or run: RuntimeError: native kernel "
                                                         "'varlen_attention_fwd' failed: Unable to build metal"),
                                              ("wrong", "disagrees with the MLX reference")])
def test_a_failing_kernel_is_not_used(monkeypatch, behaviour, reason):
    """The answer is the MLX path's, one warning names the kernel and the reason,
    the cache records it, and later calls (and processes) launch nothing."""
    gpu = SimulatedKernels(monkeypatch, behaviour=behaviour)
    cu, (q, k, v) = pack([1, 5, 17], 2, 80, n=3)
    reference = pa.packed_attention(q, k, v, cu, path="dense")
    with pytest.warns(validation.KernelWarning) as caught:
        out = pa.packed_attention(q, k, v, cu)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "varlen_attention metal float32 D=80" in message and reason in message and "MLX path" in message
    assert mx.abs(out - reference).max().item() <= 1e-5
    launched = len(gpu.launches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same process: no second warning
        assert mx.abs(pa.packed_attention(q, k, v, cu) - reference).max().item() <= 1e-5
    assert len(gpu.launches) == launched  # never launched again
    verdict = validation.cached_verdicts("metal")["varlen_attention metal float32 D=80"]
    assert not verdict.ok and reason in verdict.reason
    assert reason in validation.cache_file().read_text()
    validation.forget_session()  # a later process: the cached verdict, one warning, no launch
    with pytest.warns(validation.KernelWarning, match="D=80"):
        pa.packed_attention(q, k, v, cu)
    assert len(gpu.launches) == launched


def test_kernel_modes_force_and_recheck(monkeypatch):
    gpu = SimulatedKernels(monkeypatch, behaviour="wrong")
    cu, (q, k, v) = pack([3, 4], 1, 64, n=3)
    with pytest.warns(validation.KernelWarning):
        pa.packed_attention(q, k, v, cu)
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "0")  # the MLX path, nothing checked
    n = len(gpu.launches)
    pa.packed_attention(q, k, v, cu)
    assert len(gpu.launches) == n and native.gpu_backend() is None
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "1")  # the kernels, unchecked: the wrong numbers come through
    out = pa.packed_attention(q, k, v, cu)
    assert gpu.launches[n:] == ["varlen_attention_fwd"]
    assert mx.abs(out - pa.packed_attention(q, k, v, cu, path="dense")).max().item() > 0.1
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "check")  # checked again though the cache says no
    gpu.behaviour = "ok"
    validation.forget_session()
    pa.packed_attention(q, k, v, cu)
    assert validation.cached_verdicts("metal")["varlen_attention metal float32 D=64"].ok
    assert gpu.launches[-1] == "varlen_attention_fwd"
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "yes")
    with pytest.raises(ValueError, match="MLX_VLM_NATIVE_KERNELS must be one of auto, 0, 1, check"):
        native.gpu_backend()


def test_a_first_need_inside_grad_or_compile_is_validated(monkeypatch):
    """Training's first step (inside mx.grad) or a compiled forward may be where a
    variant is first needed: the check runs on its own arrays there too."""
    gpu = SimulatedKernels(monkeypatch)
    cu, (q, k, v) = pack([3, 4, 17], 2, 64, n=3)
    g = mx.grad(lambda q: pa.packed_attention(q, k, v, cu).sum())(q)
    ref = mx.grad(lambda q: pa.packed_attention(q, k, v, cu, path="dense").sum())(q)
    assert mx.abs(g - ref).max().item() <= 1e-5 and validation.cached_verdicts("metal")
    assert gpu.launches[-3:] == ["varlen_attention_fwd", "varlen_attention_bwd_dkdv", "varlen_attention_bwd_dq"]
    validation.forget_session()
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "check")
    out = mx.compile(lambda q: pa.packed_attention(q, k, v, cu))(q)
    assert mx.abs(out - pa.packed_attention(q, k, v, cu, path="dense")).max().item() <= 1e-5


def test_verdicts_are_kept_per_device_mlx_version_and_source(monkeypatch):
    SimulatedKernels(monkeypatch)
    cu, (q, k, v) = pack([3, 4], 1, 64, n=3)
    pa.packed_attention(q, k, v, cu)
    data = json.loads(validation.cache_file().read_text())
    (context,) = data
    assert context.startswith("metal: ") and f"mlx {mx.__version__}" in context
    assert context.endswith(f"kernels {validation.source_hash()}")
    monkeypatch.setattr(validation, "source_hash", lambda: "edited")  # an edited kernel is checked again
    validation.forget_session()
    pa.packed_attention(q, k, v, cu)
    assert len(json.loads(validation.cache_file().read_text())) == 2


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_VLM_NATIVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert validation.cache_file() == tmp_path / "mlx-vlm-native" / "kernel-verdicts.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(validation.cache_dir()).startswith(str(Path.home()))


def test_environment_disables_kernels(monkeypatch):
    monkeypatch.setattr(native_backend, "runs_on_gpu", lambda: True)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert native.gpu_backend() == "metal"
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "0")
    assert native.gpu_backend() is None
    monkeypatch.delenv("MLX_VLM_NATIVE_KERNELS")
    monkeypatch.setattr(native_backend, "runs_on_gpu", lambda: False)  # work on the CPU: no kernels
    assert native.gpu_backend() is None


def test_rotate_qk_uses_one_validated_kernel_launch_on_a_gpu(monkeypatch):
    q, k = mx.random.normal((6, 2, 8)), mx.random.normal((6, 1, 8))
    cos, sin = mx.cos(mx.random.normal((6, 8))), mx.sin(mx.random.normal((6, 8)))
    plain = qwen2_vision.rotate_qk(q, k, cos, sin)
    gpu = SimulatedKernels(monkeypatch)
    rotated = qwen2_vision.rotate_qk(q, k, cos, sin)
    assert gpu.launches[-1] == "rope_2d" and validation.cached_verdicts("metal")["rope_2d metal float32 D=8"].ok
    n = len(gpu.launches)
    qwen2_vision.rotate_qk(q, k, cos, sin)
    assert len(gpu.launches) == n + 1  # one launch for q and k
    for a, b in zip(rotated, plain):
        assert mx.abs(a - b).max().item() <= 1e-6
    gpu.behaviour = "wrong"
    validation.forget_session()
    monkeypatch.setenv("MLX_VLM_NATIVE_KERNELS", "check")
    with pytest.warns(validation.KernelWarning, match="rope_2d metal float32 D=8"):
        fallback = qwen2_vision.rotate_qk(q, k, cos, sin)
    for a, b in zip(fallback, plain):
        assert mx.abs(a - b).max().item() <= 1e-6


def test_a_tower_on_a_simulated_gpu_whose_kernels_fail_answers_right(monkeypatch):
    """The Qwen2-VL tower, loaded plain (as on a GPU): every kernel fails to build,
    the features equal the CPU's, one warning per kernel variant."""
    from mlx_vlm_native.models.qwen2_vision import VisionConfig, VisionModel
    from mlx_vlm_native.native.packing import pack as pack_images, patchify

    config = VisionConfig.from_dict(dict(depth=2, embed_dim=128, hidden_size=48, mlp_ratio=2, num_heads=2))
    mx.random.seed(0)
    model = VisionModel(config)
    rng = np.random.default_rng(0)
    p = pack_images([patchify(rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)) for h, w in [(4, 6), (2, 2)]])
    expected = model(p)
    SimulatedKernels(monkeypatch, behaviour="fail")
    with pytest.warns(validation.KernelWarning) as caught:
        out = model(p)
    assert sorted(str(w.message).split(" is not used")[0].split("kernel ")[1] for w in caught) == [
        "rope_2d metal float32 D=64", "varlen_attention metal float32 D=64"]
    assert mx.abs(out - expected).max().item() <= 1e-5


def test_kernel_failure_names_the_kernel(monkeypatch):
    """Called with an explicit backend (selftest, benchmarks), a kernel that does not build raises with its name."""
    SimulatedKernels(monkeypatch, behaviour="fail")
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


def test_selftest_runs_without_a_gpu(capsys, monkeypatch):
    from mlx_vlm_native import selftest

    monkeypatch.setattr(native_backend, "runs_on_gpu", lambda: False)  # whatever this machine has
    assert selftest.main(["--quick", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "No GPU kernel was run" in out and "MISMATCH" not in out
    assert "kernel verdicts: none, no GPU kernel runs here" in out


@pytest.mark.parametrize("behaviour", ["ok", "fail"])
def test_selftest_shows_every_verdict_on_a_simulated_gpu(capsys, monkeypatch, behaviour):
    from mlx_vlm_native import selftest

    SimulatedKernels(monkeypatch, behaviour=behaviour)
    assert selftest.main(["--quick", "--no-timing"]) == (0 if behaviour == "ok" else 1)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| varlen_attention metal", "| rope_2d metal"))]
    assert len(rows) == 2 * 2 * 2  # kernels x head dims x dtypes of --quick
    if behaviour == "ok":
        assert all("| yes | agrees with the MLX reference" in r for r in rows), rows
    else:
        assert all("| NO | failed to compile or run" in r for r in rows), rows
        assert "attention fwd  lengths=[1, 5, 17, 33] D=64 float32: RuntimeError: native kernel" in out


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
    from mlx_vlm_native.native.packing import pack as pack_images, patchify

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
