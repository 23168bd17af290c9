"""Test-only tooling to check the Metal (and CUDA) kernel sources on a Linux CPU:
`trace` gets the exact source MLX generates, `check` type-checks it with clang
against `shim.h`, `emulator` runs it on the CPU through `exec.h`."""
