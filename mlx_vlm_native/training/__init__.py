"""Shared training core: optimizer/schedule, atomic checkpoints, data, loop.

Task modules (`openvision2`, ...) turn a recipe under `train/` into a model,
a loss and batches, and hand them to `loop.train`.
"""

TASKS = {"openvision2": "openvision2", "finetune": "finetune", "navit": "navit", "eve": "eve"}
