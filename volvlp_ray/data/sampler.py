"""Equal work on every rank: one z-length per global step, agreed by all ranks, no padding.

A data-parallel step lasts as long as its slowest rank and attention grows with the square of the token count,
so what varies (chunk depth, volume depth) must vary *between* steps, not between the ranks of one step; and a
batch whose samples share one depth needs no attention mask (SDPA keeps its flash / cuDNN kernels).

Each rank keeps a **pool** of rows from its own stream (rows are small: with ``data.volume_transport=direct``
they hold where the voxels lie, not the voxels). Before every step every rank gets every rank's count of pool
rows per depth group (``depth // patch_z``: whole z patches), one small all-gather on the host over a gloo group
of its own (``Comm``; no device, no interleaving with the step's collectives), and all decide the same:

- ``organ`` text mode (SigVLP chunks): a chunk length ``L`` (z patches) is drawn from a generator every rank
  shares, ``(seed, epoch, step)``, uniform over ``data.chunk_depth``, and lowered, if needed, to the largest
  length for which every rank holds ``batch_size`` volumes at least that deep. Each rank then takes the first
  ``batch_size`` rows of its pool (arrival order) that are deep enough and cuts a random chunk of exactly ``L``
  z patches from each; the chunk's organ-wise text is made then (``pipeline.StepBatcher``).
- ``report`` text mode (whole volumes): a group is *feasible* when the ranks hold, all together, ``world x
  batch_size`` rows of it; one is drawn with the shared generator, weighted by those rows. Every rank takes its
  own rows of the group up to its batch; rows beyond that are handed to ranks short of theirs
  (``Comm.exchange``: with the direct transport a row is a reference and tokens, a few KB), so the rarer depths
  need pools of about ``groups x batch_size`` rows *in all*, not on every rank. Volumes lose only their
  remainder (< ``patch_z`` slices, half at each end). When no group is feasible the pools grow by a batch of
  rows and the ranks gather again, up to ``max_pool`` rows per rank in all; only then (rare: measured by
  ``jobs/benchmark.py scale``) a step crops deeper volumes to the deepest length the rows can fill (``cropped``
  slices are counted).

So every rank's vision tower sees ``batch_size x L x (H/ph) x (W/pw)`` tokens in every step, ``L`` changes from
step to step, and no padding exists. Rows not used by the end of an epoch's streams (groups too rare to fill a
step) are **carried** into the next epoch's pool; the carry at the start of an epoch is saved with each
checkpoint (``save_carry``), so a resumed run replays the interrupted epoch exactly: the same carry, the same
stream, the same shared draws. On another number of workers the keys trained in the epoch so far are left out of
its stream and the carries are dealt anew (``train/elastic.py``).

The sampler is the same code in training (``Comm`` = a gloo group of the training workers) and in the scale
benchmark and tests (``ThreadComm``: ranks as threads of one process).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Comm", "EqualTokenSampler", "LocalComm", "Plan", "ThreadComm", "describe", "equal_token_steps", "load_carry",
    "load_carry_keys", "load_keys", "rows_of", "save_carry", "save_keys", "stack_rows",
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


class Comm(Protocol):
    """How the ranks of one step talk (host-side, small messages): a gloo group in training (``train/loop.py``),
    threads in the scale benchmark and the tests (``ThreadComm``)."""

    rank: int
    world: int

    def all_gather(self, v: np.ndarray) -> np.ndarray:
        """Every rank's ``v`` (same shape everywhere), stacked in rank order: (world, *v.shape)."""

    def exchange(self, rows: list[Row]) -> list[list[Row]]:
        """Every rank's ``rows`` (any lengths), in rank order."""


class LocalComm:
    """One rank: nothing to agree with."""

    rank, world = 0, 1

    def all_gather(self, v: np.ndarray) -> np.ndarray:
        return v[None]

    def exchange(self, rows: list[Row]) -> list[list[Row]]:
        return [rows]


class ThreadComm:
    """Ranks simulated as threads of one process (the scale benchmark, tests): the same collectives as the gloo
    group in training, with a barrier."""

    def __init__(self, world: int):
        import threading

        self.world = world
        self._parts: list[Any] = [None] * world
        self.barrier = threading.Barrier(world)
        self.rounds = 0

    def _gather(self, rank: int, value: Any) -> list[Any]:
        self._parts[rank] = value
        self.barrier.wait()
        out = list(self._parts)
        self.barrier.wait()  # nobody overwrites its part before every rank has read the round
        return out

    def for_rank(self, rank: int) -> "Comm":
        outer = self

        class _Rank:
            def __init__(self):
                self.rank, self.world = rank, outer.world

            def all_gather(self, v: np.ndarray) -> np.ndarray:
                if rank == 0:
                    outer.rounds += 1
                return np.stack(outer._gather(rank, v))

            def exchange(self, rows: list[Row]) -> list[list[Row]]:
                return outer._gather(rank, rows)

        return _Rank()


class EqualTokenSampler:
    """One rank's pool and its share of each agreed step (see the module docstring).

    Args:
        batch_size: rows per rank per step.
        patch_z: slices per z patch.
        mode: "report" (whole volumes, grouped by z patches) or "organ" (chunks of an agreed length).
        chunk_patches: (lo, hi) chunk length in z patches (organ mode).
        pool_rows: rows the pool is filled to before each step.
        max_pool: rows per rank the pools may grow to (in all) while no report-mode group can fill a step.
        seed, rank: the shared draws use ``(seed, epoch, step)``, the chunk starts also ``rank``.
        chunks_per_row: organ mode: K chunks of each row taken (``batch_size`` counts chunks: ``batch_size / K``
            rows per step), in the plan as K consecutive entries of the row with their own starts.
        overlap: K > 1: the chunks of a row are drawn independently (True) or disjoint (False: a row must be at
            least K chunk lengths deep to be taken).
    """

    def __init__(self, batch_size: int, patch_z: int, mode: str, chunk_patches: tuple[int, int] = (1, 1), *,
                 pool_rows: int, max_pool: int, seed: int, rank: int, chunks_per_row: int = 1, overlap: bool = True):
        if mode not in ("report", "organ"):
            raise ValueError(f"mode must be 'report' or 'organ', got {mode!r}")
        if batch_size < 1 or patch_z < 1:
            raise ValueError(f"batch_size and patch_z must be >= 1, got {batch_size}, {patch_z}")
        if chunks_per_row < 1 or batch_size % chunks_per_row or (chunks_per_row > 1 and mode != "organ"):
            raise ValueError(f"chunks_per_row={chunks_per_row} needs organ mode and must divide "
                             f"batch_size={batch_size}")
        lo, hi = (max(1, int(c)) for c in chunk_patches)
        self.batch_size, self.patch_z, self.mode = batch_size, patch_z, mode
        self.chunks_per_row, self.overlap = chunks_per_row, overlap or chunks_per_row == 1
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
        """What this rank holds: [rows per group (MAX_GROUPS), ``more`` (1 while its stream has rows), pool rows],
        int32. Every rank gets every rank's (``Comm.all_gather``)."""
        exact = np.bincount(np.asarray(self._groups, dtype=np.int64), minlength=MAX_GROUPS)[:MAX_GROUPS]
        return np.concatenate([exact, [int(more), len(self.pool)]]).astype(np.int32)

    # -- one step --------------------------------------------------------------------------------------

    def plan(self, gathered: np.ndarray, comm: Comm, epoch: int, step: int, attempt: int, force: bool) -> Plan | None:
        """This rank's rows of the step that every rank's counts (``gathered``, (world, MAX_GROUPS + 2)) allow,
        removed from the pool; ``None`` when no step is possible yet (grow the pools and gather again). In report
        mode, rows another rank needs are handed over through ``comm.exchange`` (all ranks call it together)."""
        b, world = self.batch_size, gathered.shape[0]
        exact = gathered[:, :MAX_GROUPS].astype(np.int64)
        at_least = np.cumsum(exact[:, ::-1], axis=1)[:, ::-1]  # (world, G): rows at least g deep
        shared = np.random.default_rng([self.seed, epoch, step, attempt, 3])
        groups = np.asarray(self._groups, dtype=np.int64)
        if self.mode == "organ":  # every rank cuts its own rows: only the length is agreed
            k = self.chunks_per_row
            span = 1 if self.overlap else k  # a row holds its chunks if it is span x z patches deep
            enough = np.nonzero(at_least.min(axis=0) >= b // k)[0]  # depths every rank holds b / k rows of
            deepest = int(enough.max(initial=0)) // span
            if deepest < 1:
                return None
            lo, hi = self.chunk_patches
            z = min(int(shared.integers(lo, hi + 1)), deepest)
            idx = np.nonzero(groups >= z * span)[0][:b // k]
            return self._cut(idx, [], z, "chunk", epoch, step, attempt)
        # report mode: one group for the whole step, from the rows of all ranks
        total = exact.sum(axis=0)
        feasible = np.nonzero(total >= world * b)[0]
        if len(feasible):
            weights = total[feasible].astype(np.float64)
            z = int(shared.choice(feasible, p=weights / weights.sum()))
            counts = exact[:, z]
            mine = np.nonzero(groups == z)[0]
            kind = "exact"
        elif force:  # the deepest length the rows of all ranks can fill; deeper volumes are cropped to it
            z = int(np.nonzero(at_least.sum(axis=0) >= world * b)[0].max(initial=0))
            if z < 1:
                return None
            counts = at_least[:, z]
            cand = np.nonzero(groups >= z)[0]
            mine = cand[np.argsort(groups[cand], kind="stable")]  # the closest depths first
            kind = "fallback"
        else:
            return None
        take = _shares(counts, b, step)
        keep = min(int(take[self.rank]), b)
        own, surplus = mine[:keep], mine[keep:int(take[self.rank])]
        # rows beyond its batch go to ranks short of theirs: ranks in order, surplus in rank order
        handed = [self.pool[i] for i in surplus]
        received = comm.exchange(handed)
        flat = [r for part in received for r in part]
        deficit = b - np.minimum(take, b)
        start = int(deficit[:self.rank].sum())
        extra = flat[start:start + int(deficit[self.rank])]
        return self._cut(np.concatenate([own, surplus]), extra, z, kind, epoch, step, attempt, keep_rows=len(own))

    def _cut(self, idx: np.ndarray, extra: list[Row], z: int, kind: str, epoch: int, step: int, attempt: int,
             keep_rows: int | None = None) -> Plan:
        """Remove ``idx`` from the pool; the step's rows are the first ``keep_rows`` of them plus ``extra`` (rows
        handed over by other ranks)."""
        rows = [self.pool[i] for i in idx[:keep_rows]] + list(extra)
        taken = len(rows) - len(extra)  # rows of this rank's pool in its own step
        n = z * self.patch_z
        own_rng = np.random.default_rng([self.seed, epoch, step, self.rank, 7])
        starts, cropped = [], 0
        if kind == "chunk" and self.chunks_per_row > 1:  # K consecutive entries per row, each its own chunk
            k, picked = self.chunks_per_row, rows
            rows = [r for r in picked for _ in range(k)]
            for r in picked:
                depth = int(r["depth"])
                if self.overlap:
                    starts.extend(int(s) for s in own_rng.integers(0, depth - n + 1, size=k))
                else:  # k disjoint chunks: k sorted offsets into the free slices, chunk i shifted by i chunks
                    free = np.sort(own_rng.integers(0, depth - k * n + 1, size=k))
                    starts.extend(int(f) + i * n for i, f in enumerate(free))
        else:
            for r in rows:
                depth = int(r["depth"])
                if kind == "chunk":
                    starts.append(int(own_rng.integers(0, depth - n + 1)))
                else:  # centre the crop: the remainder (and a fallback's excess) split between both ends
                    starts.append((depth - n) // 2)
                    cropped += depth - depth % self.patch_z - n
        drop = np.zeros(len(self.pool), bool)
        drop[np.asarray(idx, dtype=np.int64)] = True
        self.pool = [r for r, d in zip(self.pool, drop) if not d]
        self._groups = [g for g, d in zip(self._groups, drop) if not d]
        return Plan(rows, z, starts, kind, cropped=cropped, attempts=attempt + 1,
                    meta={"handed_over": int(drop.sum()) - taken, "received": len(extra)})


def _shares(counts: np.ndarray, batch_size: int, step: int) -> np.ndarray:
    """How many of its candidate rows each rank gives to a step of ``world x batch_size`` rows: first its own
    batch's worth (so few rows move), then the rest from ranks with more, starting at a rank that turns with
    ``step`` (so no rank's pool is always drained last)."""
    world = len(counts)
    take = np.minimum(counts, batch_size)
    need = world * batch_size - int(take.sum())
    for k in range(world):
        if need <= 0:
            break
        r = (step + k) % world
        extra = min(int(counts[r] - take[r]), need)
        take[r] += extra
        need -= extra
    return take


def equal_token_steps(sampler: EqualTokenSampler, rows: Iterator[Row], comm: Comm, epoch: int,
                      carry: list[Row] | None = None, first_step: int = 0) -> Iterator[Plan]:
    """One epoch of agreed steps: ``carry`` (rows left from the last epoch) then ``rows`` (this rank's stream)
    through ``sampler``; ``comm`` gathers every rank's counts before each step. Every rank takes the same number
    of steps. When every rank's stream has ended, steps go on while one is possible; what is left stays in
    ``sampler.pool`` (the next epoch's carry). ``first_step``: the index of the first step in the epoch's shared
    draws (an epoch resumed on another number of workers continues where its draws were)."""
    sampler.pool, sampler._groups = [], []
    sampler.add(carry or [])
    more = True
    step = first_step

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
            gathered = comm.all_gather(sampler.summary(more))
            any_more = bool(gathered[:, MAX_GROUPS].max())
            at_cap = int(gathered[:, MAX_GROUPS + 1].sum()) >= comm.world * sampler.max_pool
            plan = sampler.plan(gathered, comm, epoch, step, attempt, force=at_cap)
            if plan is not None:
                break
            if not any_more:  # every stream is done and no step is possible: the epoch ends
                return
            if more:
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


def load_carry_keys(path: str | Path) -> list[str]:
    """The ``key`` of each row of a saved carry, without reading its other columns."""
    with np.load(path, allow_pickle=False) as z:
        n = int(z["__n__"])
        if "c:key" in z.files:
            return [str(k) for k in z["c:key"]]
        return [str(z[f"r:key:{i}"]) for i in range(n)]


def save_keys(path: str | Path, keys: list[str]) -> None:
    """Sample keys (strings, repeats kept) -> ``np.savez`` of one unicode array (no pickle)."""
    np.savez(path, keys=np.asarray([str(k) for k in keys], dtype=str))


def load_keys(path: str | Path) -> list[str]:
    with np.load(path, allow_pickle=False) as z:
        return [str(k) for k in z["keys"]]


def describe(plans: list[Plan]) -> dict[str, Any]:
    """Counts over plans (for logs and tests)."""
    kinds: dict[str, int] = {}
    for p in plans:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return {"steps": len(plans), "kinds": kinds, "z_patches": sorted({p.z_patches for p in plans}),
            "cropped": int(sum(p.cropped for p in plans))}

