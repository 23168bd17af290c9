"""The exact Metal source `mx.fast.metal_kernel` generates for one launch.

MLX's CPU build refuses to run Metal kernels, but during `mx.export_function`
tracing it records the call on a placeholder GPU stream, and `verbose=True`
prints the generated source to the C++ stdout, which we capture at fd 1."""

import os
import re
import sys
import tempfile

import mlx.core as mx

from mlx_vlm_native.native.kernels_source import Launch, build_kernel


def metal_source(launch: Launch) -> str:
    kernel = build_kernel(launch.spec)
    kwargs = launch.call_kwargs()
    inputs = kwargs.pop("inputs")
    arrays = [x for x in inputs if isinstance(x, mx.array)]

    def call(*arrs):
        it = iter(arrs)
        real = [next(it) if isinstance(x, mx.array) else x for x in inputs]
        return kernel(inputs=real, verbose=True, **kwargs)

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as captured:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "trace.mlxfn"), call, *arrays)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read()
    match = re.search(r"```\n(.*)```", text, re.S)
    if not match:
        raise RuntimeError(f"no generated source captured for {launch.spec.name}:\n{text[:2000]}")
    return match.group(1)


def cuda_source(launch: Launch) -> str:
    """The source `mx.fast.cuda_kernel` would JIT-compile for `launch` (MLX 0.32:
    mlx/backend/cuda/custom_kernel.cpp build_kernel), assembled here because the
    CPU build cannot construct a CUDA kernel. Without MLX's default header."""
    spec = launch.spec
    lines = [spec.header, "namespace mlx::core::cu {\n", "namespace cg = cooperative_groups;\n"]
    params = []
    for name, x in zip(spec.input_names, launch.inputs):
        params.append(f"    const {cuda_type(x)}* {name}")
    for name, dtype in zip(spec.output_names, launch.output_dtypes):
        params.append(f"    {CUDA_TYPES[dtype]}* {name}")
    lines.append(f"__global__ void {cuda_kernel_name(launch)}(\n" + ",\n".join(params) + ") {")
    for name, value in launch.template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {str(value).lower()};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {CUDA_TYPES[value]};")
    lines += ["", spec.source, "}\n", "} // namespace mlx::core::cu\n"]
    return "\n".join(lines)


CUDA_TYPES = {
    mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t", mx.uint32: "uint32_t", mx.int64: "int64_t", mx.bool_: "bool",
}
MLX_TYPE_NAMES = {
    mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.int32: "int32",
}


def cuda_type(x) -> str:
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int32_t"
    if isinstance(x, float):
        return "float"
    return CUDA_TYPES[x.dtype]


def cuda_kernel_name(launch: Launch) -> str:
    suffix = ""
    for _, value in launch.template:
        if isinstance(value, bool):
            suffix += "_t" if value else "_f"
        elif isinstance(value, int):
            suffix += f"_{value}"
        else:
            suffix += "_" + MLX_TYPE_NAMES[value]
    return f"custom_kernel_{launch.spec.kernel_name}{suffix}"
