"""Benchmark the data path: raw shard read vs per-sample NIfTI loading vs the project's Ray Data loader.

On shards made from ``--volumes`` synthetic volumes (made with the same code as ``jobs/prepare_data.py``, in
``--workspace`` or a temporary folder), one run measures side by side:

(a) ``raw_read``: sequential read of the training shard files (the same bytes the loader reads), MB/s: once
    after dropping them from the page cache (``cold_mb_per_s``, the disk), then warm (``mb_per_s``, as the
    loader finds them; the ratio target is taken against this one);
(b) ``nifti_baseline``: what CT-CLIP-style loaders do per sample in ``__getitem__``: load the NIfTI volume,
    rescale, reorient, resample, window, crop/pad (``preprocess_volume``), one process, volumes/s;
(c) ``loader``: the training stream as the training loop reads it: ``build_dataset`` (``reader.read_shards`` ->
    decode -> chunk + text -> tokenise) -> ``iter_batches`` -> depth bucketing (``data.bucket_pool``) ->
    ``collate``, two full passes over the training split (the second is ``loader``, the first, with Ray Data's
    start-up in it, ``loader_first_pass``), volumes/s and MB/s of shard bytes; plus the fraction of padded
    tokens in collated batches: vision tokens (depth padded to the deepest volume of the batch; also without
    bucketing, for comparison) and text tokens (padded to ``data.max_text_length``). With the default
    ``data.volume_transport=direct`` the rows carry where the voxels lie and ``collate`` reads them from the
    shards; ``loader_object_store`` times the same stream with the voxels carried through Ray Data
    (``data.volume_transport=object_store``), for comparison.

``loader_stages`` times the loader's first stages alone on the same shards (``read``: the tar reading;
``rows``: + decode, chunk + text, tokenise, voxels carried; ``rows_direct``: the same rows carrying where the
voxels lie instead; and ``read_webdataset``: Ray Data's own tar reading, which gives the same rows as ``read``),
to show where the time goes.

``ratios`` compares them with issue #3's targets: loader >= 60 % of (a) in MB/s, >= 10x (b) in volumes/s,
vision padding <= 10 %. (a) is given both ways: against the disk (``loader_vs_cold_raw_mbps``; what a training
run reads from, its data being far larger than memory) and against the page cache (``loader_vs_raw_mbps``,
memory bandwidth). The loader is timed on warm shards either way, so it never waits on the disk itself.
``--scale ct-rate`` (the default) makes the volumes CT-RATE-sized (0.75 x 0.75 x 1.5 mm, 480 in-plane, ~80 MB
each; patch 10 x 20 x 20; 24 training volumes, 1.9 GB of shards); ``--scale small`` uses the embedded default's
64² volumes (~0.3 MB; 200 of them), which measure per-sample overhead rather than bandwidth.

Usage: ``python jobs/benchmark.py data --out FILE.json [--scale ct-rate|small] [--volumes N] [--workspace DIR]
[key=value ...]``; a ``--workspace`` keeps the data and shards for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from volvlp_ray.benchmarks import write_report

TARGETS = {"loader_vs_raw_mbps": 0.6, "loader_vs_cold_raw_mbps": 0.6, "loader_vs_nifti_volumes_per_s": 10.0,
           "vision_padding_fraction": 0.10}
# CT-RATE's preprocessing (0.75 x 0.75 x 1.5 mm, 480 in-plane: ~80 MB per volume) and SigVLP's patch
CT_RATE_SCALE = ["data.spacing=[1.5,0.75,0.75]", "data.in_plane_size=480", "model.patch=[10,20,20]",
                 "data.shard_max_bytes=268435456"]


def _raw_read(files: list[str], block: int = 8 << 20) -> dict[str, Any]:
    def read_all(drop_cache: bool = False) -> int:
        n = 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                if drop_cache and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while chunk := fh.read(block):
                    n += len(chunk)
        return n

    t0 = time.perf_counter()
    read_all(drop_cache=True)  # clean pages leave the cache: this pass reads from the disk (where the OS obeys)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = read_all()  # the page cache is warm now, as the loader passes after it will find it
    dt = time.perf_counter() - t0
    return {"files": len(files), "bytes": n, "seconds": dt, "mb_per_s": n / 1e6 / dt,
            "cold_seconds": cold, "cold_mb_per_s": n / 1e6 / cold}


def _nifti_baseline(source: str, cfg, limit: int) -> dict[str, Any]:
    from volvlp_ray.data.ctrate import read_split
    from volvlp_ray.data.transforms import preprocess_volume

    records = read_split(source, "train")[0][:limit]
    out_bytes = in_bytes = 0
    t0 = time.perf_counter()
    for r in records:
        res = preprocess_volume(r.path, r.slope, r.intercept, tuple(cfg.data.spacing), cfg.data.in_plane_size,
                                tuple(cfg.data.hu_window), r.xy_spacing, r.z_spacing)
        out_bytes += res.volume.nbytes
        in_bytes += os.path.getsize(r.path)
    dt = time.perf_counter() - t0
    return {"volumes": len(records), "seconds": dt, "volumes_per_s": len(records) / dt,
            "nifti_mb_per_s": in_bytes / 1e6 / dt, "output_mb_per_s": out_bytes / 1e6 / dt, "processes": 1}


def _stages(cfg, cfg_carried, tokenizer_dir: str, shard_bytes: int) -> dict[str, Any]:
    """Where the loader's time goes: the same shards through the first stages only, MB/s of shard bytes each:
    ``read`` (``reader.read_shards``, raw tar members), ``rows`` (+ decode, chunk + text, tokenise; voxels
    carried, ``cfg_carried``), ``rows_direct`` (the rows of ``cfg``'s direct transport: where the voxels lie,
    not the voxels), and ``read_webdataset`` (Ray Data's own tar reading, the same rows as ``read``)."""
    import ray.data

    from volvlp_ray.data.pipeline import build_dataset, shard_files
    from volvlp_ray.data.reader import read_shards

    out = {}
    files = shard_files(cfg, "train")
    for name, ds in (("read", read_shards(files)),
                     ("rows", build_dataset(cfg_carried, "train", tokenizer_dir, training=True)),
                     ("rows_direct", build_dataset(cfg, "train", tokenizer_dir, training=True)),
                     ("read_webdataset", ray.data.read_webdataset(files, decoder=None))):
        for attempt in range(2):  # the second pass is timed (workers up)
            n, t0 = 0, time.perf_counter()
            for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
                n += len(next(iter(batch.values())))
            dt = time.perf_counter() - t0
        out[name] = {"rows": n, "seconds": dt, "shard_mb_per_s": shard_bytes / 1e6 / dt}
    return out


def _loader(cfg, tokenizer_dir: str, batch_size: int, shard_bytes: int) -> dict[str, Any]:
    from volvlp_ray.data.bucketing import bucket_by_depth, rebatch
    from volvlp_ray.data.pipeline import build_dataset, collate

    pz = cfg.model.patch[0]
    pool = cfg.data.bucket_pool
    ds = build_dataset(cfg, "train", tokenizer_dir, training=True)
    n = batches = 0
    z_tokens = z_padded = text_tokens = text_padded = 0
    plain_tokens = plain_padded = 0
    depths_seen: list[int] = []
    t0 = time.perf_counter()
    first = None

    def pools():
        nonlocal plain_tokens, plain_padded
        for p in rebatch(ds.iter_batches(batch_size=batch_size * pool, batch_format="numpy", drop_last=False),
                         batch_size * pool):
            # padding of the batches the stream gives without bucketing (consecutive rows), for comparison
            zt = -(-np.asarray(p["depth"]) // pz)
            for i in range(0, len(zt) - batch_size + 1, batch_size):
                plain_tokens += batch_size * int(zt[i:i + batch_size].max())
                plain_padded += batch_size * int(zt[i:i + batch_size].max()) - int(zt[i:i + batch_size].sum())
            yield p

    for batch in bucket_by_depth(pools(), batch_size, np.random.default_rng(cfg.seed)):
        if first is None:
            first = time.perf_counter() - t0
        t = collate(batch, patch_z=pz, hu_window=tuple(cfg.data.hu_window), hu=True)  # as the training loop
        b, d_max = t["volume"].shape[0], t["volume"].shape[2]
        real = (-(-t["depths"] // pz)).sum().item()  # z patches holding data
        z_tokens += b * d_max // pz
        z_padded += b * d_max // pz - real
        mask = t["attention_mask"]
        text_tokens += mask.numel()
        text_padded += int((mask == 0).sum())
        depths_seen += t["depths"].tolist()
        n += b
        batches += 1
    dt = time.perf_counter() - t0
    return {
        "volumes": n, "batches": batches, "batch_size": batch_size, "seconds": dt,
        "first_batch_s": first, "volumes_per_s": n / dt, "shard_mb_per_s": shard_bytes / 1e6 / dt,
        # in-plane patches per slice are the same for every volume, so z patches count vision tokens
        "vision_padding_fraction": z_padded / max(1, z_tokens),
        "bucket_pool": pool,
        "vision_padding_fraction_unbucketed": plain_padded / max(1, plain_tokens),
        "text_padding_fraction": text_padded / max(1, text_tokens),
        "depth_slices": {"min": int(min(depths_seen)), "median": float(np.median(depths_seen)),
                         "max": int(max(depths_seen))},
    }


def run(out: str | None = None, volumes: int = 200, val_volumes: int = 8, workspace: str | None = None,
        batch_size: int = 8, baseline_volumes: int = 50, overrides: list[str] | None = None) -> dict[str, Any]:
    import ray

    from volvlp_ray.config import load_config
    from volvlp_ray.data.shards import read_manifest
    from volvlp_ray.train.trainer import ensure_shards, ensure_tokenizer, start_local_ray

    tmp = None
    if workspace is None:
        tmp = tempfile.TemporaryDirectory(prefix="volvlp-bench-data-")
        workspace = tmp.name
    try:
        settings = [f"workspace={os.path.abspath(workspace)}", "data.source=synthetic", f"data.num_volumes={volumes}",
                    f"data.num_val_volumes={val_volumes}",
                    # the loader as Ray Data's rows + per-worker depth bucketing (the equal-work sampler, which
                    # needs the workers' agreement, is measured by jobs/benchmark.py scale)
                    "data.sampler=bucket", *(overrides or [])]
        cfg = load_config(None, settings)
        if not ray.is_initialized():
            start_local_ray(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="WARNING")
        t0 = time.perf_counter()
        source = ensure_shards(cfg)
        prepare_s = time.perf_counter() - t0
        tokenizer_dir = ensure_tokenizer(cfg)
        split_dir = Path(cfg.shards_path) / "train"
        manifest = read_manifest(split_dir)
        files = [str(split_dir / s["name"]) for s in manifest["shards"]]
        raw = _raw_read(files)
        baseline = _nifti_baseline(source, cfg, baseline_volumes)
        passes = [_loader(cfg, tokenizer_dir, batch_size, raw["bytes"]) for _ in range(2)]
        expected = manifest["num_samples"] // batch_size * batch_size  # bucketing keeps whole batches
        for p in passes:
            assert p["volumes"] == expected, (p["volumes"], expected)
        loader = passes[1]  # the second pass: Ray Data's workers and the tokenizer are up, as in a training run
        cfg_carried = load_config(None, [*settings, "data.volume_transport=object_store"])
        carried = [_loader(cfg_carried, tokenizer_dir, batch_size, raw["bytes"]) for _ in range(2)][1]
        assert carried["volumes"] == expected, (carried["volumes"], expected)
        stages = _stages(cfg, cfg_carried, tokenizer_dir, raw["bytes"])
        ratios = {
            "loader_vs_raw_mbps": loader["shard_mb_per_s"] / raw["mb_per_s"],
            "loader_vs_cold_raw_mbps": loader["shard_mb_per_s"] / raw["cold_mb_per_s"],
            "loader_vs_nifti_volumes_per_s": loader["volumes_per_s"] / baseline["volumes_per_s"],
            "vision_padding_fraction": loader["vision_padding_fraction"],
        }
        report = {
            "suite": "data",
            "machine": {"cpus": os.cpu_count(), "ray_cpus": ray.cluster_resources().get("CPU"),
                        "python": platform.python_version(), "platform": platform.platform()},
            "config": {"volumes": volumes, "batch_size": batch_size, "spacing": list(cfg.data.spacing),
                       "in_plane_size": cfg.data.in_plane_size, "text_mode": cfg.data.text_mode,
                       "volume_transport": cfg.data.volume_transport,
                       "max_text_length": cfg.data.max_text_length, "patch": list(cfg.model.patch),
                       "shards": len(files), "shard_bytes": raw["bytes"], "prepare_or_reuse_s": prepare_s},
            "raw_read": raw,
            "nifti_baseline": baseline,
            "loader": loader,
            "loader_first_pass": passes[0],
            "loader_object_store": carried,
            "loader_stages": stages,
            "ratios": ratios,
            "targets": TARGETS,
            "meets_target": {
                "loader_vs_raw_mbps": ratios["loader_vs_raw_mbps"] >= TARGETS["loader_vs_raw_mbps"],
                "loader_vs_cold_raw_mbps": ratios["loader_vs_cold_raw_mbps"] >= TARGETS["loader_vs_cold_raw_mbps"],
                "loader_vs_nifti_volumes_per_s":
                    ratios["loader_vs_nifti_volumes_per_s"] >= TARGETS["loader_vs_nifti_volumes_per_s"],
                "vision_padding_fraction": ratios["vision_padding_fraction"] <= TARGETS["vision_padding_fraction"],
            },
        }
        write_report(out, report)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


# per scale: --volumes, --val-volumes, --baseline-volumes, --batch-size, overrides
SCALES = {"ct-rate": (24, 2, 6, 4, CT_RATE_SCALE), "small": (200, 8, 50, 8, [])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--scale", choices=sorted(SCALES), default="ct-rate",
                        help="ct-rate: CT-RATE-sized volumes (0.75 x 0.75 x 1.5 mm, 480 in-plane, ~80 MB each; patch "
                             "10 x 20 x 20); small: the embedded default's 64² volumes (default: ct-rate)")
    parser.add_argument("--volumes", type=int, default=None, help="synthetic training volumes (ct-rate 24, small 200)")
    parser.add_argument("--val-volumes", type=int, default=None, help="synthetic held-out volumes, not timed (2 / 8)")
    parser.add_argument("--workspace", default=None, help="keep data and shards here (default: a temp dir)")
    parser.add_argument("--batch-size", type=int, default=None, help="(4 / 8)")
    parser.add_argument("--baseline-volumes", type=int, default=None,
                        help="volumes timed for the NIfTI baseline (6 / 50)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.in_plane_size=96")


def main(args: argparse.Namespace) -> dict[str, Any]:
    defaults = dict(zip(("volumes", "val_volumes", "baseline_volumes", "batch_size"), SCALES[args.scale][:4]))
    given = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
    report = run(out=args.out, workspace=args.workspace, overrides=list(SCALES[args.scale][4]) + list(args.overrides),
                 **{**defaults, **given})
    print(json.dumps({"ratios": report["ratios"], "meets_target": report["meets_target"],
                      "raw_mb_per_s": report["raw_read"]["mb_per_s"],
                      "nifti_volumes_per_s": report["nifti_baseline"]["volumes_per_s"],
                      "loader_volumes_per_s": report["loader"]["volumes_per_s"],
                      "loader_mb_per_s": report["loader"]["shard_mb_per_s"],
                      "loader_object_store_mb_per_s": report["loader_object_store"]["shard_mb_per_s"]}, indent=2))
    return report
