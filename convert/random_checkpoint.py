"""Write a random-weight checkpoint in a released layout (LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, POINTS1.5).

    python convert/random_checkpoint.py OUT [--preset tiny|llava-onevision-0.5b|qwen2-vl-tiny|...]

Offline stand-in for a Hub download: feed it to `mlx-vlm-native convert`,
load it in transformers, or benchmark at the real 0.5B geometry.
"""

import argparse

from mlx_vlm_native.random_checkpoint import PRESETS, write_checkpoint

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    print(write_checkpoint(a.out, a.preset, a.seed))
