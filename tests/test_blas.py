"""OpenBLAS preloading on Linux: detected, used by the CLI, same numbers."""

import json
import os
import subprocess
import sys

import pytest

from mlx_vlm_native.cli import find_openblas, mlx_uses_reference_blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU wheel only")

SNIPPET = """
import json, os, mlx.core as mx
mx.random.seed(0)
a = mx.random.normal((256, 384)); b = mx.random.normal((384, 128))
maps = open('/proc/self/maps').read()
print(json.dumps({"out": (a @ b).tolist(), "openblas": "libopenblas" in maps}))
"""


def run_snippet(preload):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    r = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.skipif(find_openblas() is None, reason="OpenBLAS not installed")
def test_openblas_gives_the_same_matmul():
    import numpy as np

    ref = run_snippet(None)
    fast = run_snippet(find_openblas())
    assert fast["openblas"] and not ref["openblas"]
    a, b = np.array(ref["out"]), np.array(fast["out"])
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


@pytest.mark.skipif(find_openblas() is None or not mlx_uses_reference_blas(),
                    reason="needs MLX's reference-BLAS wheel and OpenBLAS")
def test_cli_reexecs_with_openblas():
    code = "import sys; sys.argv=['x']; from mlx_vlm_native.cli import ensure_fast_blas; ensure_fast_blas(); import os; print(os.environ.get('LD_PRELOAD',''))"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_VLM_NATIVE_NO_OPENBLAS")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "libopenblas" in r.stdout
