"""The CUDA kernels without a GPU: the source MLX's cuda_kernel would build is
assembled (as mlx/backend/cuda/custom_kernel.cpp does), compiled with nvcc when
it is installed, and executed by the tests/msl emulator (blocks as threadgroups,
__syncthreads as a barrier) against the references. A real GPU run is the
selftest's job (`mlx-vlm-native selftest` on a CUDA machine)."""

import shutil
import subprocess

import mlx.core as mx
import pytest

from kernel_cases import ATOL, SEGMENT_MIXES, attention_case, fast_first, launches, max_diff, needs_emulator, with_bug
from mlx_vlm_native.native import rope
from msl.trace import cuda_kernel_name, cuda_source

# What MLX's default header provides (device/utils.cuh, cooperative_groups, `inf`).
MLX_PREAMBLE = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda/std/limits>
#define inf cuda::std::numeric_limits<float>::infinity()
"""


def all_launches():
    out = []
    # fp16/bf16 with head dims divisible by 16 take the tensor-core (WMMA) forward
    for dtype, head_dim in ((mx.float32, 64), (mx.float16, 80), (mx.bfloat16, 128), (mx.float16, 72)):
        case = attention_case([1, 5], 2, head_dim, dtype)
        out += [launch for launch, _ in launches("cuda", case).values()]
        q = case["q"]
        cos = mx.zeros((q.shape[0], head_dim))
        out += [rope.rope_launch("cuda", q, case["k"], cos, cos, backward) for backward in (False, True)]
    return out


def test_source_assembly_follows_mlx():
    case = attention_case([1, 5], 2, 80, mx.float16)
    launch, _ = launches("cuda", case)["fwd"]
    source = cuda_source(launch)
    name = cuda_kernel_name(launch)
    assert name == f"custom_kernel_{launch.spec.kernel_name}_float16_2_80_32"
    assert launch.spec.kernel_name.startswith("varlen_attention_fwd_")
    assert f"__global__ void {name}(\n    const __half* q,\n" in source
    assert "    const int32_t* items,\n    const float* scale,\n    __half* out,\n    float* lse) {" in source
    assert "  using T = __half;\n  constexpr int H = 2;\n  constexpr int D = 80;\n  constexpr int BK = 32;" in source
    assert source.index("constexpr float kLog2e") < source.index("namespace mlx::core::cu {")
    assert source.rstrip().endswith("} // namespace mlx::core::cu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: CUDA sources not compiled")
def test_sources_compile_with_nvcc(tmp_path):
    sources = [cuda_source(launch) for launch in all_launches()]
    # one translation unit: the shared header once, then every kernel
    header = launches("cuda", attention_case([1], 1, 64))["fwd"][0].spec.header
    unit = MLX_PREAMBLE + header + "".join(s.replace(header, "", 1) for s in sources)
    path = tmp_path / "kernels.cu"
    path.write_text(unit)
    result = subprocess.run(
        ["nvcc", "-c", "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings", str(path), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_tensor_core_forward_is_chosen_for_half_types():
    from mlx_vlm_native.native.attention import forward_launch

    def kernel(head_dim, dtype):
        case = attention_case([3], 1, head_dim, dtype)
        return forward_launch("cuda", case["q"], case["k"], case["v"], case["cu"], 1.0).spec.source_file

    assert kernel(80, mx.float16) == kernel(128, mx.bfloat16) == "varlen_attention_fwd_wmma.cu"
    assert kernel(72, mx.float16) == kernel(80, mx.float32) == "varlen_attention_fwd.cu"


@needs_emulator
@pytest.mark.parametrize("head_dim,dtype", fast_first([(64, mx.float32), (80, mx.float16), (128, mx.bfloat16),
                                                       (72, mx.float16), (96, mx.float16)], fast=2))
def test_attention_kernels_match_reference(head_dim, dtype):
    from msl.emulator import emulate

    case = attention_case(SEGMENT_MIXES[0] + [70], 1, head_dim, dtype)
    for name, (launch, names) in launches("cuda", case).items():
        if name != "fwd" and dtype != mx.float32:
            continue
        for out_name, got in zip(names, emulate(launch)):
            err = max_diff(got, case[out_name])
            assert err <= ATOL[dtype], f"{name} {out_name}: {err:.2e}"


@needs_emulator
@pytest.mark.parametrize("backward", [False, True])
def test_rope_matches_reference(backward):
    from msl.emulator import emulate

    mx.random.seed(2)
    q, k = mx.random.normal((7, 3, 64)), mx.random.normal((7, 2, 64))
    cos, sin = mx.random.normal((7, 64)), mx.random.normal((7, 64))
    q_out, k_out = emulate(rope.rope_launch("cuda", q, k, cos, sin, backward))
    assert max_diff(q_out, rope.reference_rope(q, cos, sin, backward)) <= 1e-6
    assert max_diff(k_out, rope.reference_rope(k, cos, sin, backward)) <= 1e-6


@needs_emulator
def test_emulator_catches_missing_syncthreads():
    from msl.emulator import emulate

    case = attention_case(SEGMENT_MIXES[0], 1, 64)
    launch, _ = launches("cuda", case)["fwd"]
    launch = with_bug(launch, "head);\n  __syncthreads();\n\n  float s[BK];", "head);\n\n  float s[BK];")
    out, _ = emulate(launch)
    assert not max_diff(out, case["out"]) <= 1e-3


@needs_emulator
@pytest.mark.slow
@pytest.mark.parametrize("old,new", [
    # K^T read as K: the WMMA operand layout matters
    ("wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;", "wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;"),
    # the rescale reads scratch before the other lanes wrote their scores' O rows
    ("    __syncwarp();\n    for (int e = lane; e < 256; e += 32) {\n      scratch[e] *=", "    for (int e = lane; e < 256; e += 32) {\n      scratch[e] *="),
])
def test_emulator_catches_tensor_core_bugs(old, new):
    from msl.emulator import emulate

    case = attention_case([1, 17, 70, 100], 1, 64, mx.float16)  # several K/V tiles per segment
    launch, _ = launches("cuda", case)["fwd"]
    out, _ = emulate(with_bug(launch, old, new))
    assert not max_diff(out, case["out"]) <= 1e-2


@needs_emulator
def test_emulator_enforces_wmma_alignment():
    from msl.emulator import EmulatorError, emulate

    case = attention_case([5], 1, 64, mx.float16)
    launch, _ = launches("cuda", case)["fwd"]
    launch = with_bug(launch, "wmma::load_matrix_sync(pa, p_tile + kk * 16, BK);", "wmma::load_matrix_sync(pa, p_tile + kk * 16 + 8, BK);")
    with pytest.raises(EmulatorError, match="aligned"):
        emulate(launch)
