"""MetricLogger's background sender against a real `mlflow server` (SQLite backend) that goes away and comes back;
the driver's PostTrainingLog and the replay CLI; and (slow) a real training run whose server is killed twice.

One server per module, started by the project's launcher (`jobs/mlflow_server.py`) on a free port; tests that
kill it start it again on the same port with the same store. A small TCP proxy stands in for a network that
loses responses (the request took effect, the client never hears so)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from clusterutil import base_env, free_port, kill_tree, wait_http_ok

from volvlp_ray.tracking import MetricLogger, PostTrainingLog, replay_metrics_file
from volvlp_ray.tracking import main as tracking_cli

KEYS = ("train/loss", "train/lr")
ROOT = Path(__file__).parents[1]


class Server:
    """`mlflow server` that a test can kill (SIGKILL, its whole process group) and start again as it was."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        # the project's launcher, one worker, without MLflow's job executor (its extra processes slow the start)
        cmd = [sys.executable, str(ROOT / "jobs" / "mlflow_server.py"), "--port", str(self.port),
               "--workspace", str(self.root), "--workers", "1"]
        log = self.root / "mlflow-server.log"
        self.proc = subprocess.Popen(cmd, env={**base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                     stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.root)
        wait_http_ok(f"{self.uri}/health", self.proc, log, timeout=120)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def run(server):
    """A fresh run on the (running) server: (client, run_id)."""
    from mlflow.tracking import MlflowClient

    server.start()
    client = MlflowClient(server.uri)
    return client, client.create_run("0").info.run_id


@pytest.fixture
def tracking_log(caplog):
    caplog.set_level(logging.INFO, logger="volvlp_ray.tracking")
    return caplog


def metrics(step: int) -> dict[str, float]:
    return {"train/loss": 1.0 / (step + 1), "train/lr": 1e-3 * step}


def assert_exactly_once(client, run_id: str, steps) -> None:
    for key in KEYS:
        logged = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert logged == sorted(steps), f"{key}: {len(logged)} values, steps {logged[:5]}..{logged[-5:]}"


def counts(**kw: int) -> dict[str, int]:
    """What replay_metrics_file returns: these counts, the others 0."""
    return {"sent": 0, "present": 0, "tags": 0, "artifacts": 0, "models": 0, "status": 0, **kw}


def warnings_with(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_all_steps_arrive_once_and_a_resume_skips_them(run, tmp_path):
    client, run_id = run
    logger = MetricLogger(client.tracking_uri, run_id, fallback_path=tmp_path / "unsent.jsonl")
    for step in range(200):
        logger.log(metrics(step), step)
    logger.close(timeout_s=60)
    logger.close(timeout_s=60)  # idempotent
    assert_exactly_once(client, run_id, range(200))
    assert logger.stats() == {"sent": 400, "buffered": 0, "failures": 0, "spilled": 0}
    assert not (tmp_path / "unsent.jsonl").exists()

    # a resumed job: steps already in the run are not logged again
    resumed = MetricLogger(client.tracking_uri, run_id, fallback_path=tmp_path / "unsent.jsonl")
    assert resumed.skip_logged_steps("train/loss") == 199
    for step in range(150, 250):
        resumed.log(metrics(step), step)
    resumed.set_tags({"phase": "resumed"})
    assert resumed.flush(60)
    resumed.close()
    assert_exactly_once(client, run_id, range(250))
    assert client.get_run(run_id).data.tags["phase"] == "resumed"


def test_server_killed_and_restarted(server, run, tmp_path, tracking_log):
    client, run_id = run
    logger = MetricLogger(server.uri, run_id, fallback_path=tmp_path / "unsent.jsonl", backoff_initial_s=0.2,
                          backoff_max_s=1.0, request_timeout_s=2)
    for step in range(50):
        logger.log(metrics(step), step)
    assert logger.flush(60)
    server.kill()
    slowest = 0.0
    for step in range(50, 150):
        t0 = time.perf_counter()
        logger.log(metrics(step), step)
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.02)  # ~2 s of training with the server gone
    assert slowest < 0.05, f"log() took {slowest * 1000:.1f} ms with the server down"
    assert logger.stats()["failures"] >= 2  # retried, ...
    assert len(warnings_with(tracking_log, "MLflow tracking server unreachable")) == 1  # ... and said so once
    assert "training continues; retrying" in warnings_with(tracking_log, "unreachable")[0]

    server.start()  # same port, same SQLite store
    logger.close(timeout_s=60)
    assert_exactly_once(client, run_id, range(150))
    stats = logger.stats()
    assert stats["sent"] == 300 and stats["buffered"] == 0 and stats["spilled"] == 0, stats
    assert any("reachable again" in r.getMessage() for r in tracking_log.records if r.levelno == logging.INFO)
    assert len(warnings_with(tracking_log, "unreachable")) == 1


def test_server_never_back_close_spills_then_replay(server, run, tmp_path, tracking_log):
    """The server the logger knows (a proxy to the real one) goes for good; the file is replayed into the real one."""
    client, run_id = run
    fallback = tmp_path / "unsent.jsonl"
    proxy = Proxy(server.port)
    logger = MetricLogger(proxy.uri, run_id, fallback_path=fallback, backoff_max_s=1.0, request_timeout_s=2)
    for step in range(30):
        logger.log(metrics(step), step)
    assert logger.flush(60)
    proxy.stop()
    for step in range(30, 80):
        logger.log(metrics(step), step)
    t0 = time.monotonic()
    logger.close(timeout_s=2)  # no exception
    assert time.monotonic() - t0 < 4
    lines = [json.loads(line) for line in fallback.read_text().splitlines()]
    assert sorted((d["key"], d["step"]) for d in lines) == sorted((k, s) for k in KEYS for s in range(30, 80))
    assert {d["run_id"] for d in lines} == {run_id}
    assert logger.stats()["spilled"] == 100
    (warning,) = warnings_with(tracking_log, str(fallback))
    assert "replay_metrics_file" in warning and f"python -m volvlp_ray.tracking replay {fallback}" in warning

    assert replay_metrics_file(fallback, server.uri, run_id) == counts(sent=100)
    assert_exactly_once(client, run_id, range(80))
    assert replay_metrics_file(fallback, server.uri, run_id) == counts(present=100)
    assert_exactly_once(client, run_id, range(80))


class Proxy:
    """Loopback TCP proxy to the server. It passes every request on but, for the first ``lose`` log-batch
    requests, throws the server's answer away and cuts the connection (the request took effect, the client
    never hears so). ``stop()`` is a server that vanished: open connections cut, new ones refused."""

    def __init__(self, port: int, lose: int = 0):
        self.target, self.lose, self.lost = port, lose, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _cut(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the other thread's recv, and the client sees the end
            except OSError:
                pass
            s.close()

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.target))
        self.sockets += [conn, up]
        losing = threading.Event()

        def upstream() -> None:
            try:
                while data := conn.recv(65536):
                    if b"/runs/log-batch" in data and self.lost < self.lose:
                        self.lost += 1
                        losing.set()
                    up.sendall(data)
            except OSError:
                pass
            self._cut(conn, up)

        threading.Thread(target=upstream, daemon=True).start()
        try:
            while data := up.recv(65536):
                if losing.is_set():  # the server has done it; the client will never know
                    break
                conn.sendall(data)
        except OSError:
            pass
        self._cut(conn, up)

    def stop(self) -> None:
        self._cut(self.listener, *self.sockets)


def test_lost_responses_do_not_duplicate(server, run, tmp_path):
    client, run_id = run
    proxy = Proxy(server.port, lose=2)
    try:
        logger = MetricLogger(proxy.uri, run_id, fallback_path=tmp_path / "unsent.jsonl", backoff_initial_s=0.1,
                              batch_size=50)
        for step in range(100):
            logger.log(metrics(step), step)
        assert logger.flush(60)
        logger.close()
    finally:
        proxy.stop()
    assert proxy.lost == 2
    assert logger.stats()["failures"] >= 2 and logger.stats()["sent"] == 200
    assert_exactly_once(client, run_id, range(100))


def test_unreachable_from_the_start_is_bounded(tmp_path, tracking_log):
    """No server at all: the resume check gives up in its time, log() does not wait, close() keeps the values."""
    fallback = tmp_path / "unsent.jsonl"
    logger = MetricLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, fallback_path=fallback,
                          backoff_initial_s=0.1)
    t0 = time.monotonic()
    assert logger.skip_logged_steps("train/loss", timeout_s=1) == -1
    assert time.monotonic() - t0 < 3
    assert warnings_with(tracking_log, "no step is skipped")
    for step in range(5):
        logger.log(metrics(step), step)
    logger.close(timeout_s=0.5)
    assert len(fallback.read_text().splitlines()) == 10


def test_sender_does_not_keep_the_process_alive(tmp_path):
    """A process that never calls close() still exits (daemon thread); its exit hook writes the unsent values."""
    fallback = tmp_path / "unsent.jsonl"
    code = textwrap.dedent(f"""
        from volvlp_ray.tracking import MetricLogger
        logger = MetricLogger("http://127.0.0.1:{free_port()}", "{'0' * 32}", fallback_path={str(fallback)!r},
                              exit_timeout_s=1)
        for step in range(3):
            logger.log({{"train/loss": 1.0}}, step)
    """)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert [json.loads(line)["step"] for line in fallback.read_text().splitlines()] == [0, 1, 2]


def test_post_training_log_sends_rank0_file_then_logs_once(run, server, tmp_path, capsys):
    """The driver after training, server up: rank 0's unsent file is sent first; metrics are not logged twice."""
    client, run_id = run
    path = tmp_path / f"{run_id}.jsonl"
    gone = MetricLogger(f"http://127.0.0.1:{free_port()}", run_id, fallback_path=path, backoff_initial_s=0.1)
    for step in range(10):
        gone.log(metrics(step), step)
    gone.close(timeout_s=0.5)  # rank 0 could not send them: they are in the file

    post = PostTrainingLog(server.uri, run_id, path, wait_s=5)
    assert not path.exists() and path.with_name(path.name + ".replayed").is_file()
    assert_exactly_once(client, run_id, range(10))
    assert post.metrics({"train/fit_seconds": 1.0}, 10) is True
    assert post.metrics({"train/fit_seconds": 2.0}, 10) is False  # already there at that step
    post.terminate("FINISHED")
    assert post.report("done") is False
    assert [m.value for m in client.get_metric_history(run_id, "train/fit_seconds")] == [1.0]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "[mlflow] the metrics rank 0 could not send are in MLflow now: 20 values sent" in capsys.readouterr().out


def test_post_training_log_server_away_then_replay_cli(run, server, tmp_path, capsys):
    """The driver after training, server away: seconds (not MLflow's minutes of retries), everything to the file,
    one clear error; the CLI sends it exactly once (a once-per-step value with another timestamp is not added)."""
    client, run_id = run
    path = tmp_path / f"{run_id}.jsonl"
    plot = tmp_path / "roc.txt"
    plot.write_text("a plot")
    t0 = time.monotonic()
    post = PostTrainingLog(f"http://127.0.0.1:{free_port()}", run_id, path, wait_s=1)
    post.metrics({"train/fit_seconds": 3.0}, 10, what="train/fit_seconds")
    post.artifacts([str(plot)], "plots", what="1 evaluation plot")
    post.terminate("FINISHED")
    assert post.report("Training, checkpoint and export are complete: CKPT") is True
    assert time.monotonic() - t0 < 15
    out = capsys.readouterr().out
    assert out.count("[mlflow] warning:") == 1 and out.count("[mlflow] error:") == 1, out
    error = out[out.index("[mlflow] error:"):]
    for text in ("complete: CKPT", "train/fit_seconds", "1 evaluation plot", "the run's FINISHED status", str(path),
                 "python -m volvlp_ray.tracking replay"):
        assert text in error, (text, error)

    def replay() -> str:  # the CLI's main (the slow test below runs it as `python -m volvlp_ray.tracking`)
        assert tracking_cli(["replay", str(path), "--tracking-uri", server.uri]) == 0
        return capsys.readouterr().out

    server.start()
    assert "1 metric values sent, 0 already there; 0 tags, 1 artifacts, 0 models logged, 1 run status" in replay()
    assert [m.value for m in client.get_metric_history(run_id, "train/fit_seconds")] == [3.0]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/roc.txt"]
    with open(path, "a") as f:  # the same once-per-step value again, another timestamp (a repeated job)
        f.write(json.dumps({"run_id": run_id, "key": "train/fit_seconds", "value": 4.0, "timestamp": 1, "step": 10,
                            "once": True}) + "\n")
    assert "0 metric values sent, 1 already there" in replay()
    assert [m.value for m in client.get_metric_history(run_id, "train/fit_seconds")] == [3.0]


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own (it is killed for good mid-test), stopped at the end whatever happens."""
    (tmp_path / "mlflow").mkdir()
    srv = Server(tmp_path / "mlflow")
    srv.start()
    yield srv
    srv.kill()


STEP_LINE = re.compile(r"\(RayTrainWorker pid=\d+[^)]*\).*\[train\] step (\d+)/")
UNREACHABLE = "[mlflow] warning: MLflow tracking server unreachable ("


@pytest.mark.slow
def test_tracking_outages_during_a_real_training_run(tmp_path, capsys, own_server, copy_tiny_workspace):
    """`jobs/pretrain.py` (tiny config, 2 workers, a metric point every step) tracked by a real `mlflow server`,
    which is SIGKILLed twice while the workers train. The first time it is started again (same port, same store)
    after DOWN steps: training goes on at full speed meanwhile, rank 0 says so once, and the buffered steps arrive
    once it is back. The second time it stays away until the job has ended: the job still ends cleanly, what MLflow
    did not get (rank 0's last steps; the driver's metrics, model and final status) is in the unsent file, the
    job says how to send it, and the CLI does: then every step is in the run exactly once."""
    from mlflow.tracking import MlflowClient

    # the first outage after the warm-up steps (slower, outage or not); a restart of the server takes ~10 s on an
    # idle 2-core machine, over a minute under heavy load (~1.6 steps/s then): the steps leave room for both
    # outages and the recovery between them
    steps, kill_at, down = 200, 25, 10
    srv = own_server
    ws = copy_tiny_workspace(tmp_path / "ws")  # tiny.yaml's data, shards and tokenizer: the job trains at once
    # --verbose: rank 0's own step lines (Ray forwards them) time the outages step by step
    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--verbose", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"workspace={ws}", "run_name=outage", f"train.steps={steps}", "train.log_every=1",
           f"train.checkpoint_every={steps}", "eval.at_end=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**base_env(), "MLFLOW_TRACKING_URI": srv.uri}, start_new_session=True)
    timer = threading.Timer(840, kill_tree, [proc.pid])
    timer.start()
    lines: list[str] = []
    events: dict[str, tuple[float, int]] = {}  # what the test did or saw: (wall time, last step seen)
    restart_error: list[BaseException] = []

    def restart() -> None:
        try:
            srv.start()
        except BaseException as exc:  # noqa: BLE001 — reported by the assertion on "recovered"
            restart_error.append(exc)

    restarter = threading.Thread(target=restart, daemon=True)
    last, t0 = 0, time.time()
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.search(line)
            last = int(m.group(1)) if m else last
            if m and "first step" not in events:
                events["first step"] = (time.time(), last)
            if "[train] done in" in line or "[mlflow] error:" in line:
                events[line.split(" ")[0] + " " + line.split(" ")[1]] = (time.time(), last)
            if m and "kill1" not in events and last >= kill_at:
                srv.kill()
                events["kill1"] = (time.time(), last)
            elif m and "kill1" in events and "restart" not in events and last >= events["kill1"][1] + down:
                events["restart"] = (time.time(), last)
                restarter.start()
            elif "restart" in events and "recovered" not in events and "reachable again" in line:
                events["recovered"] = (time.time(), last)
            elif m and "recovered" in events and "kill2" not in events:
                restarter.join()
                srv.kill()  # for good: not back until the job has ended
                events["kill2"] = (time.time(), last)
            elif "[mlflow] error:" in line:  # the driver's last word on MLflow: the server may come back now
                restarter = threading.Thread(target=restart, daemon=True)
                restarter.start()
        rc = proc.wait()
        events["job ended"] = (time.time(), last)
        if restarter.ident is not None:
            restarter.join()
    finally:
        timer.cancel()
        if proc.poll() is None:
            kill_tree(proc.pid)
    out = "".join(lines)
    print("events (s since the job started, last step seen): "
          + ", ".join(f"{k} {t - t0:.0f} s @{step}" for k, (t, step) in events.items()))
    print("".join(line for line in lines if "[mlflow]" in line))
    assert rc == 0, out[-6000:]
    assert not restart_error, restart_error
    assert "kill2" in events, f"the run ended before the second outage (events {events}):\n{out[-4000:]}"
    assert "Traceback" not in out, out[-6000:]

    # what rank 0 said: one warning per outage, one recovery, and at the end where the unsent steps are
    warned = [line for line in lines if UNREACHABLE in line]
    # rank 0's lines reach the driver's console through the relay (volvlp_ray/console.py)
    assert len(warned) == 2 and all("training continues" in w for w in warned), warned
    (recovery,) = [line for line in lines if "reachable again" in line]
    sent_steps = int(re.search(r"values \((\d+) steps\) sent", recovery).group(1))
    assert sent_steps >= down, recovery
    run_id = re.search(r"\[mlflow\] run outage \(([0-9a-f]+)\)", out).group(1)
    unsent = ws / "mlflow-unsent" / f"{run_id}.jsonl"
    (closing,) = [line for line in lines if "unreachable at close" in line]
    assert f"python -m volvlp_ray.tracking replay {unsent}" in closing, closing
    # what the driver said: unreachable after training, then one error naming what is missing and the command
    assert "[mlflow] warning: tracking server " in out and "unreachable after training" in out
    error = out[out.index("[mlflow] error:"):]
    for text in ("Training, checkpoint and export are complete", "step metric values from rank 0",
                 "train/fit_seconds", "job/seconds", "the model", "the run's FINISHED status",
                 f"python -m volvlp_ray.tracking replay {unsent}"):
        assert text in error, (text, error[:2000])
    assert "[job] finished" in out and "(incomplete: see the [mlflow] error above)" in out

    # the server back (after the job): rank 0's steps up to the second outage are there, each once; the rest in the file
    assert not restart_error, restart_error
    client = MlflowClient(srv.uri)
    sent = {m.step: m.timestamp for m in client.get_metric_history(run_id, "train/loss")}
    assert len(sent) == len(client.get_metric_history(run_id, "train/loss")), "a step arrived twice"
    records = [json.loads(line) for line in unsent.read_text().splitlines()]
    filed = {r["step"]: r["timestamp"] for r in records if r.get("key") == "train/loss"}
    assert sorted(sent) == list(range(1, max(sent) + 1)) and max(sent) >= events["recovered"][1], sorted(sent)
    assert sorted(filed) == list(range(min(filed), steps + 1)) and min(filed) <= max(sent) + 1, sorted(filed)
    assert max(sent) - min(filed) < 5, "more than the batch in flight at the kill is both sent and in the file"
    driver = [r for r in records if r.get("once") or "key" not in r]
    assert sorted(r.get("key") or next(k for k in ("model_export", "status") if k in r) for r in driver) == \
        ["job/seconds", "model_export", "status", "train/fit_seconds"], driver
    assert client.get_run(run_id).info.status == "RUNNING"

    # throughput while the server was away vs the run's median (step times: each step's metric timestamp)
    when = {s: ts / 1000 for s, ts in {**filed, **sent}.items()}
    ts = [when[s] for s in range(1, steps + 1)]
    median_rate = 1 / statistics.median(b - a for a, b in zip(ts[10:], ts[11:]))  # after the warm-up steps

    def rate(t0: float, t1: float) -> float:
        return sum(t0 < t <= t1 for t in ts) / (t1 - t0)

    away1 = rate(events["kill1"][0], events["restart"][0])  # down, not yet restarting (a restart takes CPU here)
    away2 = rate(events["kill2"][0], ts[-1])
    print(f"steps/s: run median {median_rate:.2f}; server away: first outage {away1:.2f} "
          f"({events['restart'][0] - events['kill1'][0]:.0f} s), second outage {away2:.2f} "
          f"({ts[-1] - events['kill2'][0]:.0f} s, {sum(t > events['kill2'][0] for t in ts)} steps)")
    assert away1 >= 0.5 * median_rate, (away1, median_rate)
    if ts[-1] - events["kill2"][0] >= 5:
        assert away2 >= 0.5 * median_rate, (away2, median_rate)

    # the replay command the job printed: every step once, the driver's metrics, the model, the final status
    t1 = time.time()
    p = subprocess.run([sys.executable, "-m", "volvlp_ray.tracking", "replay", str(unsent), "--tracking-uri", srv.uri],
                       cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=300)
    print(f"replay: {time.time() - t1:.0f} s: {p.stdout.strip()}")
    assert p.returncode == 0 and "1 models logged, 1 run status set" in p.stdout, p.stdout + p.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["volvlp.model_uri"].startswith("models:/")
    assert run.data.tags["volvlp.model_export"].startswith(str(ws))
    history = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    assert sorted(history["train/loss"]) == list(range(1, steps + 1))
    assert history["train/fit_seconds"] == [steps] and history["job/seconds"] == [steps]
    assert all(len(v) == len(set(v)) for v in history.values()), "a metric value arrived twice"
    summary = capsys.readouterr().out  # (shown at the end, with -s)
    assert tracking_cli(["replay", str(unsent), "--tracking-uri", srv.uri]) == 0  # again (in this process)
    again = capsys.readouterr().out
    assert "0 metric values sent" in again and "0 models logged" in again, again
    assert {k: [m.step for m in client.get_metric_history(run_id, k)] for k in run.data.metrics} == history
    with capsys.disabled():
        print(summary)
