"""`ray job submit --working-dir . -- python jobs/pretrain.py` against a real local cluster (`ray start --head`)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    # every agent port explicit: another Ray instance on this machine (the suite's own, a user's) holds defaults
    # such as the dashboard agent's 52365, and a head whose agent cannot bind accepts no jobs
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    bin_dir = Path(sys.executable).parent
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true", *agent_ports],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:])
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_runs_pretraining(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    ws = tmp_path / "ws"
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml", f"workspace={ws}", "run_name=submitted",
           "eval.at_end=false"]
    for _ in range(30):  # the job server answers before the head's job agent is registered
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        out = p.stdout + p.stderr
        if "No available agent" not in out:
            break
        time.sleep(3)
    assert p.returncode == 0, out[-6000:]
    assert "joined cluster" in out and "succeeded" in out.lower()
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'submitted'")
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "6"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
