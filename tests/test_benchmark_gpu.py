"""The GPU matrix (``python jobs/benchmark.py gpu``): its case list, its refusal without CUDA, and how it runs cases
(isolated failures, the time budget) with a stand-in for the per-case process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volvlp_ray.benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "jobs/benchmark.py", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")
def test_without_cuda_the_job_says_it_needs_a_gpu_and_exits_2(tmp_path):
    out = tmp_path / "gpu.json"
    p = _job("--out", str(out))
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    message = [line for line in p.stderr.splitlines() if line.startswith("benchmark gpu:")]
    assert len(message) == 1 and "needs a CUDA GPU" in message[0], p.stderr[-2000:]
    assert "python jobs/benchmark.py gpu --out gpu.json" in message[0] and "--dry-run" in message[0]
    assert "Traceback" not in p.stderr
    assert not out.exists()  # nothing written


def test_dry_run_lists_every_dimension_of_the_matrix(tmp_path):
    out = tmp_path / "plan.json"
    p = _job("--dry-run", "--out", str(out))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    plan = json.loads(out.read_text())
    cases = plan["cases"]
    assert plan["dry_run"] and len(cases) == len({c["name"] for c in cases}) == 13
    assert all(c["name"] in p.stdout for c in cases) and "13 cases" in p.stdout
    c = plan["config"]
    assert (c["preset"], c["size"], c["depth"], c["patch"], c["bf16"], c["budget_s"]) == (
        "base", 480, 240, [10, 20, 20], True, 480.0)
    # every value of every dimension is run; masked attention with every backend; checkpointing with compile
    for dim, values in gpu.DIMENSIONS.items():
        assert {case[dim] for case in cases} == set(values), dim
    combos = {(case["padded"], case["attention"]) for case in cases}
    assert combos == set(itertools.product((False, True), ("auto", "flash", "cudnn", "efficient")))
    assert {(case["compile"], case["grad_checkpointing"]) for case in cases} >= {(True, "none"), (True, "selective")}
    # one factor at a time around the baseline, which runs first; Ray once, on the baseline
    assert cases[0]["name"] == "baseline" and all(cases[0][d] == gpu.BASELINE[d] for d in gpu.BASELINE)
    ray = [case for case in cases if case["ray"]]
    assert len(ray) == 1 and all(ray[0][d] == gpu.BASELINE[d] for d in gpu.BASELINE if d != "ray")
    assert _job("--dry-run", "--cases", "nope").returncode == 2


def test_failures_are_records_and_the_budget_skips_the_rest():
    """A stand-in for the per-case process: an OOM, an unavailable kernel and a stop at the budget each end one
    case, never the matrix; with the budget spent the remaining cases are recorded as skipped."""
    cases = gpu.matrix()
    now = [0.0]
    calls = []

    def runner(case, options, timeout_s):
        calls.append((case["name"], options, timeout_s))
        now[0] += 50.0
        if case["name"] == "attention=flash":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if case["name"] == "masked attention=flash":
            raise RuntimeError("No available kernel. Aborting execution.")
        if case["name"] == "ckpt=full":
            raise ValueError("something else broke")
        if case["name"] == "ray_train":
            raise TimeoutError("the benchmark process did not finish within 80 s and was stopped")
        sps = 10.0 if case["name"] == "baseline" else 9.0
        return {"samples_per_s": sps, "mfu": 0.3, "achieved_tflops": 300.0, "peak_memory_gib": 40.0,
                "warmup_s": 5.0, "final_loss": 1.0, "device_name": "NVIDIA H100 80GB HBM3",
                "step_time_s": {"median": 8 / sps, "mean": 8 / sps, "min": 0.5, "max": 1.0}}

    records = gpu.run_matrix(cases, {"batch_size": 8}, budget_s=560.0, runner=runner, clock=lambda: now[0])
    by = {r["name"]: r for r in records}
    assert [r["name"] for r in records] == [c["name"] for c in cases]
    assert by["baseline"]["status"] == "ok" and by["baseline"]["samples_per_s"] == 10.0
    assert (by["attention=flash"]["status"], by["attention=flash"]["reason"]) == ("failed", "out of memory")
    assert by["masked attention=flash"]["status"] == "skipped"
    assert "unavailable" in by["masked attention=flash"]["reason"] and "No available kernel" in \
        by["masked attention=flash"]["error"]
    assert (by["ckpt=full"]["status"], by["ckpt=full"]["error"]) == ("failed", "something else broke")
    # 11 cases started (50 s each): the 11th (ray_train) got the 60 s left and was stopped; then none left
    assert len(calls) == 11 and calls[-1][0] == "ray_train" and calls[-1][2] == pytest.approx(60.0)
    assert (by["ray_train"]["status"], by["ray_train"]["reason"]) == ("skipped", "budget")
    assert [by[n]["status"] for n in ("compile", "compile ckpt=selective")] == ["skipped", "skipped"]
    assert by["compile"]["reason"] == "budget"
    # each case gets the shared settings and its own factors
    opts = {name: o for name, o, _ in calls}
    assert opts["masked attention=auto"]["padded"] is True
    assert opts["ckpt=selective"]["grad_checkpointing"] == "selective"
    assert all(o["preset"] == "base" and o["batch_size"] == 8 for o in opts.values())

    report = gpu._report(records, {"batch_size": 8}, 560.0, 600.0)
    assert report["fastest"]["name"] == "baseline" and report["host"]["device"] == "NVIDIA H100 80GB HBM3"
    assert report["counts"] == {"ok": 7, "skipped": 4, "failed": 2} and "ray_overhead_pct" not in report
    ray = {**by["ray_train"], "status": "ok", "samples_per_s": 9.5, "step_time_s_median": 8 / 9.5}
    report = gpu._report([by["baseline"], ray], {}, 560.0, 100.0)
    assert report["ray_overhead_pct"] == pytest.approx(5.0)
    assert report["ray_overhead_pct_median"] == pytest.approx(100 * (10 / 9.5 - 1))


def _fails_like_an_oom(settings):
    raise RuntimeError(f"CUDA out of memory (case {settings['case']})")


def _hangs(settings):
    import time

    time.sleep(300)


def _answers(settings):
    return {"case": settings["case"], "pid": os.getpid()}


def test_each_case_process_reports_its_error_or_is_stopped_at_its_time_limit():
    """The per-case process of the matrix (``benchmark model``'s spawned child): its result, its error text, and
    a stop at the time limit come back to the parent, which goes on."""
    from volvlp_ray.benchmarks.model import _measure_direct_in_child

    result = _measure_direct_in_child({"case": 1}, timeout_s=120, target=_answers)
    assert result["case"] == 1 and result["pid"] != os.getpid()
    with pytest.raises(RuntimeError, match=r"RuntimeError: CUDA out of memory \(case 2\)"):
        _measure_direct_in_child({"case": 2}, timeout_s=120, target=_fails_like_an_oom)
    with pytest.raises(TimeoutError, match="did not finish within 8 s"):
        _measure_direct_in_child({"case": 3}, timeout_s=8, target=_hangs)
