"""MetricLogger's background sender against a real `mlflow server` (SQLite backend) that goes away and comes back.

One server per module, started by the project's launcher (`jobs/mlflow_server.py`) on a free port; tests that
kill it start it again on the same port with the same store. A small TCP proxy stands in for a network that
loses responses (the request took effect, the client never hears so)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from clusterutil import base_env, free_port, wait_http_ok

from volvlp_ray.tracking import MetricLogger, replay_metrics_file

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
    assert "replay_metrics_file" in warning

    assert replay_metrics_file(fallback, server.uri, run_id) == {"sent": 100, "present": 0, "tags": 0}
    assert_exactly_once(client, run_id, range(80))
    assert replay_metrics_file(fallback, server.uri, run_id) == {"sent": 0, "present": 100, "tags": 0}
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
