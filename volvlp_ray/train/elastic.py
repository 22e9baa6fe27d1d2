"""Elastic resume: a checkpoint written by N workers, resumed by M != N workers.

**Model and optimizer.** Every checkpoint records its world size (``progress.json`` and DeepSpeed's
``client_state``: ``world_size``; older checkpoints: the number of ``worker_state/rank_*.pt``). A resume on another
number of workers, under ZeRO 1/2/3, re-partitions the state through DeepSpeed's *universal checkpoint*: on each
node one worker converts the sharded checkpoint (``deepspeed.checkpoint.ds_to_universal``, in-process, every file
read with ``torch.load(weights_only=True)``) into a node-local temporary folder, the other workers wait, and all
load it with the engine built with ``checkpoint.load_universal`` (:func:`load_resized`): fp32 master weights and
Adam's moments, consolidated per parameter, then cut for the new partitioning; the LR schedule, step counter and
``client_state`` come from the model-state file as usual. ZeRO-0 needs no conversion: its optimizer state is whole
in rank 0's model-state file and loads on any number of workers. Not supported (a clear error):
``train.optimizer=muon`` with ZeRO >= 1 (DeepSpeed 0.19's universal checkpoint does not carry Muon's momentum).

**Data position** (``data.sampler=equal``). A checkpoint holds, per rank, the rows its pool started the epoch with
(``worker_state/carry_rank_{r}.npz``) and the keys of the samples it has trained in the epoch since then
(``trained_rank_{r}.npz``); rank 0 also the keys dropped from the epoch's stream (``excluded.npz``, see below) and
``progress.json`` the batches of the epoch trained before this stream began (``epoch_base``). On the same number of
workers the epoch is replayed exactly (same carry, same stream, same exclusions; the first batches skipped). On
another number (:func:`resized_epoch_start`) every new rank reads every old rank's files: the old carries less the
trained rows, rank ``r`` taking those of old ranks ``r' % M == r``, and the stream of the epoch dropping the keys
trained before (counted, so a sample that was both carried and streamed is trained as often as in an
uninterrupted epoch). So no sample of the interrupted epoch is trained twice, and none is skipped: what is not
trained by the epoch's end is carried into the next epoch as always. ``data.sampler=bucket`` on another number of
workers restarts the interrupted epoch (its first batches' samples are trained again; per-rank bucketing needs
the equal row counts of Ray's split, which dropping trained rows would break).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from volvlp_ray import console
from volvlp_ray.train.checkpoint import WORKER_STATE_DIR, deepspeed_safe_globals

__all__ = [
    "EpochStart", "TrainedKeys", "check_resizable", "checkpoint_world_size", "convert_to_universal", "drop_keys",
    "load_resized", "resume_data_position", "resized_epoch_start", "save_data_position", "weights_only_torch_load",
]

PROGRESS_FILE = "progress.json"


class EpochStart(list):
    """The rows this rank's pool starts an epoch with (a list: the carry), and what else an epoch resumed on
    another number of workers started from: ``excluded``, keys dropped from the epoch's stream (trained before, by
    any rank; repeats count); ``base``, the epoch's batches trained before this stream began (batch numbers continue
    from it); ``trained``, keys this rank trained since this start before the stream was (re)built (a same-size
    resume's replay skips their batches)."""

    def __init__(self, rows=(), *, excluded: list[str] | None = None, base: int = 0, trained: list[str] | None = None):
        super().__init__(rows)
        self.excluded = list(excluded or [])
        self.base = int(base)
        self.trained = list(trained or [])


class TrainedKeys:
    """The main loop's record of the keys this rank has trained in the current epoch since its ``EpochStart``."""

    def __init__(self):
        self.epoch: int | None = None
        self.keys: list[str] = []

    def add(self, epoch: int, start: EpochStart, keys: list[str]) -> None:
        if epoch != self.epoch:
            self.epoch, self.keys = epoch, list(getattr(start, "trained", []))
        self.keys.extend(keys)


def drop_keys(rows, excluded: list[str]):
    """``rows`` less one row per occurrence of its key in ``excluded``."""
    left = Counter(excluded)
    for r in rows:
        k = str(r["key"])
        if left[k] > 0:
            left[k] -= 1
            continue
        yield r


# -- what a checkpoint says ---------------------------------------------------------------------------------


def checkpoint_world_size(checkpoint) -> int | None:
    """The number of workers that wrote a Ray Train checkpoint: ``progress.json``'s ``world_size``, else (older
    checkpoints) the number of ``worker_state/rank_*.pt``. Read through the checkpoint's filesystem (no download)."""
    import pyarrow.fs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if fs.get_file_info(f"{root}/{PROGRESS_FILE}").type != pyarrow.fs.FileType.NotFound:
        with fs.open_input_stream(f"{root}/{PROGRESS_FILE}") as f:
            progress = json.loads(f.read().decode())
        if "world_size" in progress:
            return int(progress["world_size"])
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{WORKER_STATE_DIR}", allow_not_found=True))
    ranks = [i for i in infos if i.base_name.startswith("rank_") and i.base_name.endswith(".pt")]
    return len(ranks) or None


def check_resizable(cfg, saved_world: int, world: int) -> None:
    """A clear error for a resize this code cannot do."""
    if cfg.train.optimizer == "muon" and cfg.train.zero_stage > 0:
        raise ValueError(
            f"the checkpoint was written by {saved_world} workers and this run has {world}: re-partitioning ZeRO-"
            f"{cfg.train.zero_stage} state goes through DeepSpeed's universal checkpoint, which (DeepSpeed 0.19) does "
            "not carry Muon's momentum; resume with scaling.num_workers="
            f"{saved_world}, or train with train.zero_stage=0 (its optimizer state is not partitioned)")


# -- model and optimizer -------------------------------------------------------------------------------------


@contextlib.contextmanager
def weights_only_torch_load():
    """While it lasts, every ``torch.load`` (DeepSpeed's universal-checkpoint code calls it with
    ``weights_only=False``) reads with ``weights_only=True``, allowing DeepSpeed's plain data classes only."""
    original = torch.load
    allowed = deepspeed_safe_globals()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        kwargs.pop("mmap", None)
        with torch.serialization.safe_globals(allowed):
            return original(f, map_location=map_location, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert_to_universal(src: str, out: str) -> str:
    """DeepSpeed's sharded ZeRO checkpoint folder ``src`` (one tag) -> a universal checkpoint folder ``out``
    (``ds_to_universal``, serial, in this process, every file read weights-only). Returns its log."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=src, output_folder=out, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    buf = io.StringIO()
    try:
        with weights_only_torch_load(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            ds_to_universal.main(args)
    except Exception as exc:
        raise RuntimeError(f"converting {src} to DeepSpeed's universal checkpoint failed: {exc}\n{buf.getvalue()}") \
            from exc
    return buf.getvalue()


def load_resized(engine, ckpt_dir: str, tag: str, zero_stage: int, *, node_rank: int, local_rank: int,
                 rank: int = 0) -> tuple[Any, dict]:
    """``engine.load_checkpoint`` of a checkpoint written by another number of workers. ZeRO-0: as is. ZeRO 1-3
    (the engine built with ``checkpoint.load_universal``, see ``deepspeed_config``): local rank 0 of each node
    converts it into a node-local temporary folder while the node's other workers wait; every worker loads it; the
    folder is removed. Collective: every rank calls it."""
    import torch.distributed as dist

    if zero_stage == 0:  # no partitioned state: rank 0's model-state file holds the whole optimizer state
        return engine.load_checkpoint(ckpt_dir, tag=tag)
    world = dist.get_world_size()
    mine = tempfile.mkdtemp(prefix="volvlp-universal-") if local_rank == 0 else None
    places: list = [None] * world
    dist.all_gather_object(places, (node_rank, mine))
    out = next(p for n, p in places if n == node_rank and p)
    try:
        error = None
        if local_rank == 0:
            t0 = time.perf_counter()
            try:
                convert_to_universal(os.path.join(ckpt_dir, tag), os.path.join(out, tag))
                if rank == 0:
                    console.info(f"[train] ZeRO-{zero_stage} checkpoint converted to DeepSpeed's universal checkpoint "
                                 f"in {time.perf_counter() - t0:.1f}s (re-partitioned for {world} workers)")
            except Exception as exc:  # every rank learns of it (no one waits forever)
                error = str(exc)
        errors: list = [None] * world
        dist.all_gather_object(errors, error)
        if any(errors):
            raise RuntimeError(next(e for e in errors if e))
        with weights_only_torch_load():
            result = engine.load_checkpoint(out, tag=tag)
        dist.barrier()  # nobody removes the folder while another worker of the node still reads it
        return result
    finally:
        if mine:
            shutil.rmtree(mine, ignore_errors=True)


# -- data position -------------------------------------------------------------------------------------------


def save_data_position(ckpt_dir: str | os.PathLike, rank: int, start: list, trained: list[str]) -> None:
    """Into ``worker_state/``: this rank's epoch start (``start``: an ``EpochStart``, or a plain list of carry rows)
    and trained keys; rank 0: the stream's exclusions (the same on every rank)."""
    from volvlp_ray.data.sampler import save_carry, save_keys

    d = Path(ckpt_dir) / WORKER_STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    save_carry(d / f"carry_rank_{rank}.npz", list(start))
    save_keys(d / f"trained_rank_{rank}.npz", trained)
    if rank == 0:
        save_keys(d / "excluded.npz", getattr(start, "excluded", []))


def resized_epoch_start(ckpt_dir: str | os.PathLike, rank: int, world: int, saved_world: int,
                        base: int) -> EpochStart | None:
    """This new rank's start of the interrupted epoch (see the module docstring), from every old rank's files;
    ``None`` when the checkpoint has no record of what was trained (written before this existed)."""
    from volvlp_ray.data.sampler import load_carry, load_carry_keys, load_keys

    d = Path(ckpt_dir) / WORKER_STATE_DIR
    paths = [d / f"trained_rank_{r}.npz" for r in range(saved_world)]
    if not all(p.is_file() for p in paths):
        return None
    trained: Counter = Counter()
    for p in paths:
        trained.update(load_keys(p))
    excluded = load_keys(d / "excluded.npz") if (d / "excluded.npz").is_file() else []
    carry: list = []
    for r in range(saved_world):  # every rank walks all old carries: all reach the same exclusions
        path = d / f"carry_rank_{r}.npz"
        if not path.is_file():
            continue
        keys = load_carry_keys(path)
        rows = load_carry(path) if r % world == rank else None
        for i, k in enumerate(keys):
            if trained[k] > 0:  # trained already: neither carried nor streamed again
                trained[k] -= 1
            elif rows is not None:
                carry.append(rows[i])
    return EpochStart(carry, excluded=excluded + list(trained.elements()), base=base)


def resume_data_position(ckpt_dir: str | os.PathLike, cfg, rank: int, world: int, saved_world: int,
                         progress: dict) -> tuple[EpochStart | None, int]:
    """(the interrupted epoch's start for this rank, batches of it to skip) for a resumed run. Same number of
    workers: the saved start and an exact replay. Another: ``resized_epoch_start`` (``data.sampler=equal``) or the
    epoch from its beginning (``bucket``, or a checkpoint without the record), said on rank 0."""
    from volvlp_ray.data.sampler import load_carry, load_keys

    epoch, batch = int(progress.get("epoch", 0)), int(progress.get("batch_in_epoch", 0))
    d = Path(ckpt_dir) / WORKER_STATE_DIR
    equal = cfg.data.sampler == "equal"
    if saved_world == world:
        if not equal:
            return None, batch
        base = int(progress.get("epoch_base", 0))
        carry = load_carry(d / f"carry_rank_{rank}.npz") if (d / f"carry_rank_{rank}.npz").is_file() else []
        excluded = load_keys(d / "excluded.npz") if (d / "excluded.npz").is_file() else []
        trained = load_keys(d / f"trained_rank_{rank}.npz") if (d / f"trained_rank_{rank}.npz").is_file() else []
        return EpochStart(carry, excluded=excluded, base=base, trained=trained), batch - base
    start = resized_epoch_start(ckpt_dir, rank, world, saved_world, base=batch) if equal else None
    if start is not None:
        if rank == 0:
            console.info(f"[train] data: epoch {epoch} continues on {world} workers (checkpoint of {saved_world}): "
                         f"{len(start.excluded)} samples trained in it before are left out of its stream, the old "
                         "pools' rows are dealt to the new workers")
        return start, 0
    if rank == 0:
        why = ("data.sampler=bucket" if not equal else
               "the checkpoint has no record of the samples trained in it (written before elastic resume existed)")
        console.warn(f"[train] warning: epoch {epoch} restarts from its beginning on {world} workers (checkpoint of "
                     f"{saved_world}; {why}): the samples of its first {batch} batches are trained again")
    carry: list = []
    if equal:  # the epoch's first pools: every old rank's carry, dealt
        for r in range(saved_world):
            p = d / f"carry_rank_{r}.npz"
            if r % world == rank and p.is_file():
                carry.extend(load_carry(p))
    return EpochStart(carry), 0
