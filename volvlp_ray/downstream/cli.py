"""The command line the downstream jobs share: ``--checkpoint``, ``--config``, ``--out``, ``--no-mlflow``, overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from volvlp_ray.config import ConfigError, add_verbose_flag, apply_verbose_flag


def downstream_main(argv: list[str] | None, description: str, run: Callable[..., dict], example: str) -> int:
    """Parse the arguments and call ``run(checkpoint, config_file, overrides, out, mlflow=...)``; configuration,
    checkpoint and missing-data errors end with one ``error:`` line and exit code 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True,
                        help="'latest', an export folder (vlp_config.json) or a Ray Train checkpoint folder (export/)")
    parser.add_argument("--config", default=None, help="YAML file: a partial config tree (over the run's config)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    add_verbose_flag(parser)
    args = parser.parse_intermixed_args(argv)
    apply_verbose_flag(args)
    from volvlp_ray.eval.checkpoint import CheckpointError

    try:
        run(args.checkpoint, args.config, args.overrides, args.out, mlflow=not args.no_mlflow)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
