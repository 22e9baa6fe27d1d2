"""Convert a CT-RATE-layout folder into WebDataset shards with a Ray Data job (parallel over volume groups).

Volumes of a split are sorted by name and cut into fixed groups; each group is one Ray Data row whose task
preprocesses its volumes and writes its own shard tars, then a ``_groups/group-GGGGG.json`` marker. A rerun
skips groups with a marker, so a job killed half-way finishes with every good volume exactly once. The
manifest is written last from the markers.

Source and output are local folders or any pyarrow filesystem URIs (``s3://bucket/prefix?region=...``; see
``storage.py``). Tasks reach them from their own processes: the storage credentials of the driver's environment
(``AWS_*``, ...) go to the tasks' ``runtime_env`` when a URI is used.

Per volume, organ z-extents come from its segmentation (``segmentation.py``), the organ-extents CSV, or nowhere
(``data.organ_extents``), and organ-wise findings from the organ-findings JSON or the keyword split of
Findings_EN (``data.organ_findings``). An unreadable segmentation keeps the volume: its extents fall back (to the
CSV in "auto" mode, else to none) with a warning in ``quarantine.json`` counted in the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from volvlp_ray import console
from volvlp_ray.config import Config
from volvlp_ray.data import storage
from volvlp_ray.data.ctrate import available_splits, read_split, split_label_names
from volvlp_ray.data.organs import split_findings_by_organ
from volvlp_ray.data.labelmaps import SEG_CLASSES, labelmap_on_grid, read_labelmap
from volvlp_ray.data.segmentation import extents_from_segmentation, label_table
from volvlp_ray.data.shards import encode_sample, write_group_shards
from volvlp_ray.data.transforms import preprocess_volume

__all__ = ["prepare_options", "prepare_shards", "shards_ready", "source_id"]

log = logging.getLogger(__name__)


def prepare_options(cfg: Config) -> dict[str, Any]:
    """What determines the content of the shards (a change means the shards must be rebuilt)."""
    return {
        "spacing": list(cfg.data.spacing),
        "in_plane_size": cfg.data.in_plane_size,
        "hu_window": list(cfg.data.hu_window),
        "shard_max_bytes": cfg.data.shard_max_bytes,
        "organ_extents": cfg.data.organ_extents,
        "segmentation_labels": storage.redact(cfg.data.segmentation_labels),
        "organ_findings": storage.redact(cfg.data.organ_findings),
        "label_maps": cfg.data.label_maps,
        "format": 1,
    }


def source_id(source: str | os.PathLike) -> str:
    """How a source is named in plans and manifests: an absolute local path, or the URI without credentials."""
    return storage.redact(storage.normalise(source))


def shards_ready(out: str | os.PathLike, options: dict, source_id: str, splits: list[str] | tuple[str, ...] = ("train", "valid")) -> bool:
    """Whether ``out`` holds current shards of every split in ``splits`` (same options and source)."""
    out = storage.normalise(out)
    for split in splits:
        path = storage.child(out, split, "manifest.json")
        if not storage.is_file(path):
            return False
        man = storage.read_json(path)
        if man.get("options") != options or man.get("source_id") != source_id:
            return False
    return True


def _process_group(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task: preprocess one group of volumes and write its shards + marker."""
    opts, records = json.loads(row["options"]), json.loads(row["records"])
    out_dir, group = row["out_dir"], int(row["group"])
    table = {int(k): v for k, v in opts["label_table"].items()}
    quarantined: list[dict] = []
    warnings: list[str] = []
    sources = {"organ_extents": {}, "organ_findings": {}, "labelmaps": {}}

    def count(kind: str, value: str) -> None:
        sources[kind][value] = sources[kind].get(value, 0) + 1

    def samples():
        for rec in records:
            try:
                if not rec["findings"].strip() and not rec["impressions"].strip():
                    raise ValueError("empty report")
                res = preprocess_volume(
                    rec["path"], rec["slope"], rec["intercept"], tuple(opts["spacing"]), opts["in_plane_size"],
                    tuple(opts["hu_window"]), tuple(rec["xy_spacing"]), rec["z_spacing"],
                )
            except Exception as exc:  # noqa: BLE001 - every unusable volume is quarantined with its reason
                quarantined.append({"volume": rec["volume_name"], "reason": f"{type(exc).__name__}: {exc}"})
                continue
            warnings.extend(f"{rec['volume_name']}: {w}" for w in res.warnings)
            report = " ".join(t for t in (rec["findings"].strip(), rec["impressions"].strip()) if t)
            depth = res.volume.shape[0]
            organs, extents_from = _organ_extents(rec, res, table, warnings)
            findings_from = "json" if rec["organ_findings"] is not None else "keywords"
            count("organ_extents", extents_from)
            count("organ_findings", findings_from)
            meta = {
                "volume_name": rec["volume_name"],
                "source": storage.redact(rec["path"]),
                "split": rec["split"],
                "spacing": list(res.spacing),
                "source_spacing": list(res.source_spacing),
                "z_origin_mm": res.z_origin_mm,
                "depth": depth,
                "labels": rec["labels"],
                "organs": organs,
                "organs_from": extents_from,
                "organ_findings": (rec["organ_findings"] if rec["organ_findings"] is not None
                                   else split_findings_by_organ(rec["findings"])),
                "organ_findings_from": findings_from,
                "impressions": rec["impressions"],
            }
            labelmap, labelmap_from = _labelmap(rec, res, table, warnings)
            count("labelmaps", labelmap_from)
            meta["labelmap_from"] = labelmap_from
            if labelmap is not None:
                meta["labelmap_classes"] = list(SEG_CLASSES)
            yield encode_sample(rec["volume_name"].removesuffix(".nii.gz"), res.volume, report, meta, labelmap)

    specs = write_group_shards(out_dir, group, samples(), opts["shard_max_bytes"])
    marker = {"group": group, "shards": specs, "quarantined": quarantined, "warnings": warnings, **sources}
    storage.write_json(storage.child(out_dir, "_groups", f"group-{group:05d}.json"), marker)
    return {"group": group, "samples": sum(s["samples"] for s in specs), "quarantined": len(quarantined)}


def _labelmap(rec: dict, res, table: dict[int, str], warnings: list[str]):
    """The volume's organ label map on its preprocessed grid (uint8 (D, H, W)) and where it came from
    ("labelmaps", "segmentation" or "none"). A label map that cannot be used (unreadable, no known structure,
    nothing of it on the CT's grid: a map of another scan) is a warning, never the loss of the volume."""
    if not rec.get("labelmap"):
        return None, "none"
    try:
        classes, affine = read_labelmap(rec["labelmap"], rec["labelmap_kind"], table)
        out = labelmap_on_grid(classes, affine, res.affine, res.volume.shape[::-1])
        if not out.any():
            raise ValueError("no labelled voxel falls on the CT's grid: a label map of another scan?")
        return out, rec["labelmap_from"]
    except Exception as exc:  # noqa: BLE001 - a bad label map costs the map, not the volume
        warnings.append(f"{rec['volume_name']}: unusable label map {storage.redact(rec['labelmap'])} "
                        f"({type(exc).__name__}: {exc}); stored without one")
        return None, "none"


def _organ_extents(rec: dict, res, table: dict[int, str], warnings: list[str]) -> tuple[dict, str]:
    """The volume's organ z-extents and where they came from: "segmentation", "csv" or "none".

    A segmentation that cannot be used (unreadable, no known structure, or not overlapping the volume's z-range)
    is a warning, never the loss of the volume: the CSV rows (if attached) or nothing take its place.
    """
    if rec["segmentation"]:
        try:
            extents = extents_from_segmentation(rec["segmentation"], rec["segmentation_kind"], table)
            lo = res.z_origin_mm - res.spacing[0] / 2
            hi = res.z_origin_mm + (res.volume.shape[0] - 0.5) * res.spacing[0]
            if not any(a <= hi and b >= lo for a, b in extents.values()):
                raise ValueError(f"no organ extent overlaps the volume's z-range [{lo:.1f}, {hi:.1f}] mm "
                                 f"(extents {extents}): a segmentation of another scan?")
            return extents, "segmentation"
        except Exception as exc:  # noqa: BLE001 - a bad segmentation costs the extents, not the volume
            fallback = "the organ-extents CSV" if rec["organs"] else "none"
            warnings.append(f"{rec['volume_name']}: unusable segmentation {storage.redact(rec['segmentation'])} "
                            f"({type(exc).__name__}: {exc}); organ z-extents from {fallback}")
    if rec["organs"]:
        return rec["organs"], "csv"
    return {}, "none"


def _plan_groups(records: list, shard_max_bytes: int, opts: dict, num_cpus: int) -> int:
    """Volumes per group: about one shard's worth, and at least as many groups as CPUs for small data."""
    first = records[0]
    shape = storage.nifti_shape(first.path)
    zs = first.z_spacing * shape[2] / opts["spacing"][0]
    est = max(1, int(zs) * opts["in_plane_size"] ** 2 * 2)
    per_shard = max(1, shard_max_bytes // est)
    return max(1, min(per_shard, -(-len(records) // max(1, num_cpus))))


def prepare_shards(source: str | os.PathLike, out: str | os.PathLike, cfg: Config, progress: bool = True,
                   splits: list[str] | None = None) -> dict:
    """Ingest every split of ``source`` into ``out/{train,valid}`` (local folders or URIs): both, or the one an
    external evaluation set holds (``splits``: those the caller found with ``ctrate.layout_check``; default:
    ``available_splits``). Returns a summary per split."""
    import ray

    source = storage.normalise(source)
    out = storage.normalise(out)
    opts = prepare_options(cfg)
    sid = source_id(source)
    task_opts = {**opts, "label_table": {str(k): v for k, v in label_table(cfg.data.segmentation_labels).items()}}
    env = storage.task_runtime_env(source, out)  # tasks run in other processes (other nodes)
    remote_args: dict[str, Any] = {"runtime_env": env} if env else {}
    summary = {}
    splits = available_splits(source) if splits is None else splits
    if not splits:
        raise ValueError(f"{storage.redact(source)} holds no complete split (CSVs and volumes) of train, valid")
    for split in splits:
        t0 = time.time()
        split_dir = storage.child(out, split)
        records, problems = read_split(source, split, cfg.data.organ_extents, cfg.data.organ_findings,
                                       cfg.data.label_maps)
        plan_path = storage.child(split_dir, "_plan.json")
        names = [r.volume_name for r in records]
        if not records:
            raise ValueError(f"{storage.redact(source)}/{split}: no usable volumes (problems: "
                             f"{ {k: len(v) for k, v in problems.items()} })")
        num_cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
        per_group = _plan_groups(records, cfg.data.shard_max_bytes, opts, num_cpus)
        plan = {"options": opts, "source_id": sid, "names": names, "per_group": per_group}
        if storage.is_file(plan_path):
            old = storage.read_json(plan_path)
            if {k: old.get(k) for k in ("options", "source_id", "names")} != {k: plan[k] for k in ("options", "source_id", "names")}:
                if progress:
                    console.info(f"[prepare] {split}: inputs or options changed; rebuilding "
                                 f"{storage.redact(split_dir)}")
                storage.delete_dir(split_dir)
            else:
                plan["per_group"] = per_group = old["per_group"]
        storage.write_json(plan_path, plan)
        groups = [records[i : i + per_group] for i in range(0, len(records), per_group)]
        markers = storage.list_dir(storage.child(split_dir, "_groups"))
        todo = [g for g in range(len(groups)) if markers.get(f"group-{g:05d}.json") != "file"]
        if progress:
            console.info(f"[prepare] {split}: {len(records)} volumes in {len(groups)} groups, "
                         f"{len(groups) - len(todo)} already done; converting {len(todo)} with Ray Data")
        if todo:
            rows = [{"group": g, "records": json.dumps([r.to_dict() for r in groups[g]]),
                     "options": json.dumps(task_opts), "out_dir": split_dir} for g in todo]
            ray.data.DataContext.get_current().enable_progress_bars = False  # the bar below says it once
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            parallelism = cfg.data.prepare_parallelism or None
            n_vol = sum(len(groups[g]) for g in todo)
            done, quarantined = 0, 0
            bar = console.progress(total=n_vol, desc=f"[prepare] {split}", unit="volumes", plain_lines=4,
                                   disabled=not progress)
            with bar:  # a group's volumes count when its task ends (groups finish in any order)
                for group_done in ds.map(_process_group, num_cpus=1, concurrency=parallelism,
                                         **remote_args).iter_rows():
                    done += 1
                    quarantined += int(group_done["quarantined"])
                    bar.update(len(groups[int(group_done["group"])]), quarantined=quarantined)
            assert done == len(todo), (done, len(todo))
        summary[split] = _finalise(split_dir, split, len(groups), problems, opts, sid,
                                   split_label_names(source, split))
        if progress:
            s = summary[split]
            console.info(f"[prepare] {split}: {s['num_samples']} samples in {s['num_shards']} shards, "
                         f"{s['num_quarantined']} quarantined ({time.time() - t0:.1f}s)")
    return summary


def _finalise(split_dir: str, split: str, n_groups: int, problems: dict, opts: dict, sid: str,
              label_names: list[str]) -> dict:
    shards, quarantine, warnings = [], [], []
    sources: dict[str, dict[str, int]] = {"organ_extents": {}, "organ_findings": {}, "labelmaps": {}}
    for g in range(n_groups):
        marker = storage.read_json(storage.child(split_dir, "_groups", f"group-{g:05d}.json"))
        shards.extend(marker["shards"])
        quarantine.extend(marker["quarantined"])
        warnings.extend(marker["warnings"])
        for kind, counts in sources.items():
            for value, n in marker.get(kind, {}).items():
                counts[value] = counts.get(value, 0) + n
    for reason, names in problems.items():
        quarantine.extend({"volume": n, "reason": reason} for n in names)
    for w in warnings:
        log.warning("%s", w)
    manifest = {
        "split": split,
        "num_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "labels": list(label_names),
        "options": opts,
        "source_id": sid,
        "num_quarantined": len(quarantine),
        "num_warnings": len(warnings),
        "organ_extents_from": dict(sorted(sources["organ_extents"].items())),
        "organ_findings_from": dict(sorted(sources["organ_findings"].items())),
        "labelmaps_from": dict(sorted(sources["labelmaps"].items())),
    }
    # the manifest comes last: a reader (or shards_ready) never sees one before everything it names exists
    storage.write_json(storage.child(split_dir, "quarantine.json"), {"quarantined": quarantine, "warnings": warnings})
    storage.write_json(storage.child(split_dir, "manifest.json"), manifest)
    return {"num_samples": manifest["num_samples"], "num_shards": len(shards), "num_quarantined": len(quarantine),
            "num_warnings": len(warnings)}
