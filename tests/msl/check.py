"""Type-check an MLX-generated Metal source with clang against shim.h.

What it catches: undeclared names, type errors, wrong address spaces, writes to
const inputs, template errors at instantiation. What it cannot: MSL-only rules
(the 32 KB threadgroup limit, attribute validity, MSL version features), which
only Apple's compiler knows; the selftest on a Mac remains the final check."""

import ast
import operator
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def find_clang():
    for name in (os.environ.get("CLANG"), "clang++-19", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def to_cpp(source: str, keep_instantiation: bool) -> str:
    """The few MSL constructs plain C++ rejects, rewritten."""
    source = re.sub(r"^#include <metal_\w+>\s*$", "", source, flags=re.M)
    instantiation = r'template\s*\[\[host_name\("[^"]*"\)\]\]\s*\[\[kernel\]\]'
    source = re.sub(instantiation, "template" if keep_instantiation else "// instantiation:", source)
    # threadgroup arrays are per-threadgroup shared storage: static locals
    return re.sub(r"(^|[;{}\s])(threadgroup\s+[\w:<>, ]+?\s+\w+\s*\[)", r"\1static \2", source)


def check(source: str, clang: str = None):
    """(ok, error lines) for one generated source."""
    clang = clang or find_clang()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cpp"
        path.write_text(to_cpp(source, keep_instantiation=True))
        cmd = [clang, "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes", "-ferror-limit=20",
               "-include", str(HERE / "shim.h"), str(path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    return result.returncode == 0, errors


METAL_THREADGROUP_LIMIT = 32 * 1024
_SIZES = {"float": 4, "half": 2, "float16_t": 2, "bfloat16_t": 2, "int": 4, "uint": 4, "short": 2}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _evaluate(expr: str, names: dict) -> int:
    def walk(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"cannot size threadgroup array [{expr}]")

    return walk(ast.parse(expr.replace("/", "//"), mode="eval").body)


def threadgroup_bytes(source: str, template: list) -> int:
    """Bytes of threadgroup memory the kernel body declares, with the template's
    integer values substituted (Apple GPUs allow 32 KB; clang cannot know)."""
    names = {name: value for name, value in template if isinstance(value, int)}
    total = 0
    for ctype, size in re.findall(r"threadgroup\s+(\w+)\s+\w+\s*\[([^\]]+)\]\s*;", source):
        total += _SIZES[ctype] * _evaluate(size, names)
    return total
