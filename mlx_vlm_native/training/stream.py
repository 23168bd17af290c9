"""The data stream every task shares: an epoch's order from (seed, epoch), a
position {"epoch", "index"} to resume at exactly, and one rule for sharding
batches across `mx.distributed` ranks."""

from typing import Iterator, Tuple

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of `n` items in `epoch`: the same on every rank and on resume."""
    return np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)


def positions(n: int, seed: int, position=None, shuffle: bool = True) -> Iterator[Tuple[int, dict]]:
    """(item index, position after it) forever, from `position` (default: the start)."""
    pos = dict(position or {"epoch": 0, "index": 0})
    while True:
        order = epoch_order(n, seed, pos["epoch"], shuffle)
        while pos["index"] < n:
            item = int(order[pos["index"]])
            pos["index"] += 1
            yield item, dict(pos)
        pos = {"epoch": pos["epoch"] + 1, "index": 0}


def rank_batches(it, rank: int, size: int):
    """Of each group of `size` consecutive (batch, position) pairs, rank `rank`
    takes the rank-th; the position is the one after the group, so every rank
    resumes at the same place."""
    for first in it:
        group = [first] + [next(it) for _ in range(size - 1)]
        yield group[rank][0], group[-1][1]
