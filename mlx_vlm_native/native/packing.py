"""Patch n' pack: images of any size as one token sequence.

Each image (or video) becomes a `(t, h, w)` grid of patches at (nearly) its
native resolution; grids are concatenated into one sequence described by
`cu_seqlens` (one attention segment per temporal slice) and per-token
(row, col) positions, Qwen2-VL style: patches are ordered merge-block-major so
that each run of `merge**2` consecutive tokens is one 2x2 block.
"""

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np


def smart_resize(
    height: int, width: int, factor: int = 28,
    min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
) -> Tuple[int, int]:
    """Size divisible by `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200: "
            f"image of {height}x{width} cannot be patched"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames: np.ndarray, patch: int = 14, merge: int = 2, temporal: int = 2):
    """(T, C, H, W) normalised frames -> ((T/tp)*gh*gw, C*tp*P*P) rows and grid (t, gh, gw).

    A single image is repeated over the temporal patch. Rows are channel-major
    (C, tp, P, P) and ordered t-major then merge-block-major.
    """
    if frames.shape[0] % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - frames.shape[0] % temporal, 0)])
    T, C, H, W = frames.shape
    t, gh, gw = T // temporal, H // patch, W // patch
    x = frames.reshape(t, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, bh, bw, mh, mw, C, tp, P, P
    return x.reshape(t * gh * gw, C * temporal * patch * patch), (t, gh, gw)


def cu_seqlens(grids: Sequence[Tuple[int, int, int]]) -> np.ndarray:
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def positions_2d(grids: Sequence[Tuple[int, int, int]], merge: int = 2) -> np.ndarray:
    """(N, 2) (row, col) of every packed token, in merge-block-major order."""
    out = []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def segment_ids(cu: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu)).astype(np.int32)


@dataclass
class Pack:
    """Several images' patches as one sequence."""

    patches: np.ndarray  # (N, C*tp*P*P)
    grids: List[Tuple[int, int, int]]  # (t, h, w) per image
    cu_seqlens: np.ndarray  # (segments + 1,) int32
    positions: np.ndarray  # (N, 2) int32 (row, col)

    @property
    def lengths(self) -> List[int]:
        return [t * h * w for t, h, w in self.grids]


def pack(items: Sequence[Tuple[np.ndarray, Tuple[int, int, int]]], merge: int = 2) -> Pack:
    """[(patches, grid), ...] from `patchify` -> one Pack."""
    grids = [tuple(int(g) for g in grid) for _, grid in items]
    return Pack(
        np.concatenate([p for p, _ in items]), grids, cu_seqlens(grids), positions_2d(grids, merge)
    )


def pack_of_packs(packs: Sequence[Pack]) -> Pack:
    """Several packs (e.g. one per prompt) as one, for a single encoder call."""
    grids = [g for p in packs for g in p.grids]
    return Pack(
        np.concatenate([p.patches for p in packs]), grids, cu_seqlens(grids),
        np.concatenate([p.positions for p in packs]),
    )


def split_by_prompt(features, batch: Sequence) -> list:
    """Rows of a batch's packed vision features, one slice per prompt
    (`inputs.vision_tokens` each; None for a prompt without images)."""
    out, start = [], 0
    for inputs in batch:
        n = inputs.vision_tokens
        out.append(features[start : start + n] if n else None)
        start += n
    return out


def unpack(x, lengths: Sequence[int]) -> list:
    """Split a packed (N, ...) array back into per-image arrays."""
    bounds = np.cumsum(lengths)[:-1].tolist()
    if sum(lengths) != x.shape[0]:
        raise ValueError(f"pack has {x.shape[0]} tokens, lengths sum to {sum(lengths)}")
    return [x[a:b] for a, b in zip([0] + bounds, bounds + [x.shape[0]])]


def greedy_pack(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Group item indices into sequences of at most `budget` tokens (first-fit
    decreasing), so that padding is needed only at the end of each sequence."""
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"item {too_long[0]} has {lengths[too_long[0]]} tokens, over the budget of {budget}")
    bins: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]
