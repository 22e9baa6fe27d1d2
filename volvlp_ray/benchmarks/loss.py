"""Benchmark the global contrastive loss: per-rank peak memory and step time, all-gather vs ring.

For each world size a real gloo process group is spawned (CPU, one thread per process). Each rank holds
``local_batch`` random L2-normalised features (global batch = world size x local batch) and runs the
loss forward + backward for every (local batch, exchange) configuration.

Memory is measured by accounting, not by RSS: a ``TorchDispatchMode`` sees every ATen op run during the
loss forward and backward (including the autograd engine's backward ops and the buffers the
collectives write into) and tracks the tensor storages those ops create; a storage's bytes are counted
from its creation until it is freed (a weakref finalizer on the storage). The peak of the live total is
the per-rank peak memory of the loss: activations saved for backward, gathered / received blocks,
logits, gradients. Tensors that existed before the call (the input features) are not counted.

Usage: ``python jobs/benchmark.py loss --out FILE.json`` (or ``python -m volvlp_ray.benchmarks.loss``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from volvlp_ray.benchmarks import write_report
from volvlp_ray.losses import build_loss

__all__ = ["run", "add_arguments", "main", "LiveTensorBytes", "MEMORY_METHOD"]

MEMORY_METHOD = (
    "TorchDispatchMode accounting of tensor storages created inside the loss forward+backward (ATen ops "
    "incl. autograd backward ops and collective receive buffers); bytes counted from creation until the "
    "storage is freed (weakref finalizer); peak of the live total per rank, max over memory_iters steps; the "
    "input features are excluded, the feature gradients are included."
)
TIME_METHOD = (
    "wall time of loss forward+backward after a barrier, median over iterations per rank; the reported "
    "step time is the slowest rank's median. All processes share the host's CPU cores (1 torch thread "
    "each): beyond the core count times measure contention, not scaling."
)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while the mode is active and still alive.

    ``peak`` and ``live`` are in bytes. Storages first seen as an op *input* existed before and are
    ignored, so views and in-place updates of pre-existing tensors are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._known:
                self._known[t.untyped_storage()] = False  # pre-existing: never counted
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._known:
                    nbytes = storage.nbytes()
                    self._known[storage] = True
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, nbytes)
        return out


def _step(loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
    for t in (x, y, scale, bias):
        t.grad = None
    loss_fn(x, y, scale, bias).backward()


def _measure(
    kind: str, exchange: str, batch: int, dim: int, iters: int, warmup: int, memory_iters: int, seed: int
) -> dict[str, Any]:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed + rank)
    x = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    y = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    kwargs: dict[str, Any] = {"exchange": exchange}
    if kind == "swca":  # intra-modal term only: needs no metadata
        kwargs.update(alpha=0.5, spatial_weight=0.0, knowledge_weight=0.0, intra_weight=1.0)
    loss_fn = build_loss(kind, **kwargs)
    for _ in range(warmup):
        _step(loss_fn, x, y, scale, bias)
    peak = 0
    for _ in range(memory_iters):  # buffers held by collectives' work objects free asynchronously: take the max
        dist.barrier()
        with LiveTensorBytes() as tracker:
            _step(loss_fn, x, y, scale, bias)
        peak = max(peak, tracker.peak)
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        _step(loss_fn, x, y, scale, bias)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "time_ms": 1e3 * statistics.median(times)}


def _worker(rank: int, world: int, init_file: str, out_dir: str, config: dict[str, Any]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(config["threads"])
        rows = []
        for batch in config["batch_sizes"]:
            for exchange in config["exchanges"]:
                settings = {k: config[k] for k in ("dim", "iters", "warmup", "memory_iters", "seed")}
                m = _measure(config["loss"], exchange, batch, **settings)
                rows.append({"local_batch": batch, "exchange": exchange, **m})
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _summary(results: list[dict[str, Any]], world_sizes: Sequence[int]) -> dict[str, Any]:
    """Peak-memory ratio between the largest world size and 2 (or the smallest > 1), per exchange/batch."""
    multi = sorted(w for w in world_sizes if w > 1)
    out: dict[str, Any] = {}
    if len(multi) < 2:
        return out
    lo, hi = multi[0], multi[-1]
    peaks = {(r["exchange"], r["local_batch"], r["world_size"]): r["peak_bytes_max"] for r in results}
    for exchange, batch in sorted({(r["exchange"], r["local_batch"]) for r in results}):
        series = [peaks[(exchange, batch, w)] for w in multi]
        out[f"{exchange}/local_batch={batch}"] = {
            f"peak_ratio_{hi}_over_{lo}": round(peaks[(exchange, batch, hi)] / peaks[(exchange, batch, lo)], 4),
            "max_over_min_across_world_sizes": round(max(series) / min(series), 4),
            "peak_mib": {str(w): round(peaks[(exchange, batch, w)] / 2**20, 3) for w in multi},
        }
    ring = [v for k, v in out.items() if k.startswith("ring/")]
    out["target"] = f"ring peak per rank within 1.1x from {lo} to {hi} ranks while gather grows"
    out["ring_within_1.1x"] = bool(ring) and all(v["max_over_min_across_world_sizes"] <= 1.1 for v in ring)
    return out


def run(
    out: str | None = None,
    world_sizes: Sequence[int] = (1, 2, 4, 8),
    batch_sizes: Sequence[int] = (64, 256),
    dim: int = 256,
    exchanges: Sequence[str] = ("gather", "ring"),
    loss: str = "sigmoid",
    iters: int = 5,
    warmup: int = 1,
    memory_iters: int = 2,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the benchmark; write JSON to ``out`` (if given) and return the same dict.

    Args:
        world_sizes: numbers of gloo processes.
        batch_sizes: *local* (per-rank) batch sizes; the global batch is ``world_size * local_batch``.
        dim: embedding width E. exchanges: ``"gather"`` and/or ``"ring"``.
        loss: ``"sigmoid"`` or ``"swca"`` (sigmoid form, intra-modal term on).
        iters / warmup: timed / untimed steps per configuration; memory_iters: tracked steps (max taken).
        threads: torch threads per process.
    """
    config = {
        "batch_sizes": list(batch_sizes),
        "dim": dim,
        "exchanges": list(exchanges),
        "loss": loss,
        "iters": iters,
        "warmup": warmup,
        "memory_iters": memory_iters,
        "threads": threads,
        "seed": seed,
    }
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp, config), nprocs=world, join=True)
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
        for i, row in enumerate(ranks[0]):
            per_rank = [r[i] for r in ranks]
            results.append(
                {
                    "world_size": world,
                    "local_batch": row["local_batch"],
                    "global_batch": world * row["local_batch"],
                    "exchange": row["exchange"],
                    "peak_bytes_per_rank": [r["peak_bytes"] for r in per_rank],
                    "peak_bytes_max": max(r["peak_bytes"] for r in per_rank),
                    "peak_mib_max": round(max(r["peak_bytes"] for r in per_rank) / 2**20, 3),
                    "time_ms_per_rank": [round(r["time_ms"], 3) for r in per_rank],
                    "step_time_ms": round(max(r["time_ms"] for r in per_rank), 3),
                }
            )
    report = {
        "benchmark": "loss",
        "config": {**config, "world_sizes": list(world_sizes), "dtype": "float32", "device": "cpu", "backend": "gloo"},
        "memory_method": MEMORY_METHOD,
        "time_method": TIME_METHOD,
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
        "summary": _summary(results, world_sizes),
    }
    write_report(out, report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``run``."""
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="per-rank batch sizes")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--exchanges", nargs="+", default=["gather", "ring"], choices=["gather", "ring"])
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "swca"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-iters", type=int, default=2, help="tracked steps per configuration (max)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run with parsed arguments; print the summary."""
    report = run(
        out=args.out,
        world_sizes=args.world_sizes,
        batch_sizes=args.batch_sizes,
        dim=args.dim,
        exchanges=args.exchanges,
        loss=args.loss,
        iters=args.iters,
        warmup=args.warmup,
        memory_iters=args.memory_iters,
        threads=args.threads,
    )
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    main(_parser.parse_args())
