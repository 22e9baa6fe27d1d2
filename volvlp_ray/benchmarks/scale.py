"""Scale: how much of a data-parallel step is useful work, at 1 to N ranks, with the real batching code.

A CT-RATE-scale stream (volume depths from the synthetic generator's z extents, ``synthetic.case_extent_mm``,
resampled to the config's z spacing; or ``--depth-range``) is dealt to ``world`` simulated ranks the way Ray
Train's equal split deals rows (an epoch's shuffled rows, round-robin). Each rank's rows go through the
training code that forms batches:

- ``equal`` (``data.sampler=equal``): ``EqualTokenSampler`` / ``equal_token_steps`` from ``data/sampler.py``,
  with ``ThreadComm`` (simulated ranks as threads: the all-gather and row hand-over the gloo group does in
  training);
- ``bucket`` (``--baseline``; ``data.sampler=bucket``, the state before): ``rebatch`` + ``bucket_by_depth`` per
  rank with the rank-seeded order, organ chunks drawn per row by ``pipeline.draw_chunk``.

Per world size and text mode (report: whole volumes; organ: SigVLP chunks within ``data.chunk_depth``):

- ``useful_work_fraction``: mean over steps of sum over ranks of the unpadded samples' FLOPs / (world x the slowest
  rank's padded FLOPs) (``vit3d_flops_per_sample``; a rank's padded FLOPs: batch x the FLOPs of its deepest
  sample);
- ``masked_step_fraction``: steps in which some rank's batch holds a sample shorter than the batch (a padding
  mask reaches attention);
- ``padded_token_fraction``: vision tokens that are padding;
- ``distinct_token_lengths``: sequence lengths seen (each a compile of a shape-specialised graph);
- equal only: ``rows_handed_over_fraction`` (rows of a step that another rank's pool held, report mode),
  ``cropped_slice_fraction`` (slices dropped beyond each volume's remainder: report mode's rare
  fallback), ``remainder_slice_fraction`` (the < patch_z slices of remainder report mode crops), step kinds,
  mean pool rows.

    python jobs/benchmark.py scale --config configs/ctrate_vitb.yaml --world 1 8 64 --out scale.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import numpy as np

from volvlp_ray.benchmarks import write_report

__all__ = ["TARGET", "add_arguments", "main", "run", "simulate"]

TARGET = 0.97
"""Useful-work fraction the equal sampler must reach at 8 and 64 ranks."""


def _depth_stream(n: int, seed: int, spacing_z: float, depth_range: tuple[int, int] | None) -> np.ndarray:
    if depth_range is not None:
        return np.random.default_rng([seed, 99]).integers(depth_range[0], depth_range[1] + 1, size=n)
    from volvlp_ray.data.synthetic import case_extent_mm

    return np.asarray([max(1, round(case_extent_mm(seed, "train", i) / spacing_z)) for i in range(n)], dtype=np.int64)


def _deal(depths: np.ndarray, world: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Row indices of each rank for one epoch: a shuffled pass dealt round-robin (equal shares)."""
    order = np.random.default_rng([seed, epoch, 17]).permutation(len(depths))
    per = len(order) // world
    return [order[r::world][:per] for r in range(world)]


class _Stats:
    def __init__(self, flops, tokens_per_patch: int, patch_z: int):
        self.flops, self.tpp, self.pz = flops, tokens_per_patch, patch_z
        self.useful: list[float] = []
        self.masked = 0
        self.real_tokens = 0.0
        self.all_tokens = 0.0
        self.lengths: set[int] = set()

    def step(self, per_rank: list[tuple[np.ndarray, int]]) -> None:
        """per_rank: (real z patches per sample, the batch's padded z patches)."""
        f = self.flops
        useful = sum(sum(f(int(z) * self.tpp) for z in real) for real, _ in per_rank)
        slowest = max(len(real) * f(pad * self.tpp) for real, pad in per_rank)
        self.useful.append(useful / (len(per_rank) * slowest))
        self.masked += any(int(real.min()) < pad for real, pad in per_rank)
        for real, pad in per_rank:
            self.real_tokens += float(real.sum()) * self.tpp
            self.all_tokens += len(real) * pad * self.tpp
            self.lengths.add(pad * self.tpp)

    def report(self) -> dict[str, Any]:
        n = len(self.useful)
        return {
            "steps": n,
            "useful_work_fraction": float(np.mean(self.useful)) if n else None,
            "useful_work_fraction_min_step": float(np.min(self.useful)) if n else None,
            "masked_step_fraction": self.masked / n if n else None,
            "padded_token_fraction": 1 - self.real_tokens / self.all_tokens if self.all_tokens else None,
            "distinct_token_lengths": len(self.lengths),
            "token_lengths": sorted(self.lengths),
        }


def _rows(depths: np.ndarray, idx: np.ndarray) -> list[dict[str, Any]]:
    return [{"key": f"v{int(i)}", "depth": int(depths[i])} for i in idx]


def _simulate_equal(cfg, depths, world, mode, epochs, seed, stats: _Stats) -> dict[str, Any]:
    from volvlp_ray.data.sampler import EqualTokenSampler, ThreadComm, equal_token_steps

    b, pz = cfg.train.batch_size, cfg.model.patch[0]
    samplers = [EqualTokenSampler(b, pz, mode, (cfg.data.chunk_depth[0] // pz, cfg.data.chunk_depth[1] // pz),
                                  pool_rows=cfg.data.pool_batches * b, max_pool=cfg.data.max_pool_batches * b,
                                  seed=seed, rank=r,
                                  chunks_per_row=cfg.data.chunks_per_volume if mode == "organ" else 1,
                                  overlap=cfg.data.chunk_overlap) for r in range(world)]
    kinds: dict[str, int] = {}
    cropped = remainder = slices = 0
    pool_rows: list[int] = []
    carry: list[list] = [[] for _ in range(world)]
    rounds = moved = 0
    for epoch in range(epochs):
        shares = _deal(depths, world, epoch, seed)
        comm = ThreadComm(world)
        plans: list[list] = [[] for _ in range(world)]
        errors: list[BaseException] = []

        def run_rank(r: int) -> None:
            try:
                plans[r] = list(equal_token_steps(samplers[r], iter(_rows(depths, shares[r])), comm.for_rank(r),
                                                  epoch, carry[r]))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                comm.barrier.abort()

        threads = [threading.Thread(target=run_rank, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        if len({len(p) for p in plans}) != 1:
            raise RuntimeError(f"ranks took different step counts: {[len(p) for p in plans]}")
        rounds += comm.rounds
        for step_plans in zip(*plans):
            per_rank = []
            for p in step_plans:
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
                per_rank.append((np.full(len(p.rows), p.z_patches), p.z_patches))
                cropped += p.cropped
                for row in p.rows:
                    d = int(row["depth"])
                    slices += d
                    if mode == "report":
                        remainder += d % pz
                pool_rows.append(p.pool_rows)
                moved += p.meta.get("received", 0)
            stats.step(per_rank)
        carry = [list(s.pool) for s in samplers]
    steps = max(len(stats.useful), 1)
    return {"step_kinds": kinds, "cropped_slice_fraction": cropped / max(slices, 1),
            "remainder_slice_fraction": remainder / max(slices, 1),
            "mean_pool_rows": float(np.mean(pool_rows)) if pool_rows else 0.0,
            "agreements_per_step": rounds / steps,
            "rows_handed_over_fraction": moved / max(steps * world * b, 1),
            "carry_rows_at_end": int(sum(len(c) for c in carry))}


def _simulate_bucket(cfg, depths, world, mode, epochs, seed, stats: _Stats) -> dict[str, Any]:
    from volvlp_ray.data.bucketing import bucket_by_depth, rebatch
    from volvlp_ray.data.pipeline import draw_chunk

    b, pz, pool = cfg.train.batch_size, cfg.model.patch[0], cfg.data.bucket_pool
    for epoch in range(epochs):
        shares = _deal(depths, world, epoch, seed)
        per_rank_batches = []
        for r in range(world):
            d = depths[shares[r]]
            if mode == "organ":
                rng = np.random.default_rng([seed, epoch, r, 31])
                d = np.asarray([draw_chunk(int(x), pz, tuple(cfg.data.chunk_depth), rng)[0] for x in d])
            stream = ({"depth": d[i:i + b * pool]} for i in range(0, len(d), b * pool))
            batches = rebatch(stream, b * pool, drop_last=pool == 1)
            if pool > 1:
                batches = bucket_by_depth(batches, b, np.random.default_rng([seed, epoch, r, 5]))
            per_rank_batches.append([np.asarray(x["depth"]) for x in batches if len(x["depth"]) == b])
        for step in zip(*per_rank_batches):
            per_rank = []
            for dep in step:
                real = -(-dep // pz)
                per_rank.append((real, int(real.max())))
            stats.step(per_rank)
    return {}


def simulate(cfg, world: int, mode: str, sampler: str, depths: np.ndarray, epochs: int, seed: int) -> dict[str, Any]:
    """One (world size, text mode, sampler) cell of the report."""
    from volvlp_ray.models.vision import vit3d_flops_per_sample

    dims = {"dim": 0, "depth": 0}
    from volvlp_ray.models.vision import VIT3D_PRESETS

    dims = dict(VIT3D_PRESETS[cfg.model.preset], patch=tuple(cfg.model.patch), pool=cfg.model.pool)
    tpp = (cfg.data.in_plane_size // cfg.model.patch[1]) * (cfg.data.in_plane_size // cfg.model.patch[2])
    cache: dict[int, float] = {}

    def flops(tokens: int) -> float:
        if tokens not in cache:
            cache[tokens] = vit3d_flops_per_sample(dims, tokens)
        return cache[tokens]

    stats = _Stats(flops, tpp, cfg.model.patch[0])
    t0 = time.perf_counter()
    fn = _simulate_equal if sampler == "equal" else _simulate_bucket
    extra = fn(cfg, depths, world, mode, epochs, seed, stats)
    return {**stats.report(), **extra, "simulated_seconds": round(time.perf_counter() - t0, 3)}


def run(config: str | None = None, overrides: list[str] | None = None, worlds: list[int] = (1, 8, 64),
        modes: list[str] = ("report", "organ"), baseline: bool = True, rows_per_rank: int = 512, epochs: int = 3,
        depth_range: tuple[int, int] | None = None, out: str | None = None) -> dict[str, Any]:
    from volvlp_ray.config import config_to_dict, load_config

    cfg = load_config(config, list(overrides or []))
    seed = cfg.seed
    n = rows_per_rank * max(worlds)
    depths = _depth_stream(n, seed, float(cfg.data.spacing[0]), depth_range)
    report: dict[str, Any] = {
        "config": config, "overrides": list(overrides or []),
        "setup": {
            "preset": cfg.model.preset, "patch": list(cfg.model.patch), "in_plane_size": cfg.data.in_plane_size,
            "batch_size_per_rank": cfg.train.batch_size, "chunk_depth": list(cfg.data.chunk_depth),
            "pool_batches": cfg.data.pool_batches, "max_pool_batches": cfg.data.max_pool_batches,
            "bucket_pool": cfg.data.bucket_pool, "epochs": epochs, "rows_per_rank_per_epoch": rows_per_rank,
            "depth_source": (f"uniform {depth_range[0]}-{depth_range[1]} slices" if depth_range else
                             f"synthetic generator extents / {cfg.data.spacing[0]} mm"),
            "depth_slices": {"min": int(depths.min()), "median": float(np.median(depths)), "max": int(depths.max())},
        },
        "target_useful_work_fraction": TARGET,
        "results": [],
    }
    for mode in modes:
        for world in worlds:
            # the same dataset at every world size: rows_per_rank at the largest; fewer ranks take it all
            row: dict[str, Any] = {"mode": mode, "world": world}
            row["equal"] = simulate(cfg, world, mode, "equal", depths, epochs, seed)
            if baseline:
                row["bucket"] = simulate(cfg, world, mode, "bucket", depths, epochs, seed)
                row["useful_work_ratio"] = row["equal"]["useful_work_fraction"] / row["bucket"]["useful_work_fraction"]
            print(f"[scale] {mode:6s} world {world:3d}: useful work {row['equal']['useful_work_fraction']:.3f}"
                  + (f" (per-rank bucketing {row['bucket']['useful_work_fraction']:.3f})" if baseline else "")
                  + f", masked steps {row['equal']['masked_step_fraction']:.3f}, "
                  f"{row['equal']['distinct_token_lengths']} lengths", flush=True)
            report["results"].append(row)
    report["meets_target"] = all(r["equal"]["useful_work_fraction"] >= TARGET for r in report["results"]
                                 if r["world"] >= 8)
    report["resolved_config"] = config_to_dict(cfg)["data"]
    write_report(out, report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (model, data and batch settings)")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 8, 64], help="simulated ranks (default 1 8 64)")
    parser.add_argument("--modes", nargs="+", default=["report", "organ"], choices=["report", "organ"])
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also per-rank depth bucketing (data.sampler=bucket), the state before (default on)")
    parser.add_argument("--rows-per-rank", type=int, default=512,
                        help="rows per rank per epoch at the largest world size (the dataset is that times it)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--depth-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="depths uniform in [LO, HI] slices instead of the generator's")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=8")


def main(args: argparse.Namespace) -> dict[str, Any]:
    report = run(config=args.config, overrides=args.overrides, worlds=args.world, modes=args.modes,
                 baseline=args.baseline, rows_per_rank=args.rows_per_rank, epochs=args.epochs,
                 depth_range=tuple(args.depth_range) if args.depth_range else None, out=args.out)
    print(json.dumps({"meets_target": report["meets_target"]}), flush=True)
    return report
