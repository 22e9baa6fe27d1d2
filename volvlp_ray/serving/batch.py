"""A whole dataset embedded with Ray Data batch inference (``jobs/embed.py --model MODEL --data DATA --out DIR``).

    summary = embed_dataset("latest", "workspace/shards", "embeddings.parquet", workspace="workspace")
    df = pd.read_parquet("embeddings.parquet")   # key, split, volume_embedding, report_embedding, labels

Input (``data``):

- **shards**: a split folder (``manifest.json``) or a shards root holding split folders (``train/``,
  ``valid/``): read with the evaluation reader (``pipeline.build_dataset(..., training=False)``: whole volumes,
  whole reports tokenised as in training; bad samples are logged and dropped there);
- **a CT-RATE-layout folder** (``ctrate.read_split``): NIfTI volumes with the metadata CSV's slope/intercept,
  reports (findings, then impressions, as the shard preparation joins them) and labels; each volume goes through
  the training preprocessing (``preprocess_volume`` with the run's spacing, in-plane size and HU window) in Ray
  Data tasks. A volume that cannot be read, or is shorter than one z patch, is skipped with a warning and
  counted.

The model runs in Ray Data actors (``map_batches`` with a callable class: one model per actor, ``concurrency``
actors, one GPU each when the cluster has GPUs, else ``cpus_per_actor`` CPUs). Volumes of a batch are padded
to a common depth (with air, the true depths passed on, as evaluation does) and embedded in the run's
``eval.volume_mode``; reports are embedded by the text tower.

Output: a folder of Parquet parts (``part-<stamp>-<n>.parquet``, each written whole and atomically by the
driver as the actors' batches arrive) that ``pd.read_parquet(folder)`` / ``pyarrow.dataset`` read as one table
(columns ``key``, ``split``, ``volume_embedding`` and ``report_embedding`` as lists of float32, L2-normalised,
``labels`` as a list of int8 in the order ``_embed.json`` names), plus ``_embed.json`` (model, data, settings,
label names, counts; names starting with ``_`` are not read as data). No consolidation step: a part is the unit
of restart. **Restartable**: a rerun into the same folder reads the keys its parts hold and embeds only the
others (an interrupted run loses at most the batches in flight); a part that cannot be read is set aside as
``_unreadable-<name>`` and its volumes are embedded again; a folder that another model (or other embedding
settings) started is refused.

The export folder must be readable where the actors and read tasks run (on a cluster: the shared workspace, as
for ``jobs/evaluate.py``); an MLflow model URI is downloaded into ``{workspace}/.embed-models/`` for the run.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volvlp_ray import console
from volvlp_ray.config import Config, config_from_dict
from volvlp_ray.data import storage

__all__ = ["COLUMNS", "DataSource", "embed_dataset", "query_embeddings", "read_embeddings", "resolve_source"]

COLUMNS = ("key", "split", "volume_embedding", "report_embedding", "labels")
MANIFEST = "_embed.json"


class BatchError(ValueError):
    """The batch job cannot run as asked (data that is neither shards nor CT-RATE layout, an output folder of
    another model, an unreadable Parquet to query)."""


# --------------------------------------------------------------------------------------------------------
# the input


@dataclass
class DataSource:
    """What ``--data`` names: ``kind`` ``"shards"`` (``root`` holds split folders) or ``"ctrate"`` (a CT-RATE
    layout ``root``), and the ``splits`` to embed."""

    kind: str
    root: str
    splits: list[str]

    def describe(self) -> str:
        what = "shards" if self.kind == "shards" else "CT-RATE layout"
        return f"{what} at {storage.redact(self.root)}, split(s) {', '.join(self.splits)}"


def resolve_source(data: str, split: str | None = None) -> DataSource:
    """``--data`` (and ``--split``) -> a :class:`DataSource`; ``BatchError`` saying why not."""
    from volvlp_ray.data.ctrate import SPLITS, layout_problem

    path = storage.normalise(data if storage.is_uri(data) else os.path.expanduser(data))

    def has_manifest(location: str) -> bool:
        return storage.is_file(storage.child(location, "manifest.json"))

    if has_manifest(path):
        root, name = storage.parent(path)
        if split not in (None, name):
            raise BatchError(f"--data {storage.redact(data)} is the split folder {name!r}; --split {split} differs")
        return DataSource("shards", root, [name])
    if split is not None and has_manifest(storage.child(path, split)):
        return DataSource("shards", path, [split])
    found = []
    if storage.is_dir(path):
        entries = storage.list_dir(path)
        names = [*SPLITS, *sorted(n for n, kind in entries.items() if kind == "dir" and n not in SPLITS)]
        found = [s for s in names if has_manifest(storage.child(path, s))]
    if found and split is None:
        return DataSource("shards", path, found)
    problem = layout_problem(path)
    if problem is None:
        if split is not None and split not in SPLITS:
            raise BatchError(f"--split {split}: a CT-RATE layout has the splits {list(SPLITS)}")
        return DataSource("ctrate", path, [split] if split else list(SPLITS))
    where = f" (split {split!r})" if split else ""
    raise BatchError(f"--data {storage.redact(data)}{where}: neither shards (a split folder with manifest.json, or "
                     f"a folder of such split folders) nor a CT-RATE-layout folder ({problem})")


def _split_total(source: DataSource, split: str) -> int:
    from volvlp_ray.data.shards import read_manifest

    return int(read_manifest(storage.child(source.root, split))["num_samples"])


def _records(source: DataSource, split: str, done: set[tuple[str, str]]) -> tuple[list[dict], int]:
    """The CT-RATE layout's volumes of ``split`` not in ``done``: rows for ``_PreprocessRecord``; and how many of
    the split's volumes are unusable (no CSV row, a bad metadata row), reported by ``read_split``."""
    from volvlp_ray.data.ctrate import read_split

    records, problems = read_split(source.root, split, organ_extents="none", organ_findings="keywords")
    for reason, names in problems.items():
        console.warn(f"[embed] {split}: {len(names)} volume(s) left out: {reason.replace('_', ' ')} "
                     f"(first: {names[:3]})")
    rows = []
    for r in records:
        key = r.volume_name.removesuffix(".nii.gz")
        if (split, key) in done:
            continue
        rows.append({"key": key, "split": split, "path": r.path, "slope": r.slope, "intercept": r.intercept,
                     "xy_spacing": list(r.xy_spacing), "z_spacing": r.z_spacing,
                     "report": " ".join(t for t in (r.findings.strip(), r.impressions.strip()) if t),
                     "labels": np.asarray(r.labels, dtype=np.int8)})
    return rows, sum(len(v) for v in problems.values())


class _PreprocessRecord:
    """Ray Data flat_map: a CT-RATE-layout record -> its volume preprocessed as the training data was, or
    nothing (a warning) when the volume cannot be used."""

    def __init__(self, spacing: Sequence[float], in_plane_size: int, hu_window: Sequence[float], patch_z: int):
        self.spacing, self.size = tuple(float(x) for x in spacing), int(in_plane_size)
        self.window, self.patch_z = tuple(float(x) for x in hu_window), int(patch_z)

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from volvlp_ray.data.transforms import preprocess_volume

        try:
            res = preprocess_volume(str(row["path"]), float(row["slope"]), float(row["intercept"]), self.spacing,
                                    self.size, self.window, tuple(row["xy_spacing"]), float(row["z_spacing"]))
        except Exception as exc:  # noqa: BLE001 - an unusable volume is skipped and counted, never the job's end
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            console.warn(f"[embed] skipping {row['key']}: {type(exc).__name__}: {text}")
            return []
        if res.volume.shape[0] < self.patch_z:
            console.warn(f"[embed] skipping {row['key']}: {res.volume.shape[0]} slice(s) after resampling, fewer "
                         f"than the model's z patch {self.patch_z}")
            return []
        return [{"key": str(row["key"]), "split": str(row["split"]), "volume": res.volume, "report": str(row["report"]),
                 "labels": np.asarray(row["labels"], dtype=np.int8)}]


# --------------------------------------------------------------------------------------------------------
# the model in Ray Data actors


class EmbedActor:
    """Ray Data ``map_batches`` callable class: holds one model; a batch of rows (``key``, ``split``, int16
    ``volume``, ``labels`` and either tokenised ``input_ids``/``attention_mask`` or the ``report`` text) ->
    ``key``, ``split``, ``volume_embedding`` ``(n, E)``, ``report_embedding`` ``(n, E)``, ``labels`` ``(n, L)``."""

    def __init__(self, export_dir: str, settings: dict[str, Any], device: str = "cpu", threads: int = 0):
        import torch

        from volvlp_ray.models import VLP

        if threads > 0:
            torch.set_num_threads(threads)
        self.model = VLP.from_pretrained(export_dir, map_location=device).eval()
        self.s = settings
        self.device = torch.device(device)
        self.dtype = self.model.vision.patch_embed.weight.dtype
        self.patch_z = int(self.model.vision.patch[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from volvlp_ray.data.pipeline import tokenize
        from volvlp_ray.data.transforms import normalise
        from volvlp_ray.eval.embed import encode_volumes

        s = self.s
        vols = list(batch["volume"])
        depths = np.asarray([v.shape[0] for v in vols], dtype=np.int64)
        d_max = int(-(-depths.max() // self.patch_z) * self.patch_z)
        h, w = vols[0].shape[1:]
        x = np.full((len(vols), 1, d_max, h, w), -1.0, dtype=np.float32)  # air (-1) below each volume's depth
        for i, v in enumerate(vols):
            x[i, 0, : v.shape[0]] = normalise(v, tuple(s["hu_window"]))
        if "input_ids" in batch:
            ids, mask = np.stack(list(batch["input_ids"])), np.stack(list(batch["attention_mask"]))
        else:
            toks = [tokenize(self.model.tokenizer, str(t), s["max_text_length"]) for t in batch["report"]]
            ids, mask = np.stack([t[0] for t in toks]), np.stack([t[1] for t in toks])
        with torch.no_grad():
            vol = encode_volumes(self.model, torch.from_numpy(x).to(self.device, self.dtype),
                                 torch.from_numpy(depths).to(self.device), s["volume_mode"], s["chunk_depth"],
                                 s["chunk_stride"], s["chunk_pool"], max(1, len(vols)))
            txt = self.model.encode_text(torch.as_tensor(ids, dtype=torch.long, device=self.device),
                                         torch.as_tensor(mask, dtype=torch.long, device=self.device))
        return {
            "key": np.asarray([str(k) for k in batch["key"]], dtype=object),
            "split": np.asarray([str(k) for k in batch["split"]], dtype=object),
            "volume_embedding": vol.float().cpu().numpy(),
            "report_embedding": txt.float().cpu().numpy(),
            "labels": np.stack([np.asarray(l).astype(np.int8) for l in batch["labels"]]),
        }


# --------------------------------------------------------------------------------------------------------
# the output folder


def _part_files(out: str) -> list[str]:
    if not storage.is_dir(out):
        return []
    return sorted(storage.child(out, n) for n, kind in storage.list_dir(out).items()
                  if kind == "file" and n.endswith(".parquet") and not n.startswith(("_", ".")))


def _done_keys(out: str) -> set[tuple[str, str]]:
    """``(split, key)`` of every row the output folder's parts hold; an unreadable part is set aside (renamed
    ``_unreadable-<name>``, left out of reads) with a warning, so its volumes are embedded again."""
    import pyarrow.parquet as pq

    done: set[tuple[str, str]] = set()
    for part in _part_files(out):
        try:
            with storage.open_input(part) as f:
                table = pq.read_table(io.BytesIO(f.read()), columns=["key", "split"])
        except Exception as exc:  # noqa: BLE001 - a damaged part must not stop the restart
            parent, name = storage.parent(part)
            console.warn(f"[embed] unreadable part {storage.redact(part)} ({type(exc).__name__}): set aside as "
                         f"_unreadable-{name}; its volumes are embedded again")
            if not storage.is_uri(part):
                os.replace(part, os.path.join(parent, f"_unreadable-{name}"))
            continue
        done.update(zip(table.column("split").to_pylist(), table.column("key").to_pylist()))
    return done


def _write_part(out: str, stamp: str, n: int, batch: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def lists(a: np.ndarray, dtype) -> pa.Array:
        a = np.ascontiguousarray(a)
        offsets = np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(a.reshape(-1), type=dtype))

    table = pa.table({
        "key": pa.array([str(k) for k in batch["key"]], pa.string()),
        "split": pa.array([str(s) for s in batch["split"]], pa.string()),
        "volume_embedding": lists(batch["volume_embedding"].astype(np.float32), pa.float32()),
        "report_embedding": lists(batch["report_embedding"].astype(np.float32), pa.float32()),
        "labels": lists(batch["labels"].astype(np.int8), pa.int8()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.child(out, f"part-{stamp}-{n:05d}.parquet"), buf.getvalue())


def read_embeddings(out: str | os.PathLike):
    """The output folder (or one Parquet file) as a DataFrame; ``BatchError`` when there is none to read."""
    import pandas as pd

    location = storage.normalise(out)
    if storage.is_dir(location):
        parts = _part_files(location)
        if not parts:
            raise BatchError(f"{storage.redact(out)} holds no Parquet parts (was the batch job run with --out there?)")
        return pd.concat([_read_part(p) for p in parts], ignore_index=True)
    if not storage.is_file(location):
        raise BatchError(f"{storage.redact(out)} does not exist")
    return _read_part(location)


def _read_part(location: str):
    import pyarrow.parquet as pq

    try:
        with storage.open_input(location) as f:
            return pq.read_table(io.BytesIO(f.read())).to_pandas()
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged file
        raise BatchError(f"{storage.redact(location)} is not a readable Parquet file ({type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------------------
# the job


def _settings(cfg: Config) -> dict[str, Any]:
    e = cfg.eval
    return {"spacing": list(cfg.data.spacing), "in_plane_size": cfg.data.in_plane_size,
            "hu_window": list(cfg.data.hu_window), "max_text_length": cfg.data.max_text_length,
            "volume_mode": e.volume_mode, "chunk_depth": e.chunk_depth, "chunk_stride": e.chunk_stride,
            "chunk_pool": e.chunk_pool}


def _check_manifest(out: str, manifest: dict[str, Any]) -> None:
    """Refuse an output folder that another model or other settings started (their rows would mix)."""
    if storage.is_file(out):
        raise BatchError(f"--out {storage.redact(out)} is a file; the batch job writes a folder of Parquet parts "
                         "(e.g. --out embeddings.parquet, a folder pd.read_parquet reads)")
    path = storage.child(out, MANIFEST)
    if not storage.is_file(path):
        if _part_files(out):
            raise BatchError(f"--out {storage.redact(out)} holds Parquet files but no {MANIFEST}: not an output of "
                             "this job; give another folder")
        return
    old = storage.read_json(path)
    for key in ("model_identity", "settings"):
        if old.get(key) != manifest[key]:
            raise BatchError(f"--out {storage.redact(out)} holds embeddings of "
                             f"{'another model' if key == 'model_identity' else 'other embedding settings'} "
                             f"({old.get('model', {}).get('export_dir', '?')}); give another --out folder, or remove "
                             "it to start again")


def embed_dataset(
    model: str,
    data: str,
    out: str,
    split: str | None = None,
    overrides: Sequence[str] = (),
    concurrency: int = 1,
    batch_size: int = 0,
    cpus_per_actor: float = 1.0,
    threads: int = 0,
    limit: int = 0,
) -> dict[str, Any]:
    """The batch job (see the module docstring). Returns a summary: ``written`` (rows this run), ``already``
    (rows a previous run left), ``skipped``, ``seconds``, ``volumes_per_s``, ``out``.

    Args:
        model: ``--model`` (``scan.resolve_model``); data, split: ``resolve_source``; out: the output folder.
        overrides: ``key=value`` (``workspace=``, ``eval.volume_mode=sliding``…) over the run's config.
        concurrency: model actors; batch_size: volumes per actor call (0: the run's ``eval.batch_size``).
        cpus_per_actor: CPUs each actor reserves without GPUs; threads: torch threads in an actor (0: as many as
            the CPUs it reserves, at least 1).
        limit: > 0: embed at most this many (new) volumes (a smoke run)."""
    from volvlp_ray.eval.job import build_eval_config
    from volvlp_ray.serving.scan import embed_config, is_mlflow_uri, resolve_model

    t0 = time.time()
    pre, _ = build_eval_config(None, None, list(overrides))
    source = resolve_source(data, split)
    download = None
    if is_mlflow_uri(model):
        download = pre.workspace_path / ".embed-models" / uuid.uuid4().hex[:12]
    try:
        ref = resolve_model(model, pre.workspace_path, download_dir=download,
                            tracking_uri=pre.tracking.tracking_uri or None)
        from volvlp_ray.eval.checkpoint import run_config_of

        cfg = embed_config(run_config_of(ref.export_dir), overrides)
        if batch_size > 0:
            cfg = config_from_dict({**_asdict(cfg), "eval": {**_asdict(cfg)["eval"], "batch_size": batch_size}})
        return _run(ref, cfg, source, storage.normalise(out), concurrency, cpus_per_actor, threads, limit, t0)
    finally:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)


def _asdict(cfg: Config) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def _run(ref, cfg: Config, source: DataSource, out: str, concurrency: int, cpus_per_actor: float, threads: int,
         limit: int, t0: float) -> dict[str, Any]:
    import json

    from volvlp_ray.data.ctrate import LABELS
    from volvlp_ray.eval.run import ensure_ray
    from volvlp_ray.serving.scan import describe_model, model_identity

    spec = json.loads((Path(ref.export_dir) / "vlp_config.json").read_text())
    patch_z = int(spec["vision"]["patch"][0])
    settings = _settings(cfg)
    labels = list(LABELS)
    if source.kind == "shards":
        from volvlp_ray.data.shards import read_manifest

        labels = [str(n) for n in read_manifest(storage.child(source.root, source.splits[0])).get("labels", LABELS)]
    manifest = {"format": 1, "model": describe_model(ref),
                "model_identity": model_identity(ref.export_dir), "settings": settings,
                "data": {"kind": source.kind, "root": storage.redact(source.root), "splits": source.splits},
                "columns": list(COLUMNS), "label_names": labels,
                "embed_dim": int(spec["embed_dim"])}
    _check_manifest(out, manifest)
    done = _done_keys(out)
    console.info(f"[embed] model: {ref.export_dir} ({ref.kind}; run {ref.run_name or 'unknown'})")
    console.info(f"[embed] data: {source.describe()}; output: {storage.redact(out)}"
                 + (f" ({len(done)} volume(s) already there: skipped)" if done else ""))
    ensure_ray()
    import ray
    import ray.data

    gpus = ray.cluster_resources().get("GPU", 0) >= 1  # the actors' machines, not necessarily the driver's
    if not gpus:
        _check_cpus(ray.cluster_resources().get("CPU", 0), concurrency, cpus_per_actor)
    storage.write_json(storage.child(out, MANIFEST), {**manifest, "complete": False})
    ds, todo, unusable = _dataset(source, cfg, ref, done, settings, patch_z)
    limited = 0 < limit < todo
    if limited:
        ds, todo = ds.limit(limit), limit
    device = "cuda" if gpus else "cpu"
    resources = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_actor}
    n_threads = threads if threads > 0 else (0 if gpus else max(1, int(round(cpus_per_actor))))
    console.info(f"[embed] {todo} volume(s) to embed: {concurrency} model actor(s) on "
                 f"{'1 GPU' if gpus else f'{cpus_per_actor:g} CPU'} each, {cfg.eval.batch_size} volumes per batch, "
                 f"volume mode {settings['volume_mode']}")
    written = 0
    arrivals: list[tuple[float, int]] = []  # (seconds since the start, rows written so far) per part
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    t_start = time.time()
    if todo > 0:
        ds = ds.map_batches(EmbedActor, fn_constructor_args=(str(ref.export_dir), settings, device, n_threads),
                            batch_size=cfg.eval.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=max(1, concurrency)), **resources)
        with console.progress(total=todo, desc="[embed] volumes", unit="vol") as bar:
            for n, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
                if len(batch["key"]) == 0:
                    continue
                _write_part(out, stamp, n, batch)
                written += len(batch["key"])
                arrivals.append((time.time() - t_start, written))
                bar.update(len(batch["key"]), **{"vol/s": written / max(1e-9, time.time() - t_start)})
    seconds = time.time() - t_start
    total_rows = len(done) + written
    skipped = max(0, todo - written) + unusable
    if skipped:
        console.warn(f"[embed] {skipped} volume(s) not embedded (unusable or bad samples: see the warnings above "
                     "and the log)")
    # steady state: from the first part to the last (the actors' start-up, model load, excluded)
    steady = None
    if len(arrivals) > 2 and arrivals[-1][0] - arrivals[0][0] >= 2.0:  # parts that came in one burst say nothing
        steady = (arrivals[-1][1] - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
    summary = {"out": storage.redact(out), "written": written, "already": len(done), "rows": total_rows,
               "skipped": skipped, "seconds": round(time.time() - t0, 2), "embed_seconds": round(seconds, 2),
               "first_part_s": round(arrivals[0][0], 2) if arrivals else None,
               "volumes_per_s": round(written / seconds, 3) if written and seconds > 0 else None,
               "volumes_per_s_steady": round(steady, 3) if steady else None}
    # complete: every volume of the data is in the folder or was found unusable (a --limit run is not)
    storage.write_json(storage.child(out, MANIFEST), {**manifest, "complete": not limited, "last_run": summary})
    console.summary("embed", [("output", storage.redact(out)), ("rows", total_rows),
                              ("embedded now", f"{written} in {seconds:.1f}s"
                               + (f" ({written / seconds:.2f} vol/s)" if written and seconds > 0 else "")),
                              ("after start-up", f"{steady:.2f} vol/s (first part after {arrivals[0][0]:.1f}s)"
                               if steady else None),
                              ("already there", len(done) or None), ("skipped", skipped or None),
                              ("read with", "pd.read_parquet(folder)")])
    return summary


def _check_cpus(cpus: float, concurrency: int, cpus_per_actor: float) -> None:
    """CPU-only actors must leave a CPU to Ray Data's read (and preprocessing) tasks, or the job waits forever:
    a clear error on a cluster that cannot grow (no ``$RAY_ADDRESS``: the local instance), a warning otherwise
    (an autoscaler may add nodes)."""
    left = cpus - max(1, concurrency) * cpus_per_actor
    if left >= 1:
        return
    msg = (f"{max(1, concurrency)} model actor(s) x {cpus_per_actor:g} CPU leave {max(0.0, left):g} of the cluster's "
           f"{cpus:g} CPUs to the read tasks, which need at least 1: lower --concurrency or --cpus-per-actor")
    if os.environ.get("RAY_ADDRESS"):
        console.warn(f"[embed] {msg} (the job waits until the cluster grows)")
    else:
        raise BatchError(msg)


def _dataset(source: DataSource, cfg: Config, ref, done: set[tuple[str, str]], settings: dict, patch_z: int):
    """The Ray Dataset of rows to embed (``done`` left out), how many there are (at most), and how many of the
    source's volumes are known unusable before reading."""
    import ray.data

    if source.kind == "ctrate":
        rows, unusable = [], 0
        for split in source.splits:
            r, u = _records(source, split, done)
            rows += r
            unusable += u
        if not rows:
            return ray.data.from_items([{"key": ""}]).limit(0), 0, unusable
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
        ds = ds.flat_map(_PreprocessRecord(settings["spacing"], settings["in_plane_size"], settings["hu_window"],
                                           patch_z))
        return ds, len(rows), unusable

    from volvlp_ray.data.pipeline import build_dataset

    scfg = config_from_dict({**_asdict(cfg), "data": {**_asdict(cfg)["data"], "shards_dir": source.root}})
    tokenizer_dir = str(Path(ref.export_dir) / "tokenizer")
    datasets, todo = [], 0
    for split in source.splits:
        done_here = {k for s, k in done if s == split}
        todo += max(0, _split_total(source, split) - len(done_here))
        ds = build_dataset(scfg, split, tokenizer_dir, training=False)
        ds = ds.select_columns(["key", "volume", "labels", "input_ids", "attention_mask"])
        ds = ds.add_column("split", _Constant(split), batch_format="numpy")
        if done_here:
            ds = ds.filter(_NotIn(done_here))
        datasets.append(ds)
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    return ds, todo, 0


class _Constant:
    """``add_column``'s function: a column holding one value."""

    def __init__(self, value: str):
        self.value = value

    def __call__(self, batch):
        return np.full(len(batch["key"]), self.value, dtype=object)


class _NotIn:
    """``filter``'s function: rows whose key is not in ``keys``."""

    def __init__(self, keys: set[str]):
        self.keys = frozenset(keys)

    def __call__(self, row: dict[str, Any]) -> bool:
        return str(row["key"]) not in self.keys


# --------------------------------------------------------------------------------------------------------
# retrieval


def query_embeddings(model: str, parquet: str, text: str, top: int = 5, overrides: Sequence[str] = (),
                     split: str | None = None) -> dict[str, Any]:
    """Rank the volumes of a batch output by cosine similarity to ``text`` (embedded with the model's text
    tower, ``VLP.embed_report``). Returns ``query``, ``n`` and ``results`` (``key``, ``split``, ``score``),
    best first."""
    from volvlp_ray.eval.job import build_eval_config
    from volvlp_ray.serving.scan import is_mlflow_uri, load_model, resolve_model

    if not text or not text.strip():
        raise BatchError("--text is empty: give the report or finding to search for")
    df = read_embeddings(parquet)
    missing = [c for c in ("key", "split", "volume_embedding") if c not in df.columns]
    if missing:
        raise BatchError(f"{parquet} lacks the column(s) {missing}: not an output of this job")
    if split is not None:
        df = df[df["split"] == split]
    if df.empty:
        raise BatchError(f"{parquet} holds no volumes" + (f" of split {split!r}" if split else ""))
    pre, _ = build_eval_config(None, None, list(overrides))
    with tempfile.TemporaryDirectory(prefix="volvlp-model-") as tmp:
        ref = resolve_model(model, pre.workspace_path, download_dir=tmp if is_mlflow_uri(model) else None,
                            tracking_uri=pre.tracking.tracking_uri or None)
        m = load_model(ref)
        q = m.embed_report(text).float().cpu().numpy().astype(np.float64)
    v = np.stack([np.asarray(e, dtype=np.float64) for e in df["volume_embedding"]])
    if v.shape[1] != q.shape[0]:
        raise BatchError(f"{parquet} holds {v.shape[1]}-d embeddings, the model makes {q.shape[0]}-d ones: "
                         "another model's output")
    scores = (v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    order = np.argsort(-scores, kind="stable")[: max(1, top)]
    results = [{"rank": i + 1, "key": str(df["key"].iloc[j]), "split": str(df["split"].iloc[j]),
                "score": float(scores[j])} for i, j in enumerate(order)]
    return {"query": text, "n": int(len(df)), "results": results}
