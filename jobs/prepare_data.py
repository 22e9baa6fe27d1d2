"""Convert a CT-RATE-layout folder (or the synthetic generator) into WebDataset shards with a Ray Data job.

    python jobs/prepare_data.py --source /mnt/shared/ct-rate --out /mnt/shared/volvlp/shards
    python jobs/prepare_data.py --source synthetic data.num_volumes=200     # into {workspace}/data/synthetic
    python jobs/prepare_data.py --source DIR --config configs/ctrate_vitb.yaml   # --out defaults to data.shards_dir

Writes {out}/{train,valid}/shard-*.tar, manifest.json and quarantine.json; a rerun with the same source and
options does nothing, one killed half-way finishes the missing groups. Bad input: one line on stderr, exit 2.
Joins the Ray cluster at $RAY_ADDRESS when set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from volvlp_ray.config import ConfigError, load_config
from volvlp_ray.data.ctrate import SPLITS, csv_paths, find_volumes


def layout_problem(source: Path) -> str | None:
    """Why ``source`` is not a usable CT-RATE-layout folder, or None."""
    if not source.is_dir():
        return f"source folder {str(source)!r} does not exist"
    for split in SPLITS:
        for kind in ("reports", "metadata", "labels"):
            if not csv_paths(source, split)[kind].is_file():
                return f"{source} is not in the CT-RATE layout: missing {csv_paths(source, split)[kind]}"
        if not find_volumes(source, split):
            return f"{source} is not in the CT-RATE layout: no {split}/**/*.nii.gz volumes"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help='a CT-RATE-layout folder, or "synthetic"')
    parser.add_argument("--out", default=None, help="shards folder (default: data.shards_dir, {workspace}/shards)")
    parser.add_argument("--config", default=None, help="YAML file: a partial config tree")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shard_max_bytes=1000000")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    out = Path(os.path.abspath(args.out or cfg.shards_path))
    if args.source == "synthetic":
        from volvlp_ray.data.synthetic import generate_dataset

        source = generate_dataset(cfg.workspace_path / "data" / "synthetic", cfg.data.num_volumes,
                                  cfg.data.num_val_volumes, seed=cfg.seed)
    else:
        source = Path(os.path.abspath(args.source))
        problem = layout_problem(source)
        if problem:
            print(f"input error: {problem}", file=sys.stderr)
            return 2
    from volvlp_ray.data.prepare import prepare_options, prepare_shards, shards_ready
    from volvlp_ray.data.shards import read_manifest

    if shards_ready(out, prepare_options(cfg), str(source)):
        counts = ", ".join(f"{s} {read_manifest(out / s)['num_samples']} samples" for s in SPLITS)
        print(f"[prepare] shards up to date at {out} ({counts}); nothing to do", flush=True)
        return 0
    import ray

    from volvlp_ray.train.trainer import start_local_ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
    else:
        start_local_ray(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="WARNING")
    try:
        prepare_shards(source, out, cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    print(f"[prepare] done: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
