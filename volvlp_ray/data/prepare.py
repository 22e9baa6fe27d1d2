"""Convert a CT-RATE-layout folder into WebDataset shards with a Ray Data job (parallel over volume groups).

Volumes of a split are sorted by name and cut into fixed groups; each group is one Ray Data row whose task
preprocesses its volumes and writes its own shard tars, then a ``_groups/group-GGGGG.json`` marker. A rerun
skips groups with a marker, so a job killed half-way finishes with every good volume exactly once. The
manifest is written last from the markers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from volvlp_ray.config import Config
from volvlp_ray.data.ctrate import LABELS, SPLITS, read_split
from volvlp_ray.data.organs import split_findings_by_organ
from volvlp_ray.data.shards import encode_sample, write_group_shards, write_json_atomic
from volvlp_ray.data.transforms import preprocess_volume

__all__ = ["prepare_options", "prepare_shards", "shards_ready"]

log = logging.getLogger(__name__)


def prepare_options(cfg: Config) -> dict[str, Any]:
    """What determines the content of the shards (a change means the shards must be rebuilt)."""
    return {
        "spacing": list(cfg.data.spacing),
        "in_plane_size": cfg.data.in_plane_size,
        "hu_window": list(cfg.data.hu_window),
        "shard_max_bytes": cfg.data.shard_max_bytes,
        "format": 1,
    }


def shards_ready(out: str | os.PathLike, options: dict, source_id: str) -> bool:
    out = Path(out)
    for split in SPLITS:
        path = out / split / "manifest.json"
        if not path.is_file():
            return False
        man = json.loads(path.read_text())
        if man.get("options") != options or man.get("source_id") != source_id:
            return False
    return True


def _process_group(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task: preprocess one group of volumes and write its shards + marker."""
    opts, records = json.loads(row["options"]), json.loads(row["records"])
    out_dir, group = Path(row["out_dir"]), int(row["group"])
    quarantined: list[dict] = []
    warnings: list[str] = []

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
            meta = {
                "volume_name": rec["volume_name"],
                "source": rec["path"],
                "split": rec["split"],
                "spacing": list(res.spacing),
                "source_spacing": list(res.source_spacing),
                "z_origin_mm": res.z_origin_mm,
                "depth": depth,
                "labels": rec["labels"],
                "organs": rec["organs"],
                "organ_findings": split_findings_by_organ(rec["findings"]),
                "impressions": rec["impressions"],
            }
            yield encode_sample(rec["volume_name"].removesuffix(".nii.gz"), res.volume, report, meta)

    specs = write_group_shards(out_dir, group, samples(), opts["shard_max_bytes"])
    marker = {"group": group, "shards": specs, "quarantined": quarantined, "warnings": warnings}
    write_json_atomic(out_dir / "_groups" / f"group-{group:05d}.json", marker)
    return {"group": group, "samples": sum(s["samples"] for s in specs), "quarantined": len(quarantined)}


def _plan_groups(records: list, shard_max_bytes: int, opts: dict, num_cpus: int) -> int:
    """Volumes per group: about one shard's worth, and at least as many groups as CPUs for small data."""
    first = records[0]
    import nibabel as nib

    shape = nib.load(first.path).shape
    zs = first.z_spacing * shape[2] / opts["spacing"][0]
    est = max(1, int(zs) * opts["in_plane_size"] ** 2 * 2)
    per_shard = max(1, shard_max_bytes // est)
    return max(1, min(per_shard, -(-len(records) // max(1, num_cpus))))


def prepare_shards(source: str | os.PathLike, out: str | os.PathLike, cfg: Config, progress: bool = True) -> dict:
    """Ingest every split of ``source`` into ``out/{train,valid}``. Returns a summary per split."""
    import ray

    out = Path(out)
    opts = prepare_options(cfg)
    source_id = os.path.abspath(str(source))
    summary = {}
    for split in SPLITS:
        t0 = time.time()
        split_dir = out / split
        records, problems = read_split(source, split)
        plan_path = split_dir / "_plan.json"
        names = [r.volume_name for r in records]
        if not records:
            raise ValueError(f"{source}/{split}: no usable volumes (problems: { {k: len(v) for k, v in problems.items()} })")
        num_cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
        per_group = _plan_groups(records, cfg.data.shard_max_bytes, opts, num_cpus)
        plan = {"options": opts, "source_id": source_id, "names": names, "per_group": per_group}
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if {k: old.get(k) for k in ("options", "source_id", "names")} != {k: plan[k] for k in ("options", "source_id", "names")}:
                if progress:
                    print(f"[prepare] {split}: inputs or options changed; rebuilding {split_dir}", flush=True)
                shutil.rmtree(split_dir)
            else:
                plan["per_group"] = per_group = old["per_group"]
        split_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(plan_path, plan)
        groups = [records[i : i + per_group] for i in range(0, len(records), per_group)]
        todo = [g for g in range(len(groups)) if not (split_dir / "_groups" / f"group-{g:05d}.json").is_file()]
        if progress:
            print(f"[prepare] {split}: {len(records)} volumes in {len(groups)} groups, {len(groups) - len(todo)} "
                  f"already done; converting {len(todo)} with Ray Data", flush=True)
        if todo:
            rows = [{"group": g, "records": json.dumps([r.to_dict() for r in groups[g]]),
                     "options": json.dumps(opts), "out_dir": str(split_dir)} for g in todo]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            parallelism = cfg.data.prepare_parallelism or None
            done = ds.map(_process_group, num_cpus=1, concurrency=parallelism).take_all()
            assert len(done) == len(todo)
        summary[split] = _finalise(split_dir, split, len(groups), problems, opts, source_id)
        if progress:
            s = summary[split]
            print(f"[prepare] {split}: {s['num_samples']} samples in {s['num_shards']} shards, "
                  f"{s['num_quarantined']} quarantined ({time.time() - t0:.1f}s)", flush=True)
    return summary


def _finalise(split_dir: Path, split: str, n_groups: int, problems: dict, opts: dict, source_id: str) -> dict:
    shards, quarantine, warnings = [], [], []
    for g in range(n_groups):
        marker = json.loads((split_dir / "_groups" / f"group-{g:05d}.json").read_text())
        shards.extend(marker["shards"])
        quarantine.extend(marker["quarantined"])
        warnings.extend(marker["warnings"])
    for reason, names in problems.items():
        quarantine.extend({"volume": n, "reason": reason} for n in names)
    for w in warnings:
        log.warning("%s", w)
    manifest = {
        "split": split,
        "num_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "labels": list(LABELS),
        "options": opts,
        "source_id": source_id,
        "num_quarantined": len(quarantine),
        "num_warnings": len(warnings),
    }
    write_json_atomic(split_dir / "quarantine.json", {"quarantined": quarantine, "warnings": warnings})
    write_json_atomic(split_dir / "manifest.json", manifest)
    return {"num_samples": manifest["num_samples"], "num_shards": len(shards), "num_quarantined": len(quarantine)}
