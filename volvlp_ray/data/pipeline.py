"""The training/evaluation stream: shards -> Ray Data (decode, chunk + text, tokenise) -> padded batches.

    ds = build_dataset(cfg, "train", tokenizer_dir)          # a ray.data.Dataset of rows, volumes int16
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        tensors = collate(batch, patch_z=4, hu_window=(-1000, 1000))

Rows keep volumes as int16 (half the object-store traffic of float32; ``data.normalise_in=loader`` makes them
float32 in [-1, 1] here instead); ``collate`` pads depth at the end to a common multiple of the z patch (with air)
and returns ``depths`` for masking, and normalises to [-1, 1] (or, with ``hu=True``, as the training loop uses it,
leaves int16 HU for ``normalise_tensor`` on the device).

With ``data.volume_transport=direct`` (the training stream's default) a row carries no voxels but where its
slices lie in the shard (``volume_location``, ``volume_offset``, ``volume_shape``: a ``shards.VolumeRef``), and
``collate`` reads them from the shard into the padded batch (``reader.read_volumes``), a reused buffer: one copy
per byte where the object store path makes about five. The batches are the same, bitwise.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
import zlib
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from volvlp_ray.config import Config
from volvlp_ray.data import storage
from volvlp_ray.data.negation import polarity_vector
from volvlp_ray.data.organs import chunk_text
from volvlp_ray.data.reader import read_shards, read_volumes, resolve_paths
from volvlp_ray.data.shards import (CORE_MEMBERS, LABELMAP_MEMBER, DecodeError, VolumeRef, decode_sample,
                                    intact_shards, read_manifest)
from volvlp_ray.data.transforms import normalise

__all__ = [
    "OrganText", "StepBatcher", "TrainDatasetFactory", "draw_chunk", "tokenize", "build_dataset", "collate", "latest_progress", "normalise_tensor", "read_corpus",
    "read_samples", "shard_files", "study_id",
]

log = logging.getLogger(__name__)
_counter = itertools.count()


def shard_files(cfg: Config, split: str) -> list[str]:
    """The split's shards listed in its manifest, less any missing or truncated one (logged as an error);
    local paths, or locations on the object store ``data.shards_dir`` names."""
    return intact_shards(storage.child(storage.normalise(cfg.shards_path), split))


def read_samples(cfg: Config, files: list[str], **kwargs: Any):
    """The shards as a Ray Dataset of raw samples (``__key__``, ``volume.npy``/``report.txt``/``meta.json``
    bytes, ``__url__``), read the way ``data.reader`` says. Shards on an object store: the read tasks get the
    driver's storage credentials (``storage.task_runtime_env``)."""
    env = storage.task_runtime_env(*files)
    if env:
        kwargs["runtime_env"] = env
    kwargs.setdefault("suffixes", list(CORE_MEMBERS))  # not the label maps (segmentation job only)
    if cfg.data.reader == "webdataset":
        import ray.data

        if kwargs.pop("refs", None):
            raise ValueError("volume references need data.reader=shards")
        kwargs["filesystem"], files = resolve_paths(files)
        return ray.data.read_webdataset(files, decoder=None, **kwargs)
    kwargs["refs"] = (*kwargs.get("refs", ()), LABELMAP_MEMBER)  # skipped with a seek, never read
    return read_shards(files, **kwargs)


def study_id(key: str) -> int:
    """``train_12_a_1`` -> a stable int64 id of the study ``train_12_a`` (chunks of one study share it)."""
    return zlib.crc32(key.rsplit("_", 1)[0].encode()) & 0x7FFFFFFF


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class _ToRow:
    """Ray Data flat_map: raw tar members -> zero or one training row (bad samples are logged and dropped)."""

    def __init__(self, cfg: Config, tokenizer_dir: str, training: bool, locations: dict[str, str] | None = None):
        # locations: the shard reader's path of each shard -> its location (URI with query), for VolumeRef rows
        self.locations = locations
        self.patch_z = cfg.model.patch[0]
        self.training = training
        self.text_mode = cfg.data.text_mode if training else "report"
        self.chunk = cfg.data.chunk_depth
        self.max_len = cfg.data.max_text_length
        self.seed = cfg.seed
        self.findings = training and cfg.loss.negation_pairs > 0  # only the negation-pair loss reads them
        self.hu_window = tuple(cfg.data.hu_window) if cfg.data.normalise_in == "loader" else None
        self.tokenizer_dir = tokenizer_dir
        # data.sampler=equal: rows keep the whole volume; the step's agreed length cuts it (and, in organ mode,
        # the chunk's text is made) at batch time (``StepBatcher``)
        self.whole = training and cfg.data.sampler == "equal"
        self.organ_text = OrganText(cfg)

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            s = decode_sample(row, None if self.locations is None else self.locations.get(row["__url__"]))
        except DecodeError as exc:
            from volvlp_ray import console

            console.warn(f"[data] warning: skipping a bad shard sample: {exc} (shard {row.get('__url__')})")
            return []
        vol, meta = s["volume"], s["meta"]
        depth = vol.shape[0]
        pz = self.patch_z
        if depth < pz:
            from volvlp_ray import console

            console.warn(f"[data] warning: skipping {s['key']}: {depth} slices, fewer than the z patch {pz}")
            return []
        sz = float(meta["spacing"][0])
        z0_mm = float(meta.get("z_origin_mm", 0.0))
        if self.whole:
            return [self._whole_row(s, vol, meta, depth, sz, z0_mm)]
        if self.text_mode == "organ":
            rng = np.random.default_rng([self.seed, zlib.crc32(s["key"].encode()), next(_counter)])
            n, start = draw_chunk(depth, pz, self.chunk, rng)
            vol = vol[start : start + n]
            z_range = (z0_mm + (start - 0.5) * sz, z0_mm + (start + n - 0.5) * sz)
            text = self.organ_text(meta, z_range)
        else:
            n, start = depth, 0
            text = s["report"]
        ids, mask, truncated = tokenize(_tokenizer(self.tokenizer_dir), text, self.max_len)
        row = {
            "key": s["key"],
            **self._volume(vol),
            "depth": int(n),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": np.asarray(meta["labels"], dtype=np.float32),
            "study_id": study_id(s["key"]),
            "z_center_mm": np.float32(z0_mm + (start + n / 2 - 0.5) * sz),
            "text_truncated": bool(truncated),
        }
        if self.findings:  # what the trained-on text affirms / negates, per label
            row["findings"] = polarity_vector(text)
        if not self.training:  # evaluation: where the slices lie and the organ extents (organ classification)
            row.update(z_origin_mm=np.float32(z0_mm), z_spacing_mm=np.float32(sz),
                       organs_json=json.dumps(meta.get("organs") or {}))
        return [row]

    def _volume(self, vol) -> dict[str, Any]:
        if isinstance(vol, VolumeRef):  # data.volume_transport=direct: collate reads the slices
            return {"volume_location": vol.location, "volume_offset": vol.offset,
                    "volume_shape": np.asarray(vol.shape, dtype=np.int64)}
        # int16 HU, or with data.normalise_in=loader float32 in [-1, 1]
        return {"volume": np.ascontiguousarray(vol) if self.hu_window is None else normalise(vol, self.hu_window)}

    def _whole_row(self, s: dict[str, Any], vol, meta: dict[str, Any], depth: int, sz: float, z0_mm: float):
        """The whole volume and what its step needs to cut it: z origin and spacing; report mode: the report's
        tokens (the text does not depend on the cut); organ mode: the organ metadata (the chunk's
        text is made once its z-range is known)."""
        row = {
            "key": s["key"],
            **self._volume(vol),
            "depth": int(depth),
            "labels": np.asarray(meta["labels"], dtype=np.float32),
            "study_id": study_id(s["key"]),
            "z_origin_mm": np.float32(z0_mm),
            "z_spacing_mm": np.float32(sz),
        }
        if self.text_mode == "organ":
            row["organ_json"] = json.dumps({k: meta.get(k, d) for k, d in
                                            (("organ_findings", {}), ("organs", {}), ("impressions", ""))})
            return row
        ids, mask, truncated = tokenize(_tokenizer(self.tokenizer_dir), s["report"], self.max_len)
        row.update(input_ids=ids, attention_mask=mask, text_truncated=bool(truncated))
        if self.findings:
            row["findings"] = polarity_vector(s["report"])
        return row


class OrganText:
    """A chunk's organ-wise text from its sample's metadata and z-range (``organs.chunk_text``), with the config's
    choices: ``data.organ_impression`` (append the Impressions) and ``data.empty_chunk_text``."""

    def __init__(self, cfg: Config):
        self.impression, self.empty = cfg.data.organ_impression, cfg.data.empty_chunk_text

    def __call__(self, meta: dict[str, Any], z_range_mm: tuple[float, float]) -> str:
        return chunk_text(meta.get("organ_findings") or {}, meta.get("organs") or {}, z_range_mm,
                          impression=str(meta.get("impressions") or "") if self.impression else "",
                          empty_text=self.empty)


def draw_chunk(depth: int, patch_z: int, bounds: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """``data.sampler=bucket``'s organ-mode chunk of a volume of ``depth`` slices: (slices, first slice), the length
    a multiple of ``patch_z`` drawn uniformly within ``bounds`` (slices) and the volume."""
    pz = patch_z
    lo = max(pz, bounds[0] // pz * pz)
    hi = max(lo, min(depth, bounds[1]) // pz * pz)
    n = int(rng.integers(lo // pz, hi // pz + 1)) * pz
    n = min(n, depth // pz * pz)
    return n, int(rng.integers(0, depth - n + 1))


def tokenize(tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``text`` -> (input_ids int32 (max_len,), attention_mask int8 (max_len,), truncated)."""
    # one pass: a fast tokenizer returns the overflow as extra rows (a slow one as "overflowing_tokens")
    tok = tokenizer(text, max_length=max_len, truncation=True, padding="max_length", return_overflowing_tokens=True)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if ids and isinstance(ids[0], list):
        truncated, ids, mask = len(ids) > 1, ids[0], mask[0]
    else:
        truncated = bool(tok.get("overflowing_tokens"))
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8), truncated


class StepBatcher:
    """A sampler ``Plan`` (``data/sampler.py``) -> the numpy batch ``collate`` takes: each row's volume cut to the
    step's slices (a ``VolumeRef`` is moved, no voxels read; an array is sliced), its depth and z-centre; in organ
    mode the chunk's organ-wise text (``OrganText``: findings of the organs its z-range covers plus the general
    sentences), tokenised, and its findings vector. A row that appears K times in the plan
    (``data.chunks_per_volume``) gives K chunks, one per start."""

    def __init__(self, cfg: Config, tokenizer):
        self.mode, self.tokenizer, self.max_len = cfg.data.text_mode, tokenizer, cfg.data.max_text_length
        self.organ_text = OrganText(cfg)
        self.patch_z = cfg.model.patch[0]
        self.findings = cfg.loss.negation_pairs > 0

    def __call__(self, plan) -> dict[str, np.ndarray]:
        from volvlp_ray.data.sampler import stack_rows

        n = plan.z_patches * self.patch_z
        out = []
        for row, start in zip(plan.rows, plan.starts):
            r = dict(row)
            if "volume_offset" in r:
                ref = VolumeRef(str(r["volume_location"]), int(r["volume_offset"]), tuple(r["volume_shape"]))[start:start + n]
                r["volume_offset"], r["volume_shape"] = ref.offset, np.asarray(ref.shape, dtype=np.int64)
            else:
                r["volume"] = r["volume"][start:start + n]
            z0, sz = float(r.pop("z_origin_mm")), float(r.pop("z_spacing_mm"))
            r["depth"] = n
            r["z_center_mm"] = np.float32(z0 + (start + n / 2 - 0.5) * sz)
            if self.mode == "organ":
                meta = json.loads(str(r.pop("organ_json")))
                text = self.organ_text(meta, (z0 + (start - 0.5) * sz, z0 + (start + n - 0.5) * sz))
                r["input_ids"], r["attention_mask"], r["text_truncated"] = tokenize(self.tokenizer, text, self.max_len)
                if self.findings:
                    r["findings"] = polarity_vector(text)
            out.append(r)
        return stack_rows(out)


def build_dataset(cfg: Config, split: str, tokenizer_dir: str, training: bool | None = None, first_epoch: int = 0):
    """A Ray Dataset of rows for ``split`` ("train" or "valid").

    Training: shard files are shuffled per pass (epoch) from ``cfg.seed``; ``first_epoch`` makes the first
    pass use the file order of that epoch, so a resumed run replays the interrupted epoch in its original
    order. With ``data.deterministic`` the row order is reproducible (``preserve_order``).
    """
    training = split == "train" if training is None else training
    files = shard_files(cfg, split)
    kwargs: dict[str, Any] = {}
    if training:
        from ray.data import FileShuffleConfig

        kwargs["shuffle"] = FileShuffleConfig(seed=cfg.seed, reseed_after_execution=True)
    locations, tasks = None, len(files)
    if training and cfg.data.volume_transport == "direct":
        kwargs["refs"] = ("volume.npy",)
        locations = dict(zip(resolve_paths(files)[1], files))
        if cfg.data.samples_per_read_task:  # small rows: a task per ~samples_per_read_task samples, not per shard
            manifest = read_manifest(storage.child(storage.normalise(cfg.shards_path), split))
            samples = sum(int(spec.get("samples", 1)) for spec in manifest["shards"])
            tasks = max(1, min(tasks, -(-samples // cfg.data.samples_per_read_task)))
    ds = read_samples(cfg, files, override_num_blocks=tasks, **kwargs)
    if training and first_epoch:
        # The per-pass file order is seeded with (seed, execution index) and the index counts passes over
        # this Dataset object; a Dataset built for a resumed run starts counting at the resumed epoch.
        if not hasattr(ds.context, "_execution_idx"):
            raise RuntimeError("this Ray Data version has no DataContext._execution_idx: cannot replay epoch "
                               f"{first_epoch}'s file order on resume (set data.deterministic=false to accept "
                               "a fresh order after a resume)")
        ds.context._execution_idx = first_epoch
    return ds.flat_map(_ToRow(cfg, tokenizer_dir, training, locations))


class TrainDatasetFactory:
    """What ``TorchTrainer(datasets={"train": ...})`` gets: Ray Train calls it each time it starts the worker
    group (first start, after a worker failure, and when a driver resumes a run), and it builds the training
    Dataset positioned at the epoch of the run's latest checkpoint (``progress.json`` in it)."""

    def __init__(self, cfg: Config, tokenizer_dir: str, run_dir: str):
        from ray.data import DataContext

        self.cfg, self.tokenizer_dir, self.run_dir = cfg, tokenizer_dir, run_dir
        # it is called in Ray Train's controller, whose DataContext is not the driver's
        self.progress_bars = DataContext.get_current().enable_progress_bars

    def resume_epoch(self) -> int:
        epoch = 0
        if self.cfg.data.deterministic:
            progress = latest_progress(self.run_dir)
            epoch = int(progress["epoch"]) if progress else 0
        return epoch

    def __call__(self):
        epoch = self.resume_epoch()
        if epoch:
            log.info("training data starts at epoch %d (resumed run %s)", epoch, self.run_dir)
        ds = build_dataset(self.cfg, "train", self.tokenizer_dir, training=True, first_epoch=epoch)
        ds.context.enable_progress_bars = self.progress_bars
        return ds


def latest_progress(run_dir: str) -> dict[str, Any] | None:
    """``progress.json`` of the latest checkpoint Ray Train registered for the run at ``run_dir`` (a local
    path or URI), or ``None`` when the run has no checkpoint yet."""
    import json

    import pyarrow.fs
    from ray.train import Result

    fs, path = pyarrow.fs.FileSystem.from_uri(run_dir) if "://" in run_dir else (pyarrow.fs.LocalFileSystem(), run_dir)
    snapshot = f"{path.rstrip('/')}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type == pyarrow.fs.FileType.NotFound:
        return None
    checkpoint = Result.from_path(run_dir).checkpoint
    if checkpoint is None:
        return None
    info = checkpoint.filesystem.get_file_info(f"{checkpoint.path}/progress.json")
    if info.type == pyarrow.fs.FileType.NotFound:
        return None
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/progress.json") as f:
        return json.loads(f.read().decode())


def read_corpus(cfg: Config, split: str = "train") -> list[str]:
    """Report texts of a split (to build a tokenizer for a scratch text tower)."""
    files = shard_files(cfg, split)
    ds = read_samples(cfg, files, suffixes=["report.txt"])
    return [r["report.txt"].decode("utf-8", errors="replace") for r in ds.iter_rows()]


def normalise_tensor(volume: torch.Tensor, hu_window: tuple[float, float], dtype: torch.dtype = torch.float32):
    """int16 HU tensor -> ``dtype`` in [-1, 1] over the window; the same arithmetic as ``transforms.normalise``
    (the training loop runs it on the device, so the host and the link move int16, half the bytes)."""
    lo, hi = hu_window
    return ((volume.to(torch.float32) - (lo + hi) / 2) / ((hi - lo) / 2)).clamp_(-1.0, 1.0).to(dtype)


class _BatchBuffers:
    """int16 batch buffers reused across ``collate`` calls, so that reading a volume into the batch writes memory
    that is already mapped (a fresh buffer costs a page fault per 4 KiB: reads into one ran at a third to two
    thirds of the speed, measured). A buffer is handed out again only when nothing else refers to it (no tensor
    or view of a batch made from it is alive); ``keep`` are kept, and when all are in use a fresh one is
    returned. Held memory: ``keep`` x ``headroom`` x the largest batch (int16)."""

    def __init__(self, keep: int = 2, headroom: float = 1.25, pin: bool = False):
        self.keep, self.headroom, self.pin = keep, headroom, pin
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        with self._lock:
            for i in range(len(self._buffers)):
                if sys.getrefcount(self._buffers[i]) == 2:  # the list and this call's argument: free
                    if self._buffers[i].size < n:
                        self._buffers[i] = self._new(int(n * self.headroom))
                    return self._buffers[i][:n].reshape(shape)
            buf = self._new(int(n * self.headroom))
            if len(self._buffers) < self.keep:
                self._buffers.append(buf)
            return buf[:n].reshape(shape)


    def _new(self, n: int) -> np.ndarray:
        if self.pin:  # page-locked: the host-to-device copy runs at full speed and asynchronously
            return torch.empty(n, dtype=torch.int16, pin_memory=True).numpy()
        return np.empty(n, dtype=np.int16)


_buffers = _BatchBuffers(keep=3)  # the batch in the step, one queued, one being made (producer depth 2)
_pinned_buffers = _BatchBuffers(pin=True)


def _volume_refs(batch: dict[str, np.ndarray]) -> list[VolumeRef]:
    return [VolumeRef(str(loc), int(off), tuple(shape)) for loc, off, shape in
            zip(batch["volume_location"], batch["volume_offset"], batch["volume_shape"])]


def collate(batch: dict[str, np.ndarray], patch_z: int, hu_window: tuple[float, float],
            hu: bool = False, pin: bool = False) -> dict[str, torch.Tensor]:
    """Numpy batch of rows -> tensors.

    Returns ``volume`` (B, 1, D, H, W) float32 in [-1, 1] with D the largest depth rounded up to a multiple of
    ``patch_z`` (padding with air, -1); with ``hu=True`` int16 HU instead, padded with the window's low end
    (``normalise_tensor`` then gives what ``hu=False`` gives). Rows the loader normalised (float volumes,
    ``data.normalise_in=loader``) are padded as they are, float32, whatever ``hu`` says. Rows that carry
    volume references (``data.volume_transport=direct``) are read from their shards here; with ``hu=True``
    the batch is a reused buffer (``_BatchBuffers``), free again once the returned tensor and its views are gone;
    ``pin=True`` (on a GPU machine) makes those buffers page-locked.
    Also ``depths`` (B,), ``input_ids``/``attention_mask`` (B, T) int64, ``labels`` (B, L), ``study_id`` (B,),
    ``z_center_mm`` (B,), ``text_truncated`` (B,) bool, and when the rows have them ``findings`` (B, L) int8
    (-1 not mentioned, 0 negated, 1 affirmed by the text).
    """
    refs = _volume_refs(batch) if "volume_offset" in batch else None
    vols = refs if refs is not None else list(batch["volume"])
    depths = np.asarray([v.shape[0] for v in vols], dtype=np.int64)
    d_max = int(-(-depths.max() // patch_z) * patch_z)
    h, w = vols[0].shape[1:]
    if any(tuple(v.shape[1:]) != (h, w) for v in vols):
        raise ValueError(f"volumes of one batch differ in-plane: {[tuple(v.shape) for v in vols]}")
    hu_air = int(np.clip(np.floor(hu_window[0]), -32768, 32767))
    if refs is not None:
        staged = (_pinned_buffers if pin else _buffers).take((len(vols), 1, d_max, h, w))
        read_volumes(refs, staged[:, 0])
        for i, d in enumerate(depths):
            staged[i, 0, d:] = hu_air
        out = staged if hu else normalise(staged, hu_window)
    else:
        if np.issubdtype(vols[0].dtype, np.floating):  # normalised by the loader (data.normalise_in=loader)
            air, dtype, convert = -1.0, np.float32, None
        elif hu:  # int16 HU for normalise_tensor on the device; air is the window's low end
            air, dtype, convert = hu_air, np.int16, None
        else:
            air, dtype, convert = -1.0, np.float32, lambda v: normalise(v, hu_window)
        out = np.full((len(vols), 1, d_max, h, w), air, dtype=dtype)
        for i, v in enumerate(vols):
            out[i, 0, : v.shape[0]] = v if convert is None else convert(v)
    extra = {}
    if "findings" in batch:
        extra["findings"] = torch.as_tensor(np.stack(list(batch["findings"])), dtype=torch.int8)
    return {
        **extra,
        "volume": torch.from_numpy(out),
        "depths": torch.from_numpy(depths),
        "input_ids": torch.as_tensor(np.stack(list(batch["input_ids"])), dtype=torch.long),
        "attention_mask": torch.as_tensor(np.stack(list(batch["attention_mask"])), dtype=torch.long),
        "labels": torch.as_tensor(np.stack(list(batch["labels"])), dtype=torch.float32),
        "study_id": torch.tensor(np.asarray(batch["study_id"]), dtype=torch.long),
        "z_center_mm": torch.tensor(np.asarray(batch["z_center_mm"]), dtype=torch.float32),
        "text_truncated": torch.tensor(np.asarray(batch.get("text_truncated", np.zeros(len(vols), bool))), dtype=torch.bool),
    }
