"""Pre-train the dual encoder.

    python jobs/pretrain.py                                   # embedded default: local Ray, CPU, synthetic data
    python jobs/pretrain.py --config configs/ctrate_vitb.yaml  workspace=/mnt/shared/volvlp
    python jobs/pretrain.py train.steps=50 loss.kind=swca loss.alpha=0.7
    ray job submit --working-dir . -- python jobs/pretrain.py workspace=/abs/path

Joins the Ray cluster at $RAY_ADDRESS when set; MLflow goes to $MLFLOW_TRACKING_URI or the workspace.
"""

from __future__ import annotations

import sys

from volvlp_ray.config import ConfigError, parse_cli
from volvlp_ray.train.trainer import run_pretraining


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_cli(argv, description=__doc__.splitlines()[0])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        run_pretraining(cfg)
    except ConfigError as exc:  # found once the job looks at its data (e.g. a source without a train split)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
