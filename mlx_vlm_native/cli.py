"""`mlx-vlm-native <command>`: generate, chat, serve, convert, train, fuse, caption, selftest."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

COMMANDS = {
    "generate": "generate", "chat": "chat", "serve": "server", "convert": "convert", "train": "train",
    "fuse": "fuse", "caption": "caption", "selftest": "selftest",
}
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
HINT_MARKER = Path.home() / ".cache" / "mlx_vlm_native" / "openblas_hint_shown"


def mlx_uses_reference_blas() -> bool:
    """True for MLX's Linux CPU wheel, which bundles the slow reference BLAS."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(list(spec.submodule_search_locations)[0]).parent
    return any((site / "mlx_cpu.libs").glob("libblas-*"))


def find_openblas():
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


def ensure_fast_blas() -> None:
    """On Linux, re-run this process with OpenBLAS preloaded when MLX would
    otherwise use the reference BLAS (about 20x slower matmuls); if OpenBLAS is
    not installed, say how to get it, once. MLX_VLM_NATIVE_NO_OPENBLAS=1 opts out."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_VLM_NATIVE_NO_OPENBLAS"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or not mlx_uses_reference_blas():
        return
    lib = find_openblas()
    if lib is None:
        if not HINT_MARKER.exists():
            print(
                "note: MLX is using the slow reference BLAS; "
                "`sudo apt-get install libopenblas0-pthread` makes it ~20x faster "
                "(mlx-vlm-native then uses it automatically)",
                file=sys.stderr,
            )
            HINT_MARKER.parent.mkdir(parents=True, exist_ok=True)
            HINT_MARKER.touch()
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def main() -> None:
    ensure_fast_blas()
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: mlx-vlm-native {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    module = importlib.import_module(f"mlx_vlm_native.{COMMANDS[command]}")
    module.main()


if __name__ == "__main__":
    main()
