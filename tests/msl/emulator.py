"""Run a kernel launch on the CPU: the exact generated Metal source (or the CUDA
source MLX would build) compiled as C++20 against exec.h, every GPU thread a
fiber. Binaries are cached by source, so a kernel compiles once per session and
runs on any data. Small shapes only: about 1e5 emulated thread-steps per second."""

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_vlm_native.native.kernels_source import Launch

from .check import find_clang, to_cpp
from .trace import cuda_kernel_name, cuda_source, metal_source

HERE = Path(__file__).parent
# one cache per user: a folder another user made under /tmp is not ours to write
CACHE = Path(tempfile.gettempdir()) / f"mlx_vlm_native_emulator-{os.getuid()}"

METAL_ATTRIBUTES = {
    "thread_position_in_grid": "emu::S.origin + emu::me().tpitg",
    "thread_position_in_threadgroup": "emu::me().tpitg",
    "threadgroup_position_in_grid": "emu::S.tgpig",
    "threads_per_threadgroup": "emu::S.tptg",
    "threads_per_grid": "emu::S.tpg",
    "threadgroups_per_grid": "emu::S.tgpg",
    "thread_index_in_threadgroup": "emu::me().tiitg",
    "thread_index_in_simdgroup": "emu::me().lane",
    "simdgroup_index_in_threadgroup": "emu::me().simd",
    "simdgroups_per_threadgroup": "emu::S.n_simd",
    "threads_per_simdgroup": "32u",
    "thread_execution_width": "32u",
}


class EmulatorError(RuntimeError):
    pass


def _to_bytes(x) -> bytes:
    if isinstance(x, bool):
        return np.asarray([x], np.bool_).tobytes()
    if isinstance(x, int):
        return np.asarray([x], np.int32).tobytes()  # MLX passes python ints as int32
    if isinstance(x, float):
        return np.asarray([x], np.float32).tobytes()  # ... and floats as float32
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16)).tobytes()
    return np.array(x).tobytes()


def _output(raw: bytes, shape, dtype) -> np.ndarray:
    """Kernel outputs as numpy; bfloat16 widened to float32."""
    if dtype == mx.bfloat16:
        bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    np_dtype = {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32}[dtype]
    return np.frombuffer(raw, np_dtype).reshape(shape).copy()


def _fill(shape, dtype, init_value) -> bytes:
    n = int(np.prod(shape))
    if dtype == mx.bfloat16:
        value = 0x7FC0 if init_value is None else np.float32(init_value).view(np.uint32) >> 16
        return np.full(n, value, np.uint16).tobytes()
    np_dtype = {mx.float32: np.float32, mx.float16: np.float16, mx.int32: np.int32}[dtype]
    fill = (np.nan if np.dtype(np_dtype).kind == "f" else 0x5A5A5A5A) if init_value is None else init_value
    return np.full(n, fill, np_dtype).tobytes()


def _metal_program(launch: Launch, source: str) -> str:
    head = re.search(r"\[\[kernel\]\] void (\w+)\(\n(.*?)\) \{\n", source, re.S)
    if not head:
        raise EmulatorError("cannot find the kernel signature in the generated source")
    params = [p.strip() for p in head.group(2).split(",\n")]
    inst = re.search(r"decltype\((\w+<.*?>)\)", source)
    callee = inst.group(1) if inst else head.group(1)
    names = list(launch.spec.input_names) + list(launch.spec.output_names)
    args = []
    for p in params:
        m = re.match(r"(.*?)\s*(\w+) \[\[(\w+)(?:\((\d+)\))?\]\]$", p)
        ctype, name, attribute = m.group(1), m.group(2), m.group(3)
        if attribute != "buffer":
            args.append(METAL_ATTRIBUTES[attribute])
        elif name not in names:
            raise EmulatorError(f"emulator: unsupported parameter {p!r}")
        elif ctype.endswith("&"):
            args.append(f"*({ctype[:-1]}*)buffer(\"{name}\")")
        else:
            args.append(f"({ctype})buffer(\"{name}\")")
    return _driver(to_cpp(source, keep_instantiation=False), callee, args)


def _cuda_program(launch: Launch) -> str:
    source = cuda_source(launch)
    names = list(launch.spec.input_names) + list(launch.spec.output_names)
    args = [f"(decltype(arg_type_{i}))buffer(\"{n}\")" for i, n in enumerate(names)]
    source = re.sub(r"^#include <mma.h>\s*$", "", source, flags=re.M)  # WMMA: cuda_exec.h
    source = re.sub(r"__global__ void (\w+)\(", r"void \1(", source)
    source = source.replace("__shared__", "static")
    # parameter types, for the casts in the call
    name = cuda_kernel_name(launch)  # the kernel's, not a header helper's
    sig = re.search(rf"void {re.escape(name)}\((.*?)\) \{{", source, re.S).group(1)
    types = [re.sub(r"\s*\w+$", "", p.strip()) for p in sig.split(",\n")]
    decls = "\n".join(f"static {t} arg_type_{i};" for i, t in enumerate(types))
    body = '#include "cuda_exec.h"\n' + source + "\n" + decls
    return _driver(body, f"mlx::core::cu::{cuda_kernel_name(launch)}", args, include=False)


def _driver(body: str, callee: str, args: list, include: bool = True) -> str:
    return f"""{'#include "exec.h"' if include else ''}
#include <map>
{body}
static std::map<std::string, emu::Buffer> buffers;
static unsigned char* buffer(const char* name) {{ return buffers.at(name).data; }}
int main(int argc, char** argv) {{
  // argv: data dir, grid xyz, threadgroup xyz, then buffer names (outputs after "--")
  std::string dir = argv[1];
  uint3 grid = {{uint(atoi(argv[2])), uint(atoi(argv[3])), uint(atoi(argv[4]))}};
  uint3 tg = {{uint(atoi(argv[5])), uint(atoi(argv[6])), uint(atoi(argv[7]))}};
  std::vector<std::string> outputs;
  bool out = false;
  for (int i = 8; i < argc; ++i) {{
    std::string n = argv[i];
    if (n == "--") {{ out = true; continue; }}
    buffers[n] = emu::load(dir + "/" + n + ".bin");
    if (out) outputs.push_back(n);
  }}
  emu::dispatch(grid, tg, [] {{ {callee}({", ".join(args)}); }});
  for (auto& n : outputs) emu::save(dir + "/" + n + ".out", buffers[n]);
  return 0;
}}
"""


def _compile(program: str) -> Path:
    clang = find_clang()
    if clang is None:
        raise EmulatorError("clang++ not found (install clang-19)")
    headers = "".join((HERE / h).read_text() for h in ("exec.h", "cuda_exec.h"))
    key = hashlib.sha256((program + headers).encode()).hexdigest()[:20]
    exe = CACHE / key / "kernel"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    cpp = exe.parent / "kernel.cpp"
    cpp.write_text(program)
    tmp_exe = exe.parent / f"kernel.{os.getpid()}"
    cmd = [clang, "-std=c++20", "-O1", "-w", "-I", str(HERE), str(cpp), "-o", str(tmp_exe)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise EmulatorError("emulator compile failed:\n" + result.stderr[-6000:])
    tmp_exe.rename(exe)
    return exe


def emulate(launch: Launch, language: str = None, timeout: float = 600) -> list:
    """Run `launch` on the CPU; returns its outputs as numpy arrays."""
    language = language or launch.spec.language
    if language == "metal":
        program = _metal_program(launch, metal_source(launch))
    else:
        program = _cuda_program(launch)
    exe = _compile(program)
    spec = launch.spec
    with tempfile.TemporaryDirectory() as data:
        for name, x in zip(spec.input_names, launch.inputs):
            Path(data, name + ".bin").write_bytes(_to_bytes(x))
        for name, shape, dtype in zip(spec.output_names, launch.output_shapes, launch.output_dtypes):
            Path(data, name + ".bin").write_bytes(_fill(shape, dtype, launch.init_value))
        grid, tg = launch.grid, launch.threadgroup
        if language == "cuda":  # CUDA launches whole blocks: ceil(grid / block) of them
            grid = tuple(-(-g // t) * t for g, t in zip(grid, tg))
        argv = [str(exe), data, *map(str, grid), *map(str, tg), *spec.input_names, "--", *spec.output_names]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            why = "crashed (out-of-bounds access?)" if result.returncode < 0 else "failed"
            raise EmulatorError(f"{spec.name} {why}, rc={result.returncode}: {result.stderr[-2000:]}")
        return [
            _output(Path(data, name + ".out").read_bytes(), shape, dtype)
            for name, shape, dtype in zip(spec.output_names, launch.output_shapes, launch.output_dtypes)
        ]
