"""Checkpoint state beyond DeepSpeed's own: safe loading, per-rank RNG and data position.

A training checkpoint (one Ray Train checkpoint directory, merged from every rank's upload) holds

- ``ckpt/``: DeepSpeed's sharded state (module, ZeRO-partitioned optimizer, LR scheduler, ``client_state``
  with the step) written by ``engine.save_checkpoint``;
- ``worker_state/rank_{r}.pt``: each rank's RNG states (Python, NumPy, torch) and its data position
  (epoch, batches consumed in that epoch);
- with ``data.sampler=equal``, ``worker_state/carry_rank_{r}.npz`` (the rows the epoch's pool started with),
  ``trained_rank_{r}.npz`` (keys trained in the epoch since) and ``excluded.npz`` (rank 0: keys left out of the
  epoch's stream after a resume on another number of workers), plain arrays (``train/elastic.py``);
- ``progress.json`` (rank 0: step, epoch, batch in epoch, world size, ``epoch_base``), ``config.yaml`` (rank 0),
  and in the final checkpoint ``export/`` (``VLP.from_pretrained``).

Every load uses ``torch.load(..., weights_only=True)``. DeepSpeed's optimizer files hold three small
DeepSpeed classes besides tensors; :func:`use_safe_loading` allows exactly those and nothing else, so a
checkpoint cannot run code when it is loaded.

Atomicity comes from Ray Train: each rank writes into a local temporary folder and ``ray.train.report``
uploads it; the checkpoint is registered (and becomes what ``get_checkpoint`` returns after a failure) only
once every rank's upload has finished. A crash while saving leaves the previous registered checkpoint in use.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "deepspeed_safe_globals",
    "load_worker_state",
    "safe_load",
    "save_worker_state",
    "use_safe_loading",
]

WORKER_STATE_DIR = "worker_state"


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed (0.19) pickles into ZeRO optimizer files, all plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", extra_globals: list[Any] | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``; ``extra_globals`` are the only non-tensor classes allowed."""
    with torch.serialization.safe_globals(list(extra_globals or [])):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_safe_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file with ``weights_only=True``: DeepSpeed's torch checkpoint
    engine is replaced by a subclass whose ``load`` allows tensors plus :func:`deepspeed_safe_globals` only."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"expected DeepSpeed's TorchCheckpointEngine, found {type(current).__name__}: "
                           "weights-only loading is implemented for the default engine only")

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location, extra_globals=deepspeed_safe_globals())

    current.__class__ = SafeCheckpointEngine  # same instance and settings, safe ``load``


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python_version": int(py[0]),
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((s["python_version"], tuple(int(x) for x in s["python_state"].tolist()), None))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["torch_cuda"]:
        torch.cuda.set_rng_state_all(s["torch_cuda"])


def save_worker_state(ckpt_dir: str | os.PathLike, rank: int, *, step: int, epoch: int, batch_in_epoch: int) -> Path:
    """This rank's RNG states and data position -> ``worker_state/rank_{rank}.pt`` (tensors and numbers only)."""
    out = Path(ckpt_dir) / WORKER_STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank_{rank}.pt"
    torch.save({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": _rng_state()}, path)
    return path


def load_worker_state(ckpt_dir: str | os.PathLike, rank: int, restore_rng: bool = True) -> dict[str, Any] | None:
    """Read (and by default apply the RNG part of) this rank's state; ``None`` when the checkpoint has none for
    this rank (e.g. it was written by a run with fewer workers)."""
    path = Path(ckpt_dir) / WORKER_STATE_DIR / f"rank_{rank}.pt"
    if not path.is_file():
        return None
    state = safe_load(path)
    if restore_rng:
        _set_rng_state(state["rng"])
    return state
