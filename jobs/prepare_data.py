"""Convert a CT-RATE-layout folder (or the synthetic generator) into WebDataset shards with a Ray Data job.

    python jobs/prepare_data.py --source /mnt/shared/ct-rate --out /mnt/shared/volvlp/shards
    python jobs/prepare_data.py --source synthetic data.num_volumes=200     # into {workspace}/data/synthetic
    python jobs/prepare_data.py --source DIR --config configs/ctrate_vitb.yaml   # --out defaults to data.shards_dir
    python jobs/prepare_data.py --source s3://bucket/ct-rate --out "s3://bucket/shards?region=eu-west-1"

Source and out are local folders or pyarrow filesystem URIs (filesystem options in the query, credentials from
the environment, as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Writes {out}/{train,valid}/shard-*.tar,
manifest.json and quarantine.json (a source may hold one split only, as an external evaluation set
does: only that split is written); a rerun with the same source and options does nothing, one killed half-way
finishes the missing groups. Bad input: one line on stderr, exit 2. Joins the Ray cluster at $RAY_ADDRESS when
set (or uses the Ray instance this process already has).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from volvlp_ray import console
from volvlp_ray.config import ConfigError, add_verbose_flag, apply_verbose_flag, load_config
from volvlp_ray.data import storage
from volvlp_ray.data.ctrate import SPLITS, layout_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True,
                        help='a CT-RATE-layout folder or URI (s3://bucket/prefix?region=...), or "synthetic"')
    parser.add_argument("--out", default=None,
                        help="shards folder or URI (default: data.shards_dir, {workspace}/shards)")
    parser.add_argument("--config", default=None, help="YAML file: a partial config tree")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shard_max_bytes=1000000")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    apply_verbose_flag(args)
    try:
        # a real source gets CT-RATE's grid unless the file or an override sets one (config.CT_RATE_GRID)
        cfg = load_config(args.config, args.overrides, real_source=args.source != "synthetic")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    out = storage.normalise(args.out or cfg.shards_path)
    if args.source == "synthetic":
        from volvlp_ray.data.synthetic import generate_dataset

        source = str(generate_dataset(cfg.workspace_path / "data" / "synthetic", cfg.data.num_volumes,
                                      cfg.data.num_val_volumes, seed=cfg.seed))
        splits = list(SPLITS)
    else:
        source = storage.normalise(args.source)
        problem, splits = layout_check(source)  # one listing of the source, used by everything below
        if problem:
            print(f"input error: {problem}", file=sys.stderr)
            return 2
        d = cfg.data
        console.info(f"[prepare] source {storage.redact(source)}: split(s) {', '.join(splits)}; grid "
                     f"{' x '.join(f'{v:g}' for v in d.spacing)} mm (z, y, x), {d.in_plane_size}x{d.in_plane_size} "
                     "in-plane (data.spacing, data.in_plane_size)")
    from volvlp_ray.data.prepare import prepare_options, prepare_shards, shards_ready, source_id
    from volvlp_ray.data.shards import read_manifest

    try:
        ready = shards_ready(out, prepare_options(cfg), source_id(source), splits)
    except OSError as exc:
        print(f"input error: cannot read --out {storage.redact(out)!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if ready:
        counts = ", ".join(f"{s} {read_manifest(storage.child(out, s))['num_samples']} samples" for s in splits)
        console.info(f"[prepare] shards up to date at {storage.redact(out)} ({counts}); nothing to do")
        return 0
    console.setup_logging(cfg.workspace_path / "logs", f"prepare-{time.strftime('%Y%m%d-%H%M%S')}")
    import ray

    from volvlp_ray.train.trainer import start_local_ray

    if ray.is_initialized():  # called in a process that has Ray already (tests)
        pass
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**console.ray_init_kwargs())
    else:
        start_local_ray(num_cpus=os.cpu_count() or 1, include_dashboard=False, **console.ray_init_kwargs())
    try:
        prepare_shards(source, out, cfg, splits=splits)
    except (FileNotFoundError, ValueError) as exc:
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    console.info(f"[prepare] done: {storage.redact(out)}"
                 + (f"; library logs in {console.log_file()}" if console.log_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
