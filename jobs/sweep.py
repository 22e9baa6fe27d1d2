"""Sweep config keys with Ray Tune; every trial is a distributed pre-training run.

    python jobs/sweep.py                                                 # configs/sweep.yaml: SWCA α x temperature
    python jobs/sweep.py --config configs/sweep.yaml                     # the same, named explicitly
    python jobs/sweep.py --config configs/sweep.yaml sweep.name=a-t      # run again with the name to resume
    python jobs/sweep.py --config configs/sweep.yaml 'sweep.search_space={train.lr: {loguniform: [1e-4, 3e-3]}}' sweep.num_samples=8
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep.yaml workspace=/abs/path

Without --config the sweep is configs/sweep.yaml (the embedded default's loss, sigmoid, has no α to sweep).
MLflow: one parent run per sweep, a nested child run per trial; the best trial's config is written to
{workspace}/sweeps/{name}/best.yaml (run it with jobs/pretrain.py --config).
"""

from __future__ import annotations

import sys
from pathlib import Path

from volvlp_ray.config import ConfigError, parse_cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweep.yaml"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_cli(argv, description=__doc__.splitlines()[0], default_config=DEFAULT_CONFIG, tag="sweep")
        from volvlp_ray.tune import run_sweep

        run_sweep(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
