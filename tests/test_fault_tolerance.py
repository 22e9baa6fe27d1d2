"""Fault tolerance through the real job: a Ray Train worker killed by pid, the driver killed and run again.

All runs share one workspace (a copy of the session's tiny workspace: configs/tiny.yaml's data, shards and
tokenizer) and one config: 16 training volumes, batch 2 per worker x 2 workers, 16 steps (4 epochs of 4 steps:
the runs cross epoch boundaries before and after the kill), a checkpoint every 3 steps (so a resume lands
mid-epoch), a loss point every step. ``ref`` runs uninterrupted (the job in this process on the session's Ray,
conftest's ``pretrain_job``: nothing of it is killed), and so does the killed driver's rerun; the others run the
script, are killed once mid-run and must finish at step 16 with the same loss curve: identical before the kill (two
runs, one seed) and within tolerance after the resume.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from clusterutil import kill_tree

ROOT = Path(__file__).parents[1]
STEPS, EVERY = 16, 3
ARGS = ["train.batch_size=2", f"train.steps={STEPS}",
        f"train.checkpoint_every={EVERY}", "train.log_every=1", "train.warmup_steps=5", "eval.at_end=false"]
pytestmark = pytest.mark.timeout(1800)  # real jobs, two in a test (the module fixture's among them)
STEP_LINE = re.compile(r"\(RayTrainWorker pid=(\d+)[^)]*\).*\[train\] step (\d+)/")


def _cmd(ws: Path, run_name: str, *extra: str) -> list[str]:
    # --verbose: Ray forwards the workers' own output, so rank 0's step lines carry its pid (the worker to kill)
    return [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--verbose", "--config",
            str(ROOT / "configs" / "tiny.yaml"), f"workspace={ws}", f"run_name={run_name}", *ARGS, *extra]


def _env() -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop("RAY_ADDRESS", None)
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def _run_and_kill(cmd: list[str], kill_after_step: int, target: str, timeout: float = 900) -> tuple[int, str, int]:
    """Run ``cmd``; once rank 0 reports a step >= ``kill_after_step``, SIGKILL either that Ray Train worker
    (``target="worker"``, by the pid in its log prefix) or the driver with everything it started
    (``target="driver"``). Returns (exit code, output, the step seen at the kill)."""

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT,
                            start_new_session=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, killed_at = [], -1
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.search(line)
            if m and killed_at < 0 and int(m.group(2)) >= kill_after_step:
                killed_at = int(m.group(2))
                if target == "worker":
                    os.kill(int(m.group(1)), signal.SIGKILL)
                else:  # the driver's whole process tree: its local Ray (GCS, raylet, workers) dies with it
                    kill_tree(proc.pid)
                    break
        proc.wait()
    finally:
        timer.cancel()
    return proc.returncode, "".join(lines), killed_at


def _history(ws: Path, run_name: str) -> tuple[str, dict[int, list[float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`volvlp.run_name` = '{run_name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {run_name}"
    points: dict[int, list[float]] = {}
    for m in client.get_metric_history(runs[0].info.run_id, "train/loss"):
        points.setdefault(m.step, []).append(m.value)
    return runs[0].info.run_id, points


def _resumed_step(out: str) -> int:
    m = re.search(r"\[train\] resumed from step (\d+) \(epoch (\d+), (\d+) batches into it\)", out)
    assert m, "no resume line in the output:\n" + out[-4000:]
    return int(m.group(1))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, copy_tiny_workspace) -> Path:
    return copy_tiny_workspace(tmp_path_factory.mktemp("ft"))


@pytest.fixture(scope="module")
def reference(workspace, pretrain_job):
    out = pretrain_job(f"workspace={workspace}", "run_name=ref", *ARGS).ok().output
    assert "[data] shards ready" in out and "[prepare]" not in out, out[-3000:]
    _, points = _history(workspace, "ref")
    return points


def _assert_same_curve(points: dict[int, list[float]], ref: dict[int, list[float]], exact_through: int,
                       resumed_from: int) -> None:
    assert sorted(points) == list(range(1, STEPS + 1)), "every step logged, ending at the configured one"
    dup = {s: v for s, v in points.items() if len(v) > 1}
    assert not dup, f"duplicated step metrics: {dup}"
    ours = np.array([points[s][0] for s in range(1, STEPS + 1)])
    theirs = np.array([ref[s][0] for s in range(1, STEPS + 1)])
    print(f"\nloss vs the uninterrupted run: max |diff| before step {exact_through}: "
          f"{np.abs(ours[:exact_through] - theirs[:exact_through]).max():.3g}, after step {resumed_from}: "
          f"{np.abs(ours[resumed_from:] - theirs[resumed_from:]).max():.3g}")
    # before the failure: two runs with one seed on CPU give the same loss curve
    np.testing.assert_array_equal(ours[:exact_through], theirs[:exact_through])
    # after the resume: model, optimizer, schedule, RNG and data position were restored
    np.testing.assert_allclose(ours[resumed_from:], theirs[resumed_from:], rtol=1e-4, atol=1e-5)


def test_reference_run_is_deterministic_per_step(reference):
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 and np.isfinite(v[0]) for v in reference.values())


def test_worker_killed_by_pid_resumes_and_matches(workspace, reference):
    code, out, killed_at = _run_and_kill(_cmd(workspace, "killed", "train.max_failures=1"), 2 * EVERY + 2, "worker")
    assert code == 0, out[-6000:]
    assert killed_at > 0, "the run ended before the kill"
    resumed = _resumed_step(out)
    assert resumed % EVERY == 0 and EVERY <= resumed <= killed_at
    assert f"[train] step {STEPS}/{STEPS}" in out
    _, points = _history(workspace, "killed")
    _assert_same_curve(points, reference, exact_through=killed_at, resumed_from=resumed)


def test_driver_killed_and_rerun_continues_the_same_run(workspace, reference, pretrain_job):
    code, out1, killed_at = _run_and_kill(_cmd(workspace, "drv"), 2 * EVERY + 2, "driver")
    assert killed_at > 0 and code != 0
    run_id_1 = re.search(r"\[mlflow\] run drv \((\w+)\)", out1).group(1)
    # the second driver: the same job in this process, on the session's Ray (nothing of it is killed)
    out2 = pretrain_job(f"workspace={workspace}", "run_name=drv", *ARGS).ok().output
    resumed = _resumed_step(out2)
    assert resumed % EVERY == 0 and EVERY <= resumed <= killed_at, (resumed, killed_at)
    run_id, points = _history(workspace, "drv")
    assert run_id == run_id_1, "the second driver continues the first driver's MLflow run"
    _assert_same_curve(points, reference, exact_through=resumed, resumed_from=resumed)
    ckpts = sorted(p for p in (workspace / "ray_results" / "drv").glob("checkpoint_*") if p.is_dir())
    assert (ckpts[-1] / "export" / "vlp_config.json").is_file()
