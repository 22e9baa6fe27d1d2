"""Evaluate a pre-trained model: retrieval, zero-shot classification (CT-CLIP protocol), linear probe.

    python jobs/evaluate.py --checkpoint latest                                  # newest run in ./workspace
    python jobs/evaluate.py --checkpoint latest workspace=/mnt/volvlp --out eval.json
    python jobs/evaluate.py --checkpoint workspace/ray_results/RUN/checkpoint_…   # a Ray Train checkpoint
    python jobs/evaluate.py --checkpoint path/to/export --data other/shards/valid eval.volume_mode=sliding

Writes a JSON report (--out) and logs metrics and plots to MLflow: to the training run the checkpoint came from
when it is found, else to a new run. Joins the Ray cluster at $RAY_ADDRESS when set.
"""

from __future__ import annotations

import argparse
import sys

from volvlp_ray.config import ConfigError, add_verbose_flag, apply_verbose_flag
from volvlp_ray.eval.checkpoint import CheckpointError
from volvlp_ray.eval.job import run_evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="'latest', an export folder (vlp_config.json) or a Ray Train checkpoint folder (export/)")
    parser.add_argument("--data", default=None,
                        help="shards to evaluate: a split folder (manifest.json) or a shards root holding --split; "
                             "default: the workspace's shards")
    parser.add_argument("--split", default="valid", help="split under the shards root (default: valid)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--config", default=None, help="YAML file: a partial config tree (over the run's config)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.volume_mode=sliding workspace=ws")
    add_verbose_flag(parser)
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before, between or after the flags
    apply_verbose_flag(args)
    try:
        run_evaluation(args.checkpoint, data=args.data, split=args.split, out=args.out, config_file=args.config,
                       overrides=args.overrides, mlflow=not args.no_mlflow)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
