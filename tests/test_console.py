"""What a job shows on its console (volvlp_ray/console.py): bars with a known number of lines, library logs in a
file, the project's warnings from any Ray worker on the driver's console -- and the real job's whole console."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from volvlp_ray import console

ROOT = Path(__file__).parents[1]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("total,updates", [(1, [1]), (7, [1] * 7), (600, [50] * 12), (600, [1] * 600), (10, [3, 3, 4])])
def test_a_plain_bar_prints_at_most_one_line_per_tenth_and_ends_at_its_total(total, updates):
    out = _Stream(tty=False)
    with console.Progress(total, "[train] step", unit="", plain_lines=10, stream=out) as bar:
        for n in updates:
            bar.update(n, loss=1.23456)
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 10, lines
    assert lines[-1].startswith(f"[train] step {total}/{total} (100%) in "), lines
    assert lines[-1].endswith("loss 1.235"), lines
    done = [int(re.match(r"\[train\] step (\d+)/", line).group(1)) for line in lines]
    assert done == sorted(done) and len(set(done)) == len(done), lines  # each line says more than the last
    assert "\r" not in out.getvalue()


def test_a_bar_on_a_terminal_is_one_redrawn_tqdm_line():
    out = _Stream(tty=True)
    with console.Progress(200, "[eval] embedded", unit="volumes", stream=out) as bar:
        for _ in range(200):
            bar.update(1)
    text = out.getvalue()
    assert "\r" in text and "200/200" in text  # redrawn in place
    assert "[eval] embedded 20/200 volumes (10%)" not in text  # not the plain lines


def test_a_disabled_bar_prints_nothing_and_the_summary_leaves_out_empty_rows(capsys):
    with console.progress(total=5, desc="x", disabled=True) as bar:
        bar.update(5)
    console.summary("done", [("run", "r1"), ("model", None), ("checkpoint", "/c")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("── done ") and out[1:] == ["  run         r1", "  checkpoint  /c"], out


_LOGGING = textwrap.dedent("""
    import logging, sys, warnings
    from volvlp_ray import console
    console.setup_logging(sys.argv[1], "job", verbose=sys.argv[2] == "1")
    import ray  # its handlers were set up on import (setup_logging imported it first)
    logging.getLogger("ray.data").warning("RAYDATA-RECORD")
    logging.getLogger("ray").warning("RAY-RECORD")
    logging.getLogger("mlflow.store").info("MLFLOW-RECORD")
    logging.getLogger("volvlp_ray.data.shards").error("PROJECT-ERROR")
    console.warn("[data] PROJECT-WARN")
    console.info("[data] PROJECT-INFO")
    warnings.warn_explicit("LIBRARY-WARNING", UserWarning, "/somewhere/site-packages/lib.py", 3)
    warnings.warn_explicit("PROJECT-PYWARNING", UserWarning, sys.argv[3], 3)
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_go_to_the_log_file_and_the_projects_warnings_to_the_console(tmp_path, verbose):
    p = subprocess.run([sys.executable, "-c", _LOGGING, str(tmp_path), "1" if verbose else "0",
                        str(ROOT / "volvlp_ray" / "data" / "pipeline.py")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    shown = p.stdout + p.stderr
    logged = (tmp_path / "job.log").read_text()
    for record in ("PROJECT-ERROR", "PROJECT-WARN", "PROJECT-INFO", "LIBRARY-WARNING", "PROJECT-PYWARNING"):
        assert record in logged, (record, logged)
    for record in ("PROJECT-ERROR", "PROJECT-WARN", "PROJECT-INFO", "PROJECT-PYWARNING"):
        assert shown.count(record) == 1, (record, shown)  # once: not again through a logging handler
    for record in ("RAYDATA-RECORD", "RAY-RECORD", "LIBRARY-WARNING"):
        assert shown.count(record) == (1 if verbose else 0), (record, shown)
    if not verbose:  # the libraries' records: in the file only (verbose: where their own handlers put them)
        for record in ("RAYDATA-RECORD", "RAY-RECORD", "MLFLOW-RECORD"):
            assert record in logged, (record, logged)
        assert "MLFLOW-RECORD" not in shown


def test_a_ray_tasks_warnings_reach_the_driver_through_the_relay(ray_session, capfd):
    """A Ray Data task or a Train worker is a process of its own: its project warnings (console.warn, a
    ``volvlp_ray.*`` logger's error) reach the driver's console through the relay, once, as the driver's own lines
    (a line Ray forwards carries the worker's pid); its info lines do not (only a Train worker holding the relay's
    handle sends those)."""
    import ray

    @ray.remote(num_cpus=0)
    def task(tag):
        import logging

        from volvlp_ray import console as c

        c.warn(f"[data] warning: RELAYED-WARN-{tag}")
        logging.getLogger("volvlp_ray.data.shards").error("RELAYED-ERROR-%s", tag)
        c.info(f"[data] RELAYED-INFO-{tag}")
        return os.getpid()

    with console.Relay(poll_s=0.1):
        pid = ray.get(task.remote("a"))
        time.sleep(0.5)
    time.sleep(2)  # what Ray would forward from the task has arrived by now
    out, err = capfd.readouterr()
    assert pid != os.getpid()
    lines = (out + err).splitlines()
    for text in ("RELAYED-WARN-a", "RELAYED-ERROR-a"):
        hits = [line for line in lines if text in line]
        assert len(hits) == 1 and "pid=" not in hits[0], (text, hits)
    # a progress line of a worker without a handle (a Ray Data task, a sweep trial's worker) stays where it was
    # printed: here Ray forwards it (this session's Ray forwards workers' output), prefixed with the task's pid
    assert all("pid=" in line for line in lines if "RELAYED-INFO-a" in line), lines
    assert any(line.startswith("[data] warning: RELAYED-WARN-a") for line in err.splitlines()), err
    assert any(line.startswith("error: [volvlp_ray.data.shards] RELAYED-ERROR-a") for line in err.splitlines()), err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_jobs_console_reads_at_a_glance(tmp_path, copy_tiny_workspace):
    """`python jobs/pretrain.py` as a user runs it, into a file: stages and bars, validation, the held-out
    summary and the closing table in at most 60 lines; no Ray or DeepSpeed internals; a warning from a training
    worker (a NaN step on rank 1, the test-only hook) on the console; Ray's own records in the run's log file."""
    ws = copy_tiny_workspace(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "VOLVLP_"))}
    env.update(PYTHONUNBUFFERED="1", VOLVLP_INJECT_NAN="1:5")
    # a relative workspace, as `python jobs/pretrain.py` with no arguments has ("workspace"): the training workers
    # (whose working directory is Ray's) must find its shards for validation too
    with open(tmp_path / "console.txt", "w") as f:
        p = subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config",
                            str(ROOT / "configs" / "tiny.yaml"), "workspace=ws", "run_name=glance", "train.steps=12",
                            "train.log_every=1", "eval.every=6"],
                           stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, timeout=840)
    text = (tmp_path / "console.txt").read_text()
    lines = text.splitlines()
    print(text)
    assert p.returncode == 0, text[-4000:]
    assert len(lines) <= 60, f"{len(lines)} lines"
    for stage in ("[ray] started a local instance", "[data] shards ready", "[mlflow] run glance",
                  "[train] 2 workers, 12 steps", "[train] validation every 6 steps", "[val] step 6:",
                  "[train] step 12/12 (100%)", "[train] done in", "[eval] zero-shot mean AUROC",
                  "── pre-training done", "  checkpoint  ", "  model       models:/"):
        assert stage in text, stage
    assert len([line for line in lines if line.startswith("[train] step ")]) <= 10  # a line per tenth at most
    # rank 1's NaN at step 5: rank 0's warning, through the relay
    assert "[train] warning: step 5: non-finite loss/gradients on some rank; update skipped" in text
    for noise in ("RayTrainWorker", "TrainController", "SplitCoordinator", "Execution plan", "Token authentication",
                  "[WARNING]", "INFO", "TrainingReport", "Checkpoint successfully created", "UserWarning",
                  "Setting accelerator"):
        assert noise not in text, noise
    log_file = Path(re.search(r"  logs\s+(\S+) \(driver\)", text).group(1))
    assert log_file.parent == ws / "logs"
    logged = log_file.read_text()
    assert "Token authentication is enabled" in logged and "[train] done in" in logged
