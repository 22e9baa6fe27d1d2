"""Benchmarks with JSON output.

    python jobs/benchmark.py loss --out loss.json     # global losses: per-rank peak memory and time vs world size,
                                                      # all-gather vs ring (gloo processes on this machine)
    python jobs/benchmark.py model --out model.json   # the whole training step (vision + text + loss + optimizer,
                                                      # DeepSpeed): samples/s, tokens/s, peak memory, MFU; no Ray
                                                      # unless --ray (the same step in Ray Train, one worker)
    python jobs/benchmark.py data --out data.json     # shards from synthetic CT-RATE-sized volumes (--scale small:
                                                      # 64²): raw shard read MB/s vs per-sample NIfTI load +
                                                      # resample vs the Ray Data loader (volumes/s, MB/s, padding)
    python jobs/benchmark.py scale --config configs/ctrate_vitb.yaml --world 1 8 64 --out scale.json
                                                      # the training batcher dealing a CT-RATE-scale stream to N
                                                      # simulated ranks: useful-work fraction, masked steps, padding
                                                      # (data.sampler=equal vs per-rank bucketing)
    python jobs/benchmark.py gpu --out gpu.json       # one GPU, <= 8 min (--budget-s 480): the ViT-B 480x480x240
                                                      # training step, unmasked/masked x SDPA backends x checkpointing
                                                      # none/selective/full x compile, once in Ray Train: samples/s,
                                                      # MFU, peak memory per case (--dry-run lists the cases)
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {"loss": "volvlp_ray.benchmarks.loss", "model": "volvlp_ray.benchmarks.model",
          "data": "volvlp_ray.benchmarks.data", "scale": "volvlp_ray.benchmarks.scale",
          "gpu": "volvlp_ray.benchmarks.gpu"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    modules = {}
    for name, module in SUITES.items():
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(sub.add_parser(name, help=(modules[name].__doc__ or "").splitlines()[0]))
    args = parser.parse_args(argv)
    modules[args.suite].main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
