"""Embed CT scans with a pre-trained model: one scan -> embedding + zero-shot findings; a dataset -> Parquet.

    python jobs/embed.py --model latest ct.nii.gz                        # newest run in ./workspace: a table
    python jobs/embed.py --model latest ct.nii.gz dicom/series1/ --json --out emb.npz --report "No effusion."
    python jobs/embed.py --model models:/m-0123abcd ct.nii.gz --intercept -1024 workspace=/mnt/volvlp
    python jobs/embed.py --model latest --data workspace/shards --out embeddings.parquet --concurrency 2
    python jobs/embed.py --model latest --query embeddings.parquet --text "Cardiomegaly is present." --top 5

MODEL: an export folder (vlp_config.json), a Ray Train checkpoint folder (export/), ``latest`` (the newest run
of the workspace; ``workspace=DIR``), or an MLflow model URI (``models:/<id>``, ``runs:/<run_id>/model``; tracking
URI $MLFLOW_TRACKING_URI, else ``sqlite:///{workspace}/mlflow.db``). SCAN: a NIfTI file or a DICOM series folder,
preprocessed as the run's training data was. ``--data``: shards (a split folder or a shards root) or a
CT-RATE-layout folder, embedded by Ray Data actors into a folder of Parquet parts (restartable: a rerun embeds
only what is missing). Joins the Ray cluster at $RAY_ADDRESS when set. Errors: one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings

from volvlp_ray import console
from volvlp_ray.config import ConfigError, add_verbose_flag, apply_verbose_flag
from volvlp_ray.eval.checkpoint import CheckpointError

# MLflow warns (type hints of the pyfunc model's predict) when volvlp_ray.serving is imported, under its own
# "once" filter that no ignore filter overrides: recorded and dropped here, nothing this job can act on
with warnings.catch_warnings(record=True):
    from volvlp_ray.serving.batch import BatchError
    from volvlp_ray.serving.scan import ScanError

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="'latest', an export folder, a Ray Train checkpoint folder, "
                        "or an MLflow model URI (models:/<id>, runs:/<run_id>/model)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (stdout) instead of a table")
    parser.add_argument("--out", default=None, help="scans: .npy/.npz/.safetensors file of the (N, E) embeddings; "
                        "--data: the Parquet output folder")
    parser.add_argument("--report", default=None, help="report text: print each scan's cosine similarity to it")
    parser.add_argument("--slope", type=float, default=1.0, help="NIfTI scans: HU = slope * stored + intercept")
    parser.add_argument("--intercept", type=float, default=0.0, help="NIfTI scans: see --slope (CT-RATE: -1024)")
    parser.add_argument("--data", default=None, help="batch job: shards (split folder or root) or a CT-RATE layout")
    parser.add_argument("--split", default=None, help="batch job: only this split (default: every split found)")
    parser.add_argument("--concurrency", type=int, default=1, help="batch job: model actors (default 1)")
    parser.add_argument("--batch-size", type=int, default=0, help="batch job: volumes per batch (default: the "
                        "run's eval.batch_size)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="batch job without GPUs: CPUs per actor")
    parser.add_argument("--threads", type=int, default=0, help="batch job: torch threads per actor (default: its CPUs)")
    parser.add_argument("--limit", type=int, default=0, help="batch job: embed at most this many new volumes")
    parser.add_argument("--query", default=None, help="rank the volumes of this Parquet output by --text")
    parser.add_argument("--text", default=None, help="--query: the text to search for")
    parser.add_argument("--top", type=int, default=5, help="--query: how many volumes to list (default 5)")
    parser.add_argument("items", nargs="*", help="SCAN files/folders and dotted overrides (workspace=DIR, "
                        "eval.volume_mode=sliding, ...)")
    add_verbose_flag(parser)
    args = parser.parse_intermixed_args(argv)  # key=value overrides and scans may come before or after the flags
    apply_verbose_flag(args)
    overrides = [i for i in args.items if _OVERRIDE.match(i) and not os.path.exists(i)]
    scans = [i for i in args.items if i not in overrides]
    try:
        if args.data is not None or args.query is not None:
            if scans:
                raise ConfigError(f"scans ({scans[0]!r}, ...) cannot be given with --data or --query")
            return _batch(args, overrides) if args.data is not None else _query(args, overrides)
        return _scans(args, scans, overrides)
    except (ConfigError, CheckpointError, ScanError, BatchError, FileNotFoundError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, CheckpointError):
            text = f"--model {args.model}: {text}"
        print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr, flush=True)
        return 2


def _scans(args, scans: list[str], overrides: list[str]) -> int:
    from volvlp_ray.serving.scan import embed_scans, format_table, to_json

    console.setup_logging(None, "embed")
    say = (lambda t: print(t, file=sys.stderr, flush=True)) if args.json else (lambda t: print(t, flush=True))
    result = embed_scans(args.model, scans, overrides, report=args.report, out=args.out, slope=args.slope,
                         intercept=args.intercept, say=say)
    print(to_json(result) if args.json else format_table(result), flush=True)
    return 0


def _batch(args, overrides: list[str]) -> int:
    from volvlp_ray.eval.job import build_eval_config
    from volvlp_ray.serving.batch import embed_dataset

    if not args.out:
        raise ConfigError("--data needs --out: the folder the Parquet parts go to (e.g. embeddings.parquet)")
    pre, _ = build_eval_config(None, None, overrides)
    log = console.setup_logging(pre.workspace_path / "logs", f"embed-{time.strftime('%Y%m%d-%H%M%S')}")
    console.info(f"[embed] library logs: {log}")
    summary = embed_dataset(args.model, args.data, args.out, split=args.split, overrides=overrides,
                            concurrency=args.concurrency, batch_size=args.batch_size,
                            cpus_per_actor=args.cpus_per_actor, threads=args.threads, limit=args.limit)
    if args.json:
        print(json.dumps(summary, indent=1), flush=True)
    return 0


def _query(args, overrides: list[str]) -> int:
    from volvlp_ray.serving.batch import query_embeddings

    if args.text is None:
        raise ConfigError("--query needs --text: the report or finding to search for")
    console.setup_logging(None, "embed")
    res = query_embeddings(args.model, args.query, args.text, top=args.top, overrides=overrides, split=args.split)
    if args.json:
        print(json.dumps(res, indent=1), flush=True)
    else:
        print(f"[embed] {res['n']} volumes ranked by cosine similarity to {res['query']!r}:", flush=True)
        for r in res["results"]:
            print(f"{r['rank']:>4}  {r['score']:+.4f}  {r['split']:<8} {r['key']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
