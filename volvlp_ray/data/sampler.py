"""Equal work on every rank: one z-length per global step, agreed by all ranks, no padding.

A data-parallel step lasts as long as its slowest rank and attention grows with the square of the token count,
so what varies (chunk depth, volume depth) must vary *between* steps, not between the ranks of one step; and a
batch whose samples share one depth needs no attention mask (SDPA keeps its flash / cuDNN kernels).

Each rank keeps a **pool** of rows from its own stream (rows are small: with ``data.volume_transport=direct``
they hold where the voxels lie, not the voxels). Before every step the ranks agree, with one element-wise MIN
all-reduce of two small count vectors on the host (no device, see ``agree``), on what every rank can serve:

- ``organ`` text mode (SigVLP chunks): a chunk length ``L`` (z patches) is drawn from a generator every rank
  shares, ``(seed, epoch, step)``, uniform over ``data.chunk_depth``, and lowered, if needed, to the largest
  length for which every rank holds ``batch_size`` volumes at least that deep. Each rank then takes the first
  ``batch_size`` rows of its pool (arrival order) that are deep enough and cuts a random chunk of exactly ``L``
  z patches from each; the chunk's organ-wise text is made then (``batch_rows`` in ``pipeline``).
- ``report`` text mode (whole volumes): rows are grouped by ``depth // patch_z`` (whole z patches; the at most
  ``patch_z - 1`` slices of remainder are cropped, half at each end). A group that every rank holds at least
  ``batch_size`` rows of is *feasible*; one is drawn with the shared generator, weighted by the rows the ranks
  hold of it, and every rank takes its first ``batch_size`` rows of that group. When none is feasible the pool
  grows by one batch of rows and the ranks agree again, up to ``max_pool`` rows; only then (rare: measured by
  ``jobs/benchmark.py scale``) a step crops deeper volumes to the deepest length every rank can serve
  (``cropped`` slices are counted).

So every rank's vision tower sees ``batch_size x L x (H/ph) x (W/pw)`` tokens in every step, ``L`` changes from
step to step, and no padding exists. Rows not used by the end of an epoch's stream (groups too rare to fill a
step on every rank) are **carried** into the next epoch's pool; the carry at the start of an epoch is saved with
each checkpoint (``save_carry``), so a resumed run replays the interrupted epoch exactly: the same carry, the
same stream, the same agreed draws.

The sampler is the same code in training (``agree`` = a gloo all-reduce over the training workers) and in the
scale benchmark (``agree`` = a MIN over simulated ranks in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EqualTokenSampler", "Plan", "describe", "equal_token_steps", "load_carry", "rows_of", "save_carry", "stack_rows",
]

MAX_GROUPS = 512
"""Length of the count vectors (z patches per volume); deeper volumes count in the last group."""

Row = dict[str, Any]


@dataclass
class Plan:
    """One rank's share of one step: ``rows`` (pool rows) cut to ``starts[i] : starts[i] + z_patches * patch_z``
    slices. ``cropped``: slices dropped beyond each volume's remainder (report mode's rare fallback)."""

    rows: list[Row]
    z_patches: int
    starts: list[int]
    kind: str  # "exact" | "chunk" | "fallback"
    cropped: int = 0
    attempts: int = 1
    pool_rows: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def rows_of(batch: dict[str, np.ndarray]) -> list[Row]:
    """A numpy batch (columns) -> rows (dicts), in order."""
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def stack_rows(rows: list[Row]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch (columns); columns of arrays that differ in shape become object arrays."""
    out: dict[str, np.ndarray] = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        try:
            col = np.stack([np.asarray(v) for v in vals])
            if col.dtype == object:
                raise ValueError
        except ValueError:
            col = np.empty(len(vals), dtype=object)
            for i, v in enumerate(vals):
                col[i] = v
        out[k] = col
    return out


class EqualTokenSampler:
    """One rank's pool and its share of each agreed step (see the module docstring).

    Args:
        batch_size: rows per rank per step.
        patch_z: slices per z patch.
        mode: "report" (whole volumes, grouped by z patches) or "organ" (chunks of an agreed length).
        chunk_patches: (lo, hi) chunk length in z patches (organ mode).
        pool_rows: rows the pool is filled to before each step.
        max_pool: rows the pool may grow to while no report-mode group is feasible.
        seed, rank: the shared draws use ``(seed, epoch, step)``, the chunk starts also ``rank``.
    """

    def __init__(self, batch_size: int, patch_z: int, mode: str, chunk_patches: tuple[int, int] = (1, 1), *,
                 pool_rows: int, max_pool: int, seed: int, rank: int):
        if mode not in ("report", "organ"):
            raise ValueError(f"mode must be 'report' or 'organ', got {mode!r}")
        if batch_size < 1 or patch_z < 1:
            raise ValueError(f"batch_size and patch_z must be >= 1, got {batch_size}, {patch_z}")
        lo, hi = (max(1, int(c)) for c in chunk_patches)
        self.batch_size, self.patch_z, self.mode = batch_size, patch_z, mode
        self.chunk_patches = (lo, max(lo, hi))
        self.pool_rows = max(pool_rows, batch_size)
        self.max_pool = max(max_pool, self.pool_rows)
        self.seed, self.rank = seed, rank
        self.pool: list[Row] = []
        self._groups: list[int] = []

    # -- the pool --------------------------------------------------------------------------------------

    def add(self, rows: Iterable[Row]) -> None:
        for r in rows:
            g = int(r["depth"]) // self.patch_z
            if g < 1:
                raise ValueError(f"row {r.get('key')!r} has {r['depth']} slices, fewer than the z patch {self.patch_z}")
            self.pool.append(r)
            self._groups.append(min(g, MAX_GROUPS - 1))

    def __len__(self) -> int:
        return len(self.pool)

    def summary(self, more: bool) -> np.ndarray:
        """What this rank can serve: [rows per group (MAX_GROUPS), rows at least g deep (MAX_GROUPS),
        ``more`` (1 while the stream has rows)], int64. The ranks MIN-reduce it (``agree``)."""
        exact = np.bincount(np.asarray(self._groups, dtype=np.int64), minlength=MAX_GROUPS)[:MAX_GROUPS]
        at_least = np.cumsum(exact[::-1])[::-1]
        return np.concatenate([exact, at_least, [int(more)]]).astype(np.int64)

    # -- one step --------------------------------------------------------------------------------------

    def plan(self, agreed: np.ndarray, epoch: int, step: int, attempt: int, force: bool) -> Plan | None:
        """This rank's rows of the step the agreed counts allow, removed from the pool; ``None`` when no
        report-mode group is feasible and ``force`` is off (grow the pool and agree again)."""
        b = self.batch_size
        exact, at_least = agreed[:MAX_GROUPS], agreed[MAX_GROUPS:2 * MAX_GROUPS]
        deepest = int(np.nonzero(at_least >= b)[0].max(initial=0))  # every rank has b rows >= this deep
        if deepest < 1:
            return None
        shared = np.random.default_rng([self.seed, epoch, step, attempt, 3])
        groups = np.asarray(self._groups)
        if self.mode == "organ":
            lo, hi = self.chunk_patches
            z = min(int(shared.integers(lo, hi + 1)), deepest)
            idx = np.nonzero(groups >= z)[0][:b]
            kind = "chunk"
        else:
            feasible = np.nonzero(exact >= b)[0]
            if len(feasible):
                weights = exact[feasible].astype(np.float64)
                z = int(shared.choice(feasible, p=weights / weights.sum()))
                idx = np.nonzero(groups == z)[0][:b]
                kind = "exact"
            elif force:
                z = deepest  # the closest deeper volumes, cropped to the deepest common length
                cand = np.nonzero(groups >= z)[0]
                idx = cand[np.argsort(groups[cand], kind="stable")][:b]
                kind = "fallback"
            else:
                return None
        rows = [self.pool[i] for i in idx]
        n = z * self.patch_z
        own = np.random.default_rng([self.seed, epoch, step, self.rank, 7])
        starts, cropped = [], 0
        for r in rows:
            depth = int(r["depth"])
            if kind == "chunk":
                starts.append(int(own.integers(0, depth - n + 1)))
            else:  # centre the crop: the remainder (and a fallback's excess) split between both ends
                starts.append((depth - n) // 2)
                cropped += depth - depth % self.patch_z - n
        keep = np.ones(len(self.pool), bool)
        keep[idx] = False
        self.pool = [r for r, k in zip(self.pool, keep) if k]
        self._groups = [g for g, k in zip(self._groups, keep) if k]
        return Plan(rows, z, starts, kind, cropped=cropped, attempts=attempt + 1)


def equal_token_steps(sampler: EqualTokenSampler, rows: Iterator[Row], agree: Callable[[np.ndarray], np.ndarray],
                      epoch: int, carry: list[Row] | None = None) -> Iterator[Plan]:
    """One epoch of agreed steps: ``carry`` (rows left from the last epoch) then ``rows`` (this rank's stream)
    through ``sampler``; ``agree`` MIN-reduces a count vector over all ranks. Every rank takes the same number of
    steps. When the stream ends, steps go on while a group is feasible; what is left stays in ``sampler.pool``
    (the next epoch's carry)."""
    sampler.pool, sampler._groups = [], []
    sampler.add(carry or [])
    more = True
    step = 0

    def pull(n: int) -> None:
        nonlocal more
        for _ in range(n):
            r = next(rows, None)
            if r is None:
                more = False
                return
            sampler.add([r])

    while True:
        if more and len(sampler) < sampler.pool_rows:
            pull(sampler.pool_rows - len(sampler))
        attempt = 0
        while True:
            agreed = agree(sampler.summary(more))
            all_more = bool(agreed[-1])
            at_cap = len(sampler) >= sampler.max_pool
            plan = sampler.plan(agreed, epoch, step, attempt, force=at_cap)
            if plan is not None:
                break
            if not all_more:  # some rank's stream is done and nothing is feasible: the epoch ends
                if more:  # this rank still has rows (unequal streams): they join the carry
                    pull(1 << 62)
                return
            pull(sampler.batch_size)
            attempt += 1
        plan.pool_rows = len(sampler) + len(plan.rows)
        yield plan
        step += 1


# -- the carry in a checkpoint (no pickle: np.savez of plain arrays, loaded with allow_pickle=False) ------


def save_carry(path: str | Path, rows: list[Row]) -> None:
    arrays: dict[str, np.ndarray] = {"__n__": np.asarray(len(rows))}
    if rows:
        for k in rows[0]:
            vals = [np.asarray(r[k]) for r in rows]
            if all(v.dtype != object for v in vals) and len({v.shape for v in vals}) == 1:
                arrays[f"c:{k}"] = np.stack(vals)
            else:  # variable-shaped (voxels through the object store): one array per row
                for i, v in enumerate(vals):
                    arrays[f"r:{k}:{i}"] = v
    np.savez(path, **arrays)


def load_carry(path: str | Path) -> list[Row]:
    with np.load(path, allow_pickle=False) as z:
        n = int(z["__n__"])
        rows: list[Row] = [{} for _ in range(n)]
        for name in z.files:
            if name.startswith("c:"):
                col = z[name]
                for i in range(n):
                    rows[i][name[2:]] = col[i]
            elif name.startswith("r:"):
                _, k, i = name.rsplit(":", 2)
                rows[int(i)][k] = z[name]
    return rows


def describe(plans: list[Plan]) -> dict[str, Any]:
    """Counts over plans (for logs and tests)."""
    kinds: dict[str, int] = {}
    for p in plans:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return {"steps": len(plans), "kinds": kinds, "z_patches": sorted({p.z_patches for p in plans}),
            "cropped": int(sum(p.cropped for p in plans))}

