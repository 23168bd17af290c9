"""The Metal kernels, checked on a Linux CPU: the exact source MLX generates
(export tracing, verbose=True) is type-checked by clang against tests/msl/shim.h
and executed by the tests/msl emulator, then compared with the pure-MLX
references. Seeded bugs show the checker and the emulator can fail."""

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import (ATOL, SEGMENT_MIXES, attention_case, fast_first, launches, max_diff, needs_emulator,
                          pack, with_bug)
from mlx_vlm_native.native import SUPPORTED_HEAD_DIMS, rope
from msl.check import METAL_THREADGROUP_LIMIT, check, threadgroup_bytes
from msl.emulator import EmulatorError, emulate
from msl.trace import metal_source


def run_and_compare(launch, case, names, atol):
    outputs = emulate(launch)
    for name, got in zip(names, outputs):
        err = max_diff(got, case[name])
        assert err <= atol, f"{launch.spec.name} {name}: max|diff| {err:.2e} > {atol:.0e}"
    return outputs


@needs_emulator
@pytest.mark.parametrize("head_dim", fast_first(SUPPORTED_HEAD_DIMS))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_generated_sources_pass_clang(head_dim, dtype):
    case = attention_case([1, 5], 2, head_dim, dtype)
    for name, (launch, _) in launches("metal", case).items():
        ok, errors = check(metal_source(launch))
        assert ok, f"{name}: {errors}"


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_threadgroup_memory_fits_apple_gpus(head_dim):
    case = attention_case([1, 5], 2, head_dim)
    for name, (launch, _) in launches("metal", case).items():
        used = threadgroup_bytes(launch.spec.source, launch.template)
        assert 0 < used <= METAL_THREADGROUP_LIMIT, f"{name}: {used} bytes"


def test_threadgroup_memory_check_can_fail():
    source = "threadgroup float k_tile[BK * D];\nthreadgroup float v_tile[BK * D];"
    assert threadgroup_bytes(source, [("BK", 32), ("D", 128)]) == 32768
    assert threadgroup_bytes(source, [("BK", 64), ("D", 128)]) > METAL_THREADGROUP_LIMIT


@needs_emulator
@pytest.mark.parametrize("head_dim", fast_first(SUPPORTED_HEAD_DIMS))
def test_forward_matches_reference_fp32(head_dim):
    for i, lengths in enumerate(SEGMENT_MIXES[:2]):
        case = attention_case(lengths, 2, head_dim, seed=i)
        launch, names = launches("metal", case)["fwd"]
        run_and_compare(launch, case, names, ATOL[mx.float32])


@needs_emulator
@pytest.mark.parametrize("head_dim,dtype", fast_first([(d, mx.float16) for d in SUPPORTED_HEAD_DIMS]
                                                    + [(72, mx.bfloat16), (128, mx.bfloat16)]))
def test_forward_matches_reference_half(head_dim, dtype):
    case = attention_case(SEGMENT_MIXES[0], 1, head_dim, dtype)
    launch, names = launches("metal", case)["fwd"]
    run_and_compare(launch, case, names, ATOL[dtype])


@needs_emulator
def test_forward_handles_multiple_query_blocks():
    case = attention_case([70, 1], 1, 64)  # 70 rows: three 32-row blocks, a 6-row tail
    launch, names = launches("metal", case)["fwd"]
    run_and_compare(launch, case, names, ATOL[mx.float32])


@needs_emulator
@pytest.mark.parametrize("head_dim", fast_first(SUPPORTED_HEAD_DIMS))
def test_backward_matches_reference_fp32(head_dim):
    case = attention_case(SEGMENT_MIXES[0], 2, head_dim, seed=head_dim)
    for name in ("bwd_dkdv", "bwd_dq"):
        launch, names = launches("metal", case)[name]
        run_and_compare(launch, case, names, ATOL[mx.float32])


@needs_emulator
def test_backward_fp16():
    case = attention_case(SEGMENT_MIXES[1], 1, 80, mx.float16)
    for name in ("bwd_dkdv", "bwd_dq"):
        launch, names = launches("metal", case)[name]
        run_and_compare(launch, case, names, 2e-2)


@needs_emulator
@pytest.mark.parametrize("dtype", fast_first([mx.float32, mx.float16]))
@pytest.mark.parametrize("backward", [False, True])
def test_rope_matches_reference(dtype, backward):
    mx.random.seed(1)
    n, d = 9, 80
    q, k = mx.random.normal((n, 3, d)).astype(dtype), mx.random.normal((n, 2, d)).astype(dtype)
    cos, sin = mx.random.normal((n, d)), mx.random.normal((n, d))
    launch = rope.rope_launch("metal", q, k, cos, sin, backward)
    assert check(metal_source(launch))[0]
    q_out, k_out = emulate(launch)
    assert max_diff(q_out, rope.reference_rope(q, cos, sin, backward)) <= ATOL[dtype]
    assert max_diff(k_out, rope.reference_rope(k, cos, sin, backward)) <= ATOL[dtype]


# ---- seeded bugs: the checker and the emulator must be able to fail -----------


@pytest.mark.parametrize("old,new,message", [
    ("const float inv_l = 1.0f / l;", "const float inv_l = 1.0f / l_sum;", "undeclared identifier"),
    ("metal::exp2(m - m_new)", "exp2(m - m_new)", "undeclared identifier"),
    ("frag8 q_frag[DF];", "device float* alias = k_tile;\nfrag8 q_frag[DF];", "cannot initialize"),
    ("out[at] = T(", "q[at] = T(", "read-only"),
])
@needs_emulator
def test_clang_check_rejects_seeded_bugs(old, new, message):
    case = attention_case([1, 5], 1, 64)
    launch = with_bug(launches("metal", case)["fwd"][0], old, new)
    ok, errors = check(metal_source(launch))
    assert not ok and any(message in e for e in errors), errors


@pytest.mark.parametrize("old,new,in_header", [
    # the barrier after the K/V tile load: threads read tiles others have not written yet
    ("head, tid);\n  threadgroup_barrier(metal::mem_flags::mem_threadgroup);\n\n  frag8 s[KF];", "head, tid);\n\n  frag8 s[KF];", False),
    # row max over the wrong lanes: a wrong assumption about the simdgroup-matrix layout
    ("x = metal::max(x, metal::simd_shuffle_xor(x, ushort(1)));", "x = metal::max(x, metal::simd_shuffle_xor(x, ushort(2)));", True),
    # keys past the segment end not masked
    ("if (k0 + 8 * j + fc + e >= seg_end)", "if (k0 + 8 * j + fc + e >= seg_end + 8)", False),
])
@needs_emulator
def test_emulator_catches_seeded_bugs(old, new, in_header):
    case = attention_case(SEGMENT_MIXES[0], 1, 64)
    launch, names = launches("metal", case)["fwd"]
    out, _ = emulate(with_bug(launch, old, new, in_header))
    assert not max_diff(out, case["out"]) <= 1e-3


@needs_emulator
def test_emulator_reports_out_of_bounds_reads():
    cu, (q, k, v) = pack([1, 5], 1, 64, n=3)
    launch = rope.rope_launch("metal", q, k, mx.zeros((6, 64)), mx.zeros((6, 64)), False)
    launch = with_bug(launch, "const bool is_q = h < HQ;", "const bool is_q = h < HQ + HK;")
    with pytest.raises(EmulatorError, match="crashed"):
        emulate(launch)


@needs_emulator
def test_emulator_reports_divergent_barriers():
    case = attention_case([1, 5], 1, 64)
    launch, _ = launches("metal", case)["fwd"]
    launch = with_bug(launch, "  threadgroup_barrier(metal::mem_flags::mem_threadgroup);\n  load_tile_pair",
                      "  if (tid < 64) threadgroup_barrier(metal::mem_flags::mem_threadgroup);\n  load_tile_pair")
    with pytest.raises(EmulatorError, match="deadlock"):
        emulate(launch)


@needs_emulator
def test_emulator_fills_unwritten_outputs_with_nan():
    case = attention_case([1, 5], 1, 64)
    launch, _ = launches("metal", case)["fwd"]
    launch = with_bug(launch, "if (row_in_segment) {\n  const float inv_l", "if (row_in_segment && row > 0) {\n  const float inv_l")
    out, _ = emulate(launch)
    assert np.isnan(out[0]).all() and not np.isnan(out[1:]).any()
