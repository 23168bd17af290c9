"""The CPU backend (`native/cpu_backend.py`: NumPy softmax / quick_gelu / silu /
one-row gemv, few-row column blocks) against MLX's own ops: values to 1e-6 and gradients to 1e-5, in
float32 and bfloat16; and `install`, which puts it into a model. The NumPy ops
run on whatever device MLX defaults to (they read arrays back to the host), so
these tests are device-neutral; which path a loaded model takes is in
test_execution_path.py."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_vlm_native.models.qwen2_vision import VisionConfig, VisionModel
from mlx_vlm_native.native import cpu_backend
from mlx_vlm_native.native.packed_attention import PackedAttention, equal_length_runs
from mlx_vlm_native.native.packing import pack, patchify


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.bfloat16, 1e-2)])
def test_softmax_rows_match_mlx(dtype, tol):
    rng = np.random.default_rng(0)
    xs = [mx.array(rng.standard_normal(shape) * 4).astype(dtype) for shape in [(2, 3, 7, 7), (1, 5, 11)]]
    for ours, x in zip(cpu_backend.softmax_rows(*xs), xs):
        assert ours.dtype == dtype and ours.shape == x.shape
        ref = mx.softmax(x.astype(mx.float32), axis=-1)
        assert float(mx.abs(ours.astype(mx.float32) - ref).max()) <= tol


@pytest.mark.parametrize("ours,ref", [
    (cpu_backend.quick_gelu, nn.gelu_fast_approx), (cpu_backend.silu, nn.silu),
])
def test_activations_match_mlx(ours, ref):
    x = mx.array(np.random.default_rng(1).standard_normal((9, 33)).astype(np.float32) * 6)
    assert float(mx.abs(ours(x) - ref(x)).max()) <= 1e-5
    w = mx.array(np.random.default_rng(2).standard_normal((9, 33)).astype(np.float32))
    g_ours = mx.grad(lambda x: (ours(x) * w).sum())(x)
    g_ref = mx.grad(lambda x: (ref(x) * w).sum())(x)
    assert float(mx.abs(g_ours - g_ref).max()) <= 1e-5


def test_softmax_gradient_matches_mlx():
    rng = np.random.default_rng(3)
    a, b = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in [(3, 6), (2, 4, 4)])
    wa, wb = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in [(3, 6), (2, 4, 4)])

    def loss(softmax):
        def f(a, b):
            pa, pb = softmax(a, b)
            return (pa * wa).sum() + (pb * wb).sum()
        return f

    ours = mx.grad(loss(cpu_backend.softmax_rows), argnums=(0, 1))(a, b)
    ref = mx.grad(loss(lambda *xs: [mx.softmax(x, axis=-1) for x in xs]), argnums=(0, 1))(a, b)
    for g, r in zip(ours, ref):
        assert float(mx.abs(g - r).max()) <= 1e-5


def test_equal_length_runs():
    assert equal_length_runs([0, 4, 8, 12, 15, 18, 20]) == [(0, 4, 3), (12, 3, 2), (18, 2, 1)]
    assert equal_length_runs([0, 5]) == [(0, 5, 1)]


def test_matvec_matches_mlx_with_gradients():
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((1, 1, 48)).astype(np.float32))
    w = mx.array(rng.standard_normal((40, 48)).astype(np.float32))
    assert cpu_backend.matvec_applies(x, w)
    assert float(mx.abs(cpu_backend.fast_product(x, w) - x @ w.T).max()) <= 1e-5
    g = mx.array(rng.standard_normal((1, 1, 40)).astype(np.float32))
    ours = mx.grad(lambda x, w: (cpu_backend.fast_product(x, w) * g).sum(), argnums=(0, 1))(x, w)
    ref = mx.grad(lambda x, w: ((x @ w.T) * g).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and float(mx.abs(a - b).max()) <= 1e-5
    assert not cpu_backend.matvec_applies(mx.zeros((2, 48)), w)  # two rows: MLX's matmul
    assert not cpu_backend.matvec_applies(x.astype(mx.bfloat16), w.astype(mx.bfloat16))


@pytest.mark.parametrize("rows,out,inner", [(2, 64, 48), (4, 2048, 768), (8, 768, 2048), (16, 96, 40)])
def test_few_rows_product_matches_mlx_with_gradients(rows, out, inner):
    """The column-block product (any block that divides the output) against
    x @ w.T: values and gradients to 1e-5 relative, (rows, 1, inner) decode input."""
    rng = np.random.default_rng(rows)
    x = mx.array(rng.standard_normal((rows, 1, inner)).astype(np.float32))
    w = mx.array(rng.standard_normal((out, inner)).astype(np.float32) / np.sqrt(inner))
    g = mx.array(rng.standard_normal((rows, 1, out)).astype(np.float32))
    for block in (8, 32, out):
        got = cpu_backend.few_rows_product(x, w, block)
        assert got.shape == (rows, 1, out)
        assert float(mx.abs(got - x @ w.T).max()) <= 1e-5 * float(mx.abs(x @ w.T).max())
        ours = mx.grad(lambda x, w: (cpu_backend.few_rows_product(x, w, block) * g).sum(), argnums=(0, 1))(x, w)
        ref = mx.grad(lambda x, w: ((x @ w.T) * g).sum(), argnums=(0, 1))(x, w)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and float(mx.abs(a - b).max()) <= 1e-5 * float(mx.abs(b).max())


def test_column_blocks_only_on_openblas_small_matrix_cores(monkeypatch):
    """Blocks keep each product within OpenBLAS's small-matrix kernels (M*N*K <=
    100**3) and divide the output, one row included (in place of the gemv);
    over 16 rows, another core or another BLAS keep one product."""
    monkeypatch.setattr(cpu_backend, "openblas_core", lambda: "skylakex")
    assert cpu_backend.column_block(8, 768, 2048) == 128  # 8 * 128 * 768 = 786k
    assert cpu_backend.column_block(8, 2048, 768) == 32  # 8 * 64 * 2048 is over
    assert cpu_backend.column_block(4, 768, 2048) == 256
    assert cpu_backend.column_block(8, 768, 447) == 0  # no block of 8 or more divides 447
    assert cpu_backend.column_block(1, 768, 2048) == 256 and cpu_backend.column_block(17, 768, 2048) == 0
    one = mx.zeros((1, 1, 768))
    assert cpu_backend.fast_product(one, mx.zeros((447, 768))).shape == (1, 1, 447)  # no block: the gemv
    x, w = mx.zeros((4, 1, 768)), mx.zeros((2048, 768))
    assert cpu_backend.fast_product(x.astype(mx.bfloat16), w.astype(mx.bfloat16)) is None
    assert cpu_backend.fast_product(x, w).shape == (4, 1, 2048)
    for core in ("haswell", "zen", ""):
        monkeypatch.setattr(cpu_backend, "openblas_core", lambda: core)
        assert cpu_backend.column_block(8, 768, 2048) == 0 and cpu_backend.fast_product(x, w) is None
        assert cpu_backend.fast_product(one, w).shape == (1, 1, 2048)  # one row: NumPy's gemv


def test_install_keeps_parameters_and_outputs_of_a_language_model(monkeypatch):
    from mlx_lm.models import qwen2

    monkeypatch.setattr(cpu_backend, "openblas_core", lambda: "")  # one row: gemv; more: MLX's product

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=80,
                           tie_word_embeddings=True)
    mx.random.seed(0)
    model = qwen2.Model(args)
    nn.quantize(model.layers[1], group_size=32, bits=4)  # a quantized layer is left alone
    before = dict(tree_flatten(model.parameters()))
    q_proj = model.layers[0].self_attn.q_proj
    ids = mx.array([[7]])
    ref = model(ids)
    cpu_backend.install(model)
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert model.layers[0].self_attn.q_proj is q_proj and type(q_proj) is cpu_backend.Linear
    assert isinstance(model.model.embed_tokens, cpu_backend.Embedding)
    assert type(model.layers[1].self_attn.q_proj) is nn.QuantizedLinear
    calls = []
    real = cpu_backend._host_matvec
    monkeypatch.setattr(cpu_backend, "_host_matvec", lambda x, w: calls.append(w.shape) or real(x, w))
    out = model(ids)
    assert len(calls) == 7 + 1  # layer 0's seven projections and the tied head
    assert float(mx.abs(out - ref).max()) <= 1e-5
    assert float(mx.abs(model(mx.array([[7, 8, 9]]))[:, :1] - ref).max()) <= 1e-5  # rows > 1: MLX's path
    assert cpu_backend.install(model) is model and type(q_proj) is cpu_backend.Linear  # twice: no change
    batch = mx.array([[7], [3], [11], [5]])  # a decode step of four sequences, in column blocks
    plain = qwen2.Model(args)
    nn.quantize(plain.layers[1], group_size=32, bits=4)
    plain.update(model.parameters())
    monkeypatch.setattr(cpu_backend, "openblas_core", lambda: "skylakex")
    assert float(mx.abs(model(batch) - plain(batch)).max()) <= 1e-5


@pytest.mark.parametrize("windowed", [False, True])
def test_install_gives_a_vision_tower_numpy_layers_with_the_same_output(windowed):
    """Qwen2-VL (quick_gelu) and Qwen2.5-VL (silu, windows): the activation and
    packed-attention layers get their NumPy class; the features stay (<= 1e-5)."""
    geometry = dict(depth=2, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=2)
    if windowed:  # Qwen2.5-VL's config: hidden_size is the tower width, out_hidden_size the merger's
        geometry.update(hidden_size=32, out_hidden_size=48, intermediate_size=64, hidden_act="silu",
                        window_size=56, fullatt_block_indexes=(1,))
    config = VisionConfig.from_dict(geometry)
    mx.random.seed(0)
    model = VisionModel(config)
    rng = np.random.default_rng(0)
    p = pack([patchify(rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)) for h, w in [(4, 6), (8, 4)]])
    plain = model(p)
    assert cpu_backend.installed(model) == []
    cpu_backend.install(model)
    kinds = {type(m) for _, m in model.named_modules()}
    assert cpu_backend.PackedAttention in kinds and PackedAttention not in kinds
    assert (cpu_backend.SiLU if windowed else cpu_backend.QuickGELU) in kinds
    assert type(model.merger.mlp[1]) is nn.GELU  # the exact GELU has no NumPy body
    assert float(mx.abs(model(p) - plain).max()) <= 1e-5
