"""Ablate the method on one data set: a Ray Tune grid of pre-training runs, each evaluated on the held-out split.

    python jobs/ablate.py                                  # configs/ablation.yaml: the default grid (2-core budget)
    python jobs/ablate.py --config configs/ablation.yaml ablation.name=abl   # the same name again resumes
    ray job submit --working-dir . -- python jobs/ablate.py --config configs/ablation_full.yaml workspace=/abs/path

Loss {clip, sigmoid, SWCA-sigmoid, SWCA-softmax} x text {report, organ with K chunks} x seeds, plus an alpha arm and
a global-batch arm (see volvlp_ray/ablate.py). Writes {workspace}/ablations/{name}/results.md (+ .json, plots) and
logs them to an MLflow parent run with a nested run per trial.
"""

from __future__ import annotations

import sys
from pathlib import Path

from volvlp_ray.config import ConfigError, parse_cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ablation.yaml"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_cli(argv, description=__doc__.splitlines()[0], default_config=DEFAULT_CONFIG, tag="ablate")
        from volvlp_ray.ablate import run_ablation

        run_ablation(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
