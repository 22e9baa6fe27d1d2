"""The GPU matrix: which speed options pay off for ViT-B on CT, in one command on one GPU.

    python jobs/benchmark.py gpu --out gpu.json     # one CUDA GPU, about 8 minutes (--budget-s 480)
    python jobs/benchmark.py gpu --dry-run          # list the cases it would run (any machine)

Each case is the whole training step of ``benchmark model`` (ViT-B at 480 x 480 x 240 voxels, patch 10 x 20 x 20 =
13,824 tokens, a BERT-base-sized text tower, sigmoid loss, AdamW under DeepSpeed ZeRO-2, bf16), a few warm-up and
timed steps, in a process of its own: an out-of-memory error or an attention kernel that this GPU lacks ends
that case only, and its GPU memory is free again for the next. One factor at a time around a baseline
(no padding mask, SDPA's own kernel choice, no checkpointing, eager):

- attention backend: flash, cudnn, efficient (unmasked)
- grad checkpointing: selective, full
- masked attention (half the batch one z-patch shorter: a key-padding mask): auto, flash, cudnn, efficient
- the baseline inside Ray Train with one worker (the Ray overhead against the direct baseline)
- ``torch.compile`` of the vision blocks: with no checkpointing and with selective checkpointing

Cheap cases run first. A case that needs a kernel this GPU or torch build lacks (flash with a mask, say) is
recorded as ``skipped`` with the error; an OOM or another error as ``failed``. Past ``--budget-s`` seconds (from
the start) the running case is stopped and the rest are recorded as ``skipped: budget``. Reported per case:
samples/s, MFU against ``--peak-tflops`` (989: H100 and H200 dense bf16; model FLOPs, so recomputation is not
counted as useful work), peak memory (``max_memory_allocated``), step times, warm-up time (includes compiling).
Without CUDA the command says so and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from volvlp_ray.benchmarks import write_report
from volvlp_ray.benchmarks import model as model_bench

__all__ = ["BASELINE", "SHARED", "add_arguments", "main", "matrix", "run", "run_matrix"]

SHARED: dict[str, Any] = dict(preset="base", size=480, depth=240, patch=(10, 20, 20), device="cuda", bf16=True,
                              zero=2, optimizer="adamw")
"""Settings of every case (``benchmark model`` arguments)."""

BASELINE: dict[str, Any] = dict(padded=False, attention="auto", grad_checkpointing="none", compile=False, ray=False)
"""The case every other one differs from in one factor."""

DIMENSIONS = {"padded": (False, True), "attention": ("auto", "flash", "cudnn", "efficient"),
              "grad_checkpointing": ("none", "selective", "full"), "compile": (False, True), "ray": (False, True)}
MIN_CASE_S = 20.0
"""A case is not started with less time than this left in the budget."""
UNAVAILABLE = re.compile(r"no available kernel|not supported|unsupported|not implemented|no kernel", re.I)


def matrix() -> list[dict[str, Any]]:
    """The cases in the order they run (cheapest and most telling first), each ``BASELINE`` with a name and the
    factors it changes."""
    def case(name: str, **changes: Any) -> dict[str, Any]:
        return {"name": name, **BASELINE, **changes}

    return [
        case("baseline"),
        *(case(f"attention={a}", attention=a) for a in ("flash", "cudnn", "efficient")),
        case("ckpt=selective", grad_checkpointing="selective"),
        case("ckpt=full", grad_checkpointing="full"),
        *(case(f"masked attention={a}", padded=True, attention=a) for a in ("auto", "flash", "cudnn", "efficient")),
        case("ray_train", ray=True),
        case("compile", compile=True),
        case("compile ckpt=selective", compile=True, grad_checkpointing="selective"),
    ]


def _options(case: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """``benchmark model`` arguments of one case."""
    return {**SHARED, **common, **{k: case[k] for k in ("padded", "attention", "grad_checkpointing", "compile")}}


def _direct_case(options: dict[str, Any]) -> dict[str, Any]:
    """In the case's own process: validate (this touches CUDA, so never in the parent) and measure."""
    return model_bench._measure_direct(model_bench.build_settings(**options))


def _ray_case(options: dict[str, Any]) -> dict[str, Any]:
    """In the case's own process: the same step in a Ray Train ``TorchTrainer`` with one GPU worker. A stop
    (SIGTERM, at the budget) exits through ``atexit``, which shuts down the local Ray it started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as storage:
        return model_bench._measure_ray(model_bench.build_settings(**options), storage)


def _run_in_child(case: dict[str, Any], options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    target = _ray_case if case["ray"] else _direct_case
    return model_bench._measure_direct_in_child(options, timeout_s=timeout_s, target=target)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("samples_per_s", "mfu", "achieved_tflops", "peak_memory_gib", "warmup_s", "final_loss", "device_name",
            "fit_wall_s")
    out = {k: result[k] for k in keys if k in result}
    out["step_time_s_median"] = result["step_time_s"]["median"]
    return out


def run_matrix(cases: list[dict[str, Any]], options: dict[str, Any], budget_s: float,
               runner: Callable[[dict[str, Any], dict[str, Any], float], dict[str, Any]] = _run_in_child,
               clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    """Run ``cases`` one after another with ``runner(case, options, timeout_s)`` inside ``budget_s`` seconds;
    one record per case: ``status`` ok | skipped | failed, with the figures or the reason and the error."""
    start = clock()
    records = []
    for case in cases:
        record = dict(case)
        left = budget_s - (clock() - start)
        if left < MIN_CASE_S:
            records.append({**record, "status": "skipped", "reason": "budget",
                            "error": f"{max(left, 0):.0f} s of the {budget_s:.0f} s budget left"})
            print(f"[gpu] {case['name']}: skipped: budget", flush=True)
            continue
        print(f"[gpu] {case['name']}: running ({left:.0f} s of budget left)", flush=True)
        t0 = clock()
        try:
            record.update(status="ok", **_summary(runner(case, _options(case, options), left)))
        except TimeoutError as exc:
            record.update(status="skipped", reason="budget", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure of one case is a record, not the end of the matrix
            error = str(exc) or type(exc).__name__
            if "out of memory" in error.lower():
                record.update(status="failed", reason="out of memory", error=error[-2000:])
            elif case["attention"] != "auto" and UNAVAILABLE.search(error):
                record.update(status="skipped", reason=f"attention backend {case['attention']} unavailable",
                              error=error[-2000:])
            else:
                record.update(status="failed", reason="error", error=error[-2000:])
        record["wall_s"] = round(clock() - t0, 1)
        print(f"[gpu] {case['name']}: {record['status']}"
              + (f" {record['samples_per_s']:.2f} samples/s, MFU {record['mfu']:.3f}, {record['peak_memory_gib']} GiB"
                 if record["status"] == "ok" else f" ({record['reason']}: {record['error'][-300:]})"), flush=True)
        records.append(record)
    return records


def _report(records: list[dict[str, Any]], options: dict[str, Any], budget_s: float, wall_s: float) -> dict[str, Any]:
    ok = {r["name"]: r for r in records if r["status"] == "ok"}
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "config": {**SHARED, **options, "patch": list(SHARED["patch"]), "budget_s": budget_s},
        "host": {"torch": torch.__version__, "cuda": torch.version.cuda,
                 "device": next((r.get("device_name") for r in ok.values() if r.get("device_name")), None)},
        "cases": records,
        "wall_s": round(wall_s, 1),
    }
    base, ray = ok.get("baseline"), ok.get("ray_train")
    if base and ray:
        report["ray_overhead_pct"] = 100.0 * (1.0 - ray["samples_per_s"] / base["samples_per_s"])
        report["ray_overhead_pct_median"] = 100.0 * (ray["step_time_s_median"] / base["step_time_s_median"] - 1.0)
    if ok:
        best = max(ok.values(), key=lambda r: r["samples_per_s"])
        report["fastest"] = {"name": best["name"], "samples_per_s": best["samples_per_s"], "mfu": best["mfu"]}
    report["counts"] = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    return report


def run(out: str | None = None, budget_s: float = 480.0, batch_size: int = 8, steps: int = 3, warmup: int = 2,
        text_length: int = 192, peak_tflops: float = 989.0, cases: list[str] | None = None,
        dry_run: bool = False) -> dict[str, Any]:
    """Run the matrix (or, with ``dry_run``, only list it); write JSON to ``out`` (if given) and return it.
    ``cases``: run only the cases of these names. Raises ``ValueError`` without CUDA (unless ``dry_run``)."""
    plan = matrix()
    if cases:
        unknown = sorted(set(cases) - {c["name"] for c in plan})
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; the cases are {[c['name'] for c in plan]}")
        plan = [c for c in plan if c["name"] in cases]
    if budget_s <= 0 or batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need budget_s > 0, batch_size >= 1, steps >= 1, warmup >= 0; got {budget_s}, "
                         f"{batch_size}, {steps}, {warmup}")
    options = dict(batch_size=batch_size, steps=steps, warmup=warmup, text_length=text_length,
                   peak_tflops=peak_tflops)
    if dry_run:
        report = {"benchmark": "gpu", "dry_run": True, "config": {**SHARED, **options, "patch": list(SHARED["patch"]),
                                                                  "budget_s": budget_s},
                  "dimensions": {k: list(v) for k, v in DIMENSIONS.items()}, "cases": plan}
        write_report(out, report)
        return report
    if not torch.cuda.is_available():
        raise ValueError(f"needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False; torch "
                         f"{torch.__version__}). Run it on a GPU machine: python jobs/benchmark.py gpu --out gpu.json "
                         f"(about {budget_s / 60:.0f} minutes on one H100); --dry-run lists the cases anywhere")
    started = time.perf_counter()
    records = run_matrix(plan, options, budget_s)
    report = _report(records, options, budget_s, time.perf_counter() - started)
    write_report(out, report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``run``."""
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="time budget of the whole matrix in seconds; cases past it are skipped (default 480)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; compiling happens here)")
    parser.add_argument("--text-length", type=int, default=192, help="tokens per text")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="MFU denominator (989 = H100 / H200 dense bf16)")
    parser.add_argument("--cases", nargs="+", default=None, metavar="NAME", help="run only these cases (see --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run with parsed arguments; print the cases (dry run) or one line per case and the headline."""
    options = {k: v for k, v in vars(args).items() if k != "suite"}
    try:
        report = run(**options)
    except ValueError as exc:
        print(f"benchmark gpu: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if report.get("dry_run"):
        for i, case in enumerate(report["cases"], 1):
            print(f"{i:2d}. {case['name']:26s} " + " ".join(f"{k}={case[k]}" for k in DIMENSIONS))
        c = report["config"]
        print(f"{len(report['cases'])} cases: ViT-{c['preset']} {c['size']}x{c['size']}x{c['depth']}, patch "
              f"{'x'.join(map(str, c['patch']))}, batch {c['batch_size']}, {c['warmup']}+{c['steps']} steps each, "
              f"budget {c['budget_s']:.0f} s")
        return report
    headline = {k: report.get(k) for k in ("fastest", "ray_overhead_pct", "counts", "wall_s")}
    print(json.dumps(headline, indent=2))
    return report


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    main(_parser.parse_args())
