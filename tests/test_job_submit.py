"""The cluster path end to end, with real parts only: a Ray head (`ray start --head --num-cpus=2`, token
authentication), an MLflow tracking server (`jobs/mlflow_server.py`), and `ray job submit --working-dir .
--runtime-env ... -- python jobs/pretrain.py`. One head, one server and one job for the whole module; each test reads
a different side of it (what MLflow holds, what it must not hold, who the head and the server accept). The head has
2 CPUs, as a new user's 2-core machine: the default two workers (one CPU each) plus the CPU the data pipeline
needs do not fit, so the job fits itself (half a CPU reserved per worker) and validates during training, whose reads
need no Ray Data task; a job that cannot fit (3 workers) fails within a minute naming what is missing."""

from __future__ import annotations

import csv
import hashlib
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from clusterutil import (
    BIN,
    ROOT,
    free_port,
    http_status,
    listening_addresses,
    new_token,
    non_loopback_ipv4,
    ray_env,
    start_mlflow_server,
    start_ray_head,
    stop,
    wait_http_ok,
    wait_ray_head,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A token-authenticated Ray head and an MLflow server on loopback, started side by side."""
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "mlflow").mkdir()
    token = new_token()
    env = ray_env(token)
    head = server = None
    try:
        head, address = start_ray_head(tmp / "head.log", env, num_cpus=2)
        mlflow_port = free_port()
        server = start_mlflow_server(tmp / "mlflow", mlflow_port)  # no --host: the launcher's default
        wait_ray_head(head, address, env, tmp / "head.log")
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        wait_http_ok(f"{tracking_uri}/health", server, tmp / "mlflow" / "mlflow-server.log")
        yield {"address": address, "env": env, "token": token, "tracking_uri": tracking_uri, "mlflow_port": mlflow_port,
               "mlflow_pid": server.pid, "mlflow_root": tmp / "mlflow", "tmp": tmp}
    finally:
        stop(head, server, timeout=5)  # then SIGKILL: a test cluster has nothing to save (it never went in 20 s)


@pytest.fixture(scope="module")
def submitted(cluster):
    """`ray job submit` of the tiny pre-training run, tracked by the MLflow server; returns (workspace, output)."""
    tmp = cluster["tmp"]
    ws = tmp / "ws"
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = cluster["tracking_uri"]
    (tmp / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", ".",
           "--runtime-env", str(tmp / "runtime_env.yaml"), "--",
           "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml", f"workspace={ws}", "run_name=submitted",
           "eval.at_end=false", "eval.every=3"]
    t0 = time.time()
    for _ in range(30):  # the job server answers before the head's job agent is registered
        p = subprocess.run(cmd, cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=900)
        out = p.stdout + p.stderr
        if "No available agent" not in out:
            break
        time.sleep(3)
    print(f"ray job submit: {time.time() - t0:.0f}s")
    assert p.returncode == 0, out[-6000:]
    return ws, out


def _run(cluster, name="submitted"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["tracking_uri"])
    exp = client.get_experiment_by_name("volvlp_ray")
    assert exp is not None, "no volvlp_ray experiment on the tracking server"
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`volvlp.run_name` = '{name}'")
    return client, run


def test_ray_job_submit_runs_pretraining(cluster, submitted):
    _, out = submitted
    assert "joined cluster" in out and "succeeded" in out.lower()
    assert f"at {cluster['tracking_uri']}" in out  # the job tracked to the server, not to a workspace file
    # 2 CPUs for 2 workers x 1 CPU + 1 CPU for Ray Data: fitted, and said so; validation ran on the held-out volumes
    assert "[train] the cluster has 2 CPUs on 1 node" in out and "reserves 0.5 CPU instead of 1" in out, out[-4000:]
    assert "[train] validation every 3 steps on 8 held-out volumes" in out and "[val] step 6:" in out, out[-4000:]


def test_submitted_run_is_on_the_mlflow_server(cluster, submitted, tmp_path):
    import mlflow.artifacts

    client, run = _run(cluster)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "6" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["sys.ray"] and run.data.tags["sys.deepspeed"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6] and all(0 < m.value < 100 for m in history)
    assert "train/fit_seconds" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/t2v/mrr")] == [3, 6]
    # artifacts went through the server (proxied) into its artifact store, not to a path of the job's machine
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the run's files and its model (run artifact or MLflow 3 logged model) are in the server's store
    stored = {p.name for p in (cluster["mlflow_root"] / "mlartifacts").rglob("*") if p.is_file()}
    assert {"config.yaml", "model.safetensors", "vlp_config.json"} <= stored, stored
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                dst_path=str(tmp_path), tracking_uri=cluster["tracking_uri"])
    assert yaml.safe_load(Path(local).read_text())["train"]["steps"] == 6


def test_no_patient_data_reaches_the_mlflow_server(cluster, submitted, tmp_path):
    """Report text and voxels stay out of everything the server holds: params, tags, metrics, every artifact,
    and the server's own database and artifact store on disk (the job ran with the default opt-outs)."""
    import mlflow.artifacts

    ws, _ = submitted
    client, run = _run(cluster)
    assert run.data.params["tracking.log_text"] == "False" and run.data.params["tracking.log_volumes"] == "False"
    reports = ws / "data" / "synthetic" / "radiology_text_reports"
    sentences = set()
    for name in ("train_reports.csv", "validation_reports.csv"):
        for row in csv.DictReader(open(reports / name)):
            for field in ("Findings_EN", "Impressions_EN"):
                sentences |= {s.strip() for s in row[field].split(".") if len(s.strip()) > 25}
    assert len(sentences) > 20

    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
    everything = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path),
                                                          tracking_uri=cluster["tracking_uri"]))
    files = [p for p in everything.rglob("*") if p.is_file()]
    files += [p for p in cluster["mlflow_root"].rglob("*") if p.is_file() and not p.name.endswith(".log")]
    assert any(p.name == "model.safetensors" for p in files) and any(p.suffix == ".db" for p in files)
    # the project's own source travels with an MLflow model (code_paths); the synthetic generator's sentence
    # templates in it are code, not patient data: skip files identical to a source file, scan everything else
    source = {hashlib.sha256(p.read_bytes()).digest() for p in (ROOT / "volvlp_ray").rglob("*.py")}
    texts += [b.decode("utf-8", errors="ignore") for p in files
              if hashlib.sha256(b := p.read_bytes()).digest() not in source]
    blob = "\n".join(texts)
    leaked = [s for s in sentences if s in blob]
    assert not leaked, leaked[:3]
    # voxels: no array or image-volume files among the artifacts (the model export is weights + configs + tokenizer)
    volume_like = [p.name for p in files if p.name.endswith((".npy", ".npz", ".nii", ".nii.gz", ".tar", ".pkl", ".pt"))]
    assert not volume_like, volume_like


def test_ray_head_rejects_requests_without_the_token(cluster, submitted):
    """Token authentication stays on: the job API answers only requests that carry the cluster's token."""
    jobs_url = f"{cluster['address']}/api/jobs/"
    assert http_status(jobs_url) == 401
    assert http_status(jobs_url, {"Authorization": "Bearer " + "0" * 64}) == 403
    assert http_status(jobs_url, {"Authorization": f"Bearer {cluster['token']}"}) == 200

    submit = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--no-wait", "--",
              "python", "-c", "open('/tmp/volvlp-should-not-run', 'w')"]
    no_token = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    for env in ({**no_token, "RAY_AUTH_MODE": "disabled"}, {**cluster["env"], "RAY_AUTH_TOKEN": "f" * 64}):
        p = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0, p.stdout + p.stderr
        assert "authentication" in (p.stdout + p.stderr).lower()
    request = urllib.request.Request(jobs_url, headers={"Authorization": f"Bearer {cluster['token']}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        entrypoints = [job.get("entrypoint") or "" for job in json.load(r)]
    assert not [e for e in entrypoints if "volvlp-should-not-run" in e]
    assert [e for e in entrypoints if "jobs/pretrain.py" in e]  # the authenticated submission is there


def test_mlflow_server_binds_loopback_by_default(cluster):
    """`jobs/mlflow_server.py` without --host listens on 127.0.0.1 only, and refuses foreign Host headers."""
    port = cluster["mlflow_port"]
    assert listening_addresses(cluster["mlflow_pid"], port) == {"127.0.0.1"}
    other = non_loopback_ipv4()
    if other is not None:  # this machine's other interfaces get no answer
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((other, port)) != 0
    search = f"{cluster['tracking_uri']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 200
    assert http_status(search, {"Host": "attacker.example.com"}) in (400, 403)  # DNS-rebinding protection


def test_a_job_too_big_for_the_cluster_fails_within_a_minute_naming_what_is_missing(cluster, submitted, tmp_path):
    """Three workers of one CPU cannot run on the 2-CPU head: the job fails before preparing any data, naming the
    missing CPU and the settings to change, instead of waiting forever for its placement group."""
    ws = tmp_path / "ws"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", ".",
           "--runtime-env", str(cluster["tmp"] / "runtime_env.yaml"), "--",
           "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml", f"workspace={ws}", "scaling.num_workers=3"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=300)
    seconds = time.time() - t0
    out = p.stdout + p.stderr
    print(f"ray job submit (too big): {seconds:.0f}s")
    assert p.returncode != 0, out[-4000:]
    assert "ClusterTooSmallError" in out and "it has 2 CPUs on 1 node" in out, out[-4000:]
    assert "Missing: 1 CPU(s) for the training workers" in out and "scaling.num_workers" in out, out[-4000:]
    assert seconds < 60, seconds
    assert not (ws / "shards").exists()  # it failed before any data was prepared
