"""Depth bucketing: batches of volumes of similar depth, so that little of a padded batch is padding.

A batch is padded to its deepest volume. Drawn at random, volumes of 25 and 41 slices share batches and about
15 % of the vision tokens are padding (measured on the default data). ``bucket_by_depth`` takes pools of
``pool`` batches from the stream, sorts each pool by depth, cuts it into batches of ``batch_size`` and yields
them in a seeded random order; the stream's shuffling still decides which volumes meet in a pool::

    pools = shard.iter_batches(batch_size=batch_size * pool, batch_format="numpy")
    for batch in bucket_by_depth(pools, batch_size, np.random.default_rng([seed, epoch, rank])):
        ...

Deterministic: the same pools and generator give the same batches in the same order (a resumed run skips the
batches it trained on by count). Every row of a pool goes into a batch, except the remainder (< ``batch_size``
rows) of the stream's last, partial pool, the same rows ``drop_last`` would drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

__all__ = ["bucket_by_depth", "padding_fraction"]


def bucket_by_depth(pools: Iterable[dict[str, np.ndarray]], batch_size: int,
                    rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Pools of rows (numpy batches with a ``depth`` column) -> batches of ``batch_size`` rows, depth-sorted
    within each pool, yielded in random order per pool."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for pool in pools:
        if "depth" not in pool:
            raise KeyError(f"bucket_by_depth needs a 'depth' column, the batch has {sorted(pool)}")
        depth = np.asarray(pool["depth"])
        n = len(depth) // batch_size
        if n == 0:
            continue
        order = np.argsort(depth, kind="stable")
        for j in rng.permutation(n):
            idx = order[j * batch_size:(j + 1) * batch_size]
            yield {k: _take(v, idx) for k, v in pool.items()}


def _take(column: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if isinstance(column, np.ndarray):
        return column[idx]
    out = np.empty(len(idx), dtype=object)  # a list of variable-shaped arrays
    for j, i in enumerate(idx):
        out[j] = column[i]
    return out


def padding_fraction(depths: np.ndarray, patch_z: int) -> float:
    """Fraction of z patches (hence of vision tokens) that are padding when ``depths`` form one batch."""
    tokens = -(-np.asarray(depths) // patch_z)
    return float(1 - tokens.sum() / (len(tokens) * tokens.max()))
