"""MLflow: where runs go, the run of a training job, and metric logging from rank 0.

Tracking URI: ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///{workspace}/mlflow.db``. The driver creates (or, for the same run name, reopens) the run and
logs the resolved config as params and as ``config.yaml``; rank 0 of the workers logs step metrics to it through
:class:`MetricLogger`, whose background thread does the sending: a tracking server that is down or slow never holds
the training loop (values wait in memory, then in a local JSONL file that :func:`replay_metrics_file` sends later).
After training the driver logs through :class:`PostTrainingLog`, which writes what the server does not take to the
same file. Send such a file with ``python -m volvlp_ray.tracking replay FILE --tracking-uri URI`` (exactly once).

Privacy: nothing here logs report text or voxels. Artifacts that could hold them (``log_text_artifact``,
``log_volume_artifact``) refuse unless the config opts in with ``tracking.log_text`` / ``tracking.log_volumes``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import json
import logging
import os
import platform
import random
import re
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from volvlp_ray.config import Config, config_to_dict, dump_yaml, flatten

__all__ = [
    "MetricLogger", "PostTrainingLog", "PrivacyError", "last_logged_step", "log_text_artifact", "log_volume_artifact",
    "replay_command", "replay_metrics_file", "resolve_tracking_uri", "scoped_tracking_uri", "set_run_status",
    "start_run", "system_info", "unsent_metrics_path",
]

_log = logging.getLogger(__name__)

_MAX_PARAM = 6000


class PrivacyError(RuntimeError):
    """Patient data (report text, voxels) would reach MLflow without the config opting in."""


def resolve_tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    cfg.workspace_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{cfg.workspace_path / 'mlflow.db'}"


def unsent_metrics_path(cfg: Config, run_id: str) -> Path:
    """Where a training run's MLflow data that could not be sent goes (rank 0's metrics, the driver's
    post-training metrics, model and status): ``{workspace}/mlflow-unsent/{run_id}.jsonl``."""
    return cfg.workspace_path / "mlflow-unsent" / f"{run_id}.jsonl"


def replay_command(path: str | os.PathLike, tracking_uri: str) -> str:
    """The shell command that sends an unsent file to MLflow (a password in the URI is masked)."""
    uri = re.sub(r"(://[^/:@\s]+):[^@\s]+@", r"\1:***@", tracking_uri)
    return f"python -m volvlp_ray.tracking replay {shlex.quote(str(path))} --tracking-uri {shlex.quote(uri)}"


def system_info() -> dict[str, str]:
    import torch

    info = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "torch": torch.__version__,
        "cuda_available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = str(torch.cuda.device_count())
    for mod in ("ray", "deepspeed", "transformers", "monai", "mlflow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "unavailable"
    return {f"sys.{k}": v for k, v in info.items()}


@contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``mlflow.pyfunc.log_model``) pointed at ``uri`` for the block only.

    ``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI`` in this process "so that subprocesses inherit it";
    left so, the next job started in the same process (a notebook, a test session, a sweep driver) would find it,
    take it for the user's setting, and log to the previous job's store instead of its own workspace. The previous
    URI and the variable are restored when the block ends."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def start_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run for ``run_name`` (or return the id of an existing one) and log the config.
    ``tags`` are added to a new run (e.g. ``mlflow.parentRunId`` makes it a nested child run)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        # a local database keeps its artifacts beside it in the workspace (MLflow's default would be ./mlruns
        # under whatever directory the job was started from); a server decides for itself
        location = (cfg.workspace_path / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    existing = client.search_runs([exp_id], filter_string=f"tags.`volvlp.run_name` = '{run_name}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name,
                            tags={"volvlp.run_name": run_name, **system_info(), **(tags or {})})
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten(config_to_dict(cfg)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, dump_yaml(cfg), "config.yaml")
    return run_id


def last_logged_step(client, run_id: str, key: str) -> int:
    """The largest step logged for ``key`` in run ``run_id`` (-1 when the key has no values)."""
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


class MetricLogger:
    """Step metrics (and tags) to one MLflow run, off the training path (used by rank 0 in the training loop).

    ``log()`` only appends to an in-memory buffer and returns; a daemon thread sends the buffer to MLflow in
    batches of ``batch_size`` values. While the tracking server is unreachable the thread retries with
    exponential backoff (``backoff_initial_s`` doubling up to ``backoff_max_s``), logs one warning when the
    outage starts and one info line when the backlog has been sent; training goes on meanwhile. With
    ``console=True`` (rank 0 of a training run) these lines are printed to stdout instead, as
    ``[mlflow] warning: ...`` / ``[mlflow] ...``, so that they reach the job's console.

    Exactly once: each value keeps the timestamp ``log()`` gave it, so a re-sent value is identical to the
    first (an SQL-backed MLflow store, the server's, keeps one row per (key, timestamp, step, value) and
    takes the duplicate insert as a no-op); and a batch whose earlier attempt may have reached the server
    (any failure other than a refused connection: timeout, reset, 5xx) is re-sent only after the run's
    metric history of its keys has been read and the values already there removed from it, which holds
    for any store.

    Buffer: at most ``max_buffered`` values in memory. Past that the oldest are appended to
    ``fallback_path`` (a JSONL file; default ``./mlflow-unsent-metrics-{run_id}.jsonl``), with a warning
    naming it; ``close()`` appends there whatever is still unsent at its deadline. Such a file is sent later,
    exactly once, with :func:`replay_metrics_file` (``python -m volvlp_ray.tracking replay FILE --tracking-uri
    URI``). Nothing is dropped except NaN values (as before).

    The sender's own HTTP calls fail fast: it passes ``max_retries=0``, ``backoff_factor=0``,
    ``timeout=request_timeout_s`` to MLflow's ``http_request`` for its requests only (the values that
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_BACKOFF_JITTER`` / ``_TIMEOUT`` /
    ``MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER`` would otherwise give every MLflow call of the process); the
    environment, and so every other MLflow client in the process, is left as it is.

    Call ``close()`` at the end of training (idempotent, never raises); if it is not called, an exit hook
    of this instance gives the buffer ``exit_timeout_s`` at interpreter exit, then writes the rest to the file.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, max_buffered: int = 100_000,
                 fallback_path: str | os.PathLike | None = None, batch_size: int = 500,
                 request_timeout_s: float = 10.0, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 skip_timeout_s: float = 60.0, exit_timeout_s: float = 10.0, console: bool = False):
        from mlflow.tracking import MlflowClient

        if max_buffered < 1 or not 1 <= batch_size <= 1000:
            raise ValueError(f"max_buffered must be >= 1 and batch_size in [1, 1000]; got {max_buffered}, {batch_size}")
        self.client = MlflowClient(tracking_uri)  # synchronous client, for callers that want one
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.skip_through = -1
        self.skip_timeout_s = skip_timeout_s
        default_path = Path.cwd() / f"mlflow-unsent-metrics-{run_id}.jsonl"
        self.fallback_path = Path(fallback_path) if fallback_path else default_path
        self._sender = _MetricSender(_Transport(tracking_uri, request_timeout_s), run_id, self.fallback_path,
                                     max_buffered=max_buffered, batch_size=batch_size,
                                     backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s,
                                     console=console)
        # this instance's own hook (a fresh partial: atexit.unregister of it leaves other instances' hooks alone)
        self._exit_hook = functools.partial(self._sender.close, exit_timeout_s)
        atexit.register(self._exit_hook)

    def skip_logged_steps(self, key: str, timeout_s: float | None = None) -> int:
        """After a resume the steps between the checkpoint and the failure run again: do not log a step that
        ``key`` already has in this run (the recomputed values equal the logged ones on a deterministic run).
        Returns the last step already logged (-1: none). Synchronous, but bounded by ``timeout_s`` (default
        ``skip_timeout_s``): a server that does not answer by then gets a warning and nothing is skipped."""
        timeout_s = self.skip_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        result: dict[str, Any] = {}
        sender = self._sender

        def attempt() -> None:  # in a daemon thread, so a call stuck below MLflow cannot hold the caller
            delay = sender.backoff_initial_s
            while True:
                try:
                    result["step"] = max((m.step for m in sender.transport.history(self.run_id, key)), default=-1)
                    return
                except Exception as exc:  # noqa: BLE001
                    result["error"] = exc
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(delay, left))
                delay = min(delay * 2, sender.backoff_max_s)

        thread = threading.Thread(target=attempt, name="mlflow-history", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
        if "step" not in result:
            sender.say(logging.WARNING, f"MLflow tracking server did not return the history of {key!r} within "
                       f"{timeout_s:.0f} s ({_reason(result.get('error', 'timed out'))}): no step is skipped, so steps "
                       "already logged before this resume may be logged again")
            self.skip_through = -1
        else:
            self.skip_through = result["step"]
        return self.skip_through

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` for ``step`` (NaN values are dropped) and return at once; no network here."""
        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        self._sender.put([(str(k), float(v), now, int(step)) for k, v in metrics.items() if v == v])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags, sent by the background thread with the next batch (a later value of a key wins)."""
        self._sender.put_tags({str(k): str(v) for k, v in tags.items()})

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` for everything buffered to be sent (retrying now); True when it was."""
        return self._sender.flush(timeout_s)

    def stats(self) -> dict[str, int]:
        """Counts of metric values: ``sent`` (confirmed by MLflow), ``buffered`` (waiting or in flight),
        ``failures`` (failed send attempts), ``spilled`` (written to ``fallback_path`` instead)."""
        return self._sender.stats()

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is buffered, for at most ``timeout_s``; what is still unsent then goes to
        ``fallback_path`` with a warning that says how to replay it. Idempotent; never raises."""
        try:
            atexit.unregister(self._exit_hook)
        except Exception:  # noqa: BLE001
            pass
        self._sender.close(timeout_s)


_CAUSES = (("Connection refused", "connection refused"), ("NewConnectionError", "cannot connect"),
           ("ConnectionResetError", "connection reset"), ("Connection aborted", "connection aborted"),
           ("RemoteDisconnected", "connection closed by the server"), ("timed out", "timed out"),
           ("Name or service not known", "unknown host"))


def _reason(exc: Any) -> str:
    """Why a request failed, short: ``runs/log-batch: connection refused`` for MLflow's long connection errors."""
    text = str(exc)
    for pattern, said in _CAUSES:
        if pattern in text:
            m = re.search(r"/api/[\d.]+/mlflow/([\w/-]+)", text)
            return f"{m.group(1)}: {said}" if m else said
    return _short(exc)


def _short(exc: Any, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _never_sent(exc: BaseException) -> bool:
    """The request cannot have reached the server (the connection was refused / never made)."""
    text = str(exc)
    return any(s in text for s in ("Connection refused", "NewConnectionError", "Failed to establish a new connection"))


def _rejected(exc: BaseException) -> bool:
    """The server answered and refused the batch (bad value, no such run): re-sending cannot help."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.get_http_status_code() in (400, 404)


def _fail_fast_rest_store(tracking_uri: str, timeout_s: float):
    """MLflow's REST store whose requests are tried once, with ``timeout_s`` (the sender does its own retries).

    MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` etc. from ``os.environ`` at every request, for every client
    of the process; ``http_request`` takes the same settings as arguments, which is what this store passes."""
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.proto_json_utils import parse_dict
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    class FailFastRestStore(RestStore):
        def _call_endpoint(self, api, json_body=None, endpoint=None, *_args, response_proto=None, **_kwargs):
            default_endpoint, method = self._METHOD_TO_INFO[api]
            endpoint = endpoint or default_endpoint
            body = json.loads(json_body) if json_body is not None else None
            response = http_request(self.get_host_creds(), endpoint, method, max_retries=0, backoff_factor=0,
                                    backoff_jitter=0, timeout=timeout_s, respect_retry_after_header=False,
                                    **({"params": body} if method == "GET" else {"json": body}))
            response = verify_rest_response(response, endpoint)
            proto = response_proto or api.Response()
            if response.status_code != 204 and response.text.strip():
                parse_dict(js_dict=json.loads(response.text), message=proto)
            return proto

    return FailFastRestStore(functools.partial(get_default_host_creds, tracking_uri))


class _Transport:
    """The two calls the sender needs: ``log_batch`` and the full ``history`` of one key."""

    def __init__(self, tracking_uri: str, request_timeout_s: float = 10.0):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.store = None
        if tracking_uri.split(":", 1)[0].lower() in ("http", "https"):
            try:
                self.store = _fail_fast_rest_store(tracking_uri, request_timeout_s)
            except Exception as exc:  # noqa: BLE001 — MLflow's internals moved: its own client and retries
                _log.info("MetricLogger: MLflow's REST store could not be set to fail fast (%s); the sender uses "
                          "MlflowClient, whose retries follow MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT", _short(exc))
        self.client = None if self.store is not None else MlflowClient(tracking_uri)

    def log_batch(self, run_id: str, points: list[tuple], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(k, v, ts, step) for k, v, ts, step in points]
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        if self.store is not None:
            self.store.log_batch(run_id, metrics, [], run_tags)
        else:
            self.client.log_batch(run_id, metrics=metrics, tags=run_tags)

    def history(self, run_id: str, key: str) -> list:
        if self.store is None:
            return list(self.client.get_metric_history(run_id, key))
        out, token = [], None
        while True:
            page = self.store.get_metric_history(run_id, key, max_results=25_000, page_token=token)
            out.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return out

    def missing(self, run_id: str, points: list[tuple], once: bool = False) -> list[tuple]:
        """``points`` less those the run already has (same key, step and timestamp; ``once``: same key and step,
        whatever the timestamp -- a value logged once per step, such as the driver's post-training metrics)."""
        present: dict[str, set] = {}
        for key in {p[0] for p in points}:
            present[key] = {m.step if once else (m.step, m.timestamp) for m in self.history(run_id, key)}
        return [p for p in points if (p[3] if once else (p[3], p[2])) not in present[p[0]]]

    def get_run(self, run_id: str):
        return self.store.get_run(run_id) if self.store is not None else self.client.get_run(run_id)

    def set_terminated(self, run_id: str, status: str, end_time: int) -> None:
        if self.store is not None:
            from mlflow.entities import RunStatus

            self.store.update_run_info(run_id, RunStatus.from_string(status), end_time, None)
        else:
            self.client.set_terminated(run_id, status, end_time)


def _append_jsonl(path: Path, run_id: str, points: list[tuple], tags: dict[str, str], once: bool = False,
                  records: list[dict] | None = None) -> None:
    """Unsent data, one JSON object a line: metric values (``key``; ``once``: sent only if the key has no value at
    that step), ``tag``s, and ``records`` (``artifacts``, ``model_export``, ``status``: see replay_metrics_file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for k, v, ts, step in points:
            rec = {"run_id": run_id, "key": k, "value": v, "timestamp": ts, "step": step}
            f.write(json.dumps({**rec, "once": True} if once else rec) + "\n")
        for k, v in tags.items():
            f.write(json.dumps({"run_id": run_id, "tag": k, "value": v}) + "\n")
        for rec in records or []:
            f.write(json.dumps({"run_id": run_id, **rec}) + "\n")


class _MetricSender:
    """The buffer and the daemon thread behind :class:`MetricLogger` (holds no reference to the logger)."""

    def __init__(self, transport: _Transport, run_id: str, fallback_path: Path, *, max_buffered: int,
                 batch_size: int, backoff_initial_s: float, backoff_max_s: float, console: bool = False):
        self.transport, self.run_id, self.fallback_path = transport, run_id, fallback_path
        self.console = console
        self.max_buffered, self.batch_size = max_buffered, batch_size
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple] = collections.deque()
        self._tags: dict[str, str] = {}
        self._inflight: list[tuple] = []
        self._inflight_tags: dict[str, str] = {}
        self._uncertain = False  # an earlier attempt at the in-flight batch may have reached the server
        self._nudge = False  # flush/close: retry now, do not wait out the backoff
        self._closing = self._closed = False
        self._sent = self._failures = self._spilled = 0
        self._outage: dict[str, Any] | None = None  # while the server is unreachable
        self._warned_full = self._warned_after_close = False
        self._file_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mlflow-metric-sender", daemon=True)
        self._thread.start()

    def say(self, level: int, msg: str) -> None:
        """A warning or info line: to stdout as ``[mlflow] ...`` (``console``), else to this module's logger."""
        if self.console:
            from volvlp_ray import console

            (console.warn if level >= logging.WARNING else console.info)(
                f"[mlflow] {'warning: ' if level >= logging.WARNING else ''}{msg}")
        else:
            _log.log(level, "%s", msg)

    # ---- caller side (the training loop's thread): memory only, or a short file append when over the bound
    def put(self, points: list[tuple]) -> None:
        if not points:
            return
        overflow: list[tuple] = []
        with self._cond:
            if self._closed:
                overflow, warn = points, not self._warned_after_close
                self._warned_after_close = True
            else:
                self._queue.extend(points)
                while len(self._queue) > self.max_buffered:
                    overflow.append(self._queue.popleft())
                warn = bool(overflow) and not self._warned_full
                self._warned_full |= warn
                self._cond.notify_all()
        if overflow:
            self._spill(overflow, {})
            if warn:
                why = ("MetricLogger is closed" if self._closed else
                       f"MLflow metric buffer full ({self.max_buffered} values unsent)")
                self.say(logging.WARNING, f"{why}: the oldest values go to {self.fallback_path}; send them later "
                         f"(exactly once) with: {replay_command(self.fallback_path, self.transport_uri())}  "
                         "(or volvlp_ray.tracking.replay_metrics_file)")

    def put_tags(self, tags: dict[str, str]) -> None:
        with self._cond:
            if self._closed:
                spill = tags
            else:
                self._tags.update(tags)
                self._cond.notify_all()
                return
        self._spill([], spill)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"sent": self._sent, "buffered": len(self._queue) + len(self._inflight),
                    "failures": self._failures, "spilled": self._spilled}

    def transport_uri(self) -> str:
        return self.transport.uri

    def _empty(self) -> bool:
        return not (self._queue or self._inflight or self._tags or self._inflight_tags)

    def flush(self, timeout_s: float) -> bool:
        with self._cond:
            self._nudge = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._empty() or self._closed, timeout=max(0.0, timeout_s)) \
                and self._empty()

    def close(self, timeout_s: float) -> None:
        try:
            with self._cond:
                if self._closed or self._closing:
                    return
                self._closing = self._nudge = True
                self._cond.notify_all()
                self._cond.wait_for(self._empty, timeout=max(0.0, timeout_s))
                points, tags = self._inflight + list(self._queue), {**self._inflight_tags, **self._tags}
                self._queue.clear()
                self._tags.clear()
                self._inflight, self._inflight_tags = [], {}
                self._closed = True  # the thread leaves at its next step; a request it has in flight is in the
                self._cond.notify_all()  # file too, and the replay's history check keeps it from arriving twice
                outage = self._outage
            if points or tags:
                self._spill(points, tags)
                steps = sorted({p[3] for p in points})
                span = f", steps {steps[0]}..{steps[-1]}" if steps else ""
                self.say(logging.WARNING, f"MLflow tracking server {'unreachable' if outage else 'too slow'} at "
                         f"close: {len(points)} metric values ({len(steps)} steps{span}) and {len(tags)} tags written "
                         f"to {self.fallback_path}; send them (exactly once, safe to repeat) with: "
                         f"{replay_command(self.fallback_path, self.transport_uri())}  "
                         "(or volvlp_ray.tracking.replay_metrics_file)")
            self._thread.join(0.1)
        except Exception:  # noqa: BLE001 — close never raises
            _log.exception("MetricLogger.close failed")

    def _spill(self, points: list[tuple], tags: dict[str, str]) -> None:
        try:
            with self._file_lock:
                _append_jsonl(self.fallback_path, self.run_id, points, tags)
        except Exception:  # noqa: BLE001
            _log.exception("could not write %d unsent MLflow metric values to %s", len(points), self.fallback_path)
            return
        with self._cond:
            self._spilled += len(points)

    # ---- the daemon thread
    def _run(self) -> None:
        delay = self.backoff_initial_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or not self._empty() or self._closing)
                if self._closed or (self._closing and self._empty()):
                    return
                if not self._inflight and not self._inflight_tags:
                    n = min(self.batch_size, len(self._queue))
                    self._inflight = [self._queue.popleft() for _ in range(n)]
                    keys = list(self._tags)[:100]  # MLflow takes at most 100 tags per batch
                    self._inflight_tags = {k: self._tags.pop(k) for k in keys}
                    self._uncertain = False
                points, tags, uncertain = list(self._inflight), dict(self._inflight_tags), self._uncertain
            try:
                if uncertain and points:
                    points = self.transport.missing(self.run_id, points)
                if points or tags:
                    self.transport.log_batch(self.run_id, points, tags)
                error = None
            except Exception as exc:  # noqa: BLE001
                error = exc
            recovered = started = None
            with self._cond:
                if self._closed:
                    return
                if error is None:
                    delay = self.backoff_initial_s
                    self._sent += len(self._inflight)  # those found already there count: they arrived
                    if self._outage is not None:
                        self._outage["sent"] += len(self._inflight)
                        self._outage["steps"].update(p[3] for p in self._inflight)
                    self._inflight, self._inflight_tags = [], {}
                    if self._outage is not None and not self._queue:
                        recovered, self._outage = self._outage, None
                    self._cond.notify_all()
                else:
                    self._failures += 1
                    if _rejected(error):
                        points, tags = self._inflight, self._inflight_tags
                        self._inflight, self._inflight_tags = [], {}
                        self._cond.notify_all()
                    else:
                        self._uncertain |= not _never_sent(error)
                        points, tags = [], {}
                        if self._outage is None:
                            self._outage = {"since": time.monotonic(), "sent": 0, "steps": set()}
                            started = len({p[3] for p in self._inflight} | {p[3] for p in self._queue})
            # the lines are written outside the lock: put() (the training thread) never waits on stdout
            if error is None:
                if recovered is not None:
                    self.say(logging.INFO, f"MLflow tracking server reachable again after "
                             f"{time.monotonic() - recovered['since']:.0f} s; {recovered['sent']} buffered metric "
                             f"values ({len(recovered['steps'])} steps) sent")
                continue
            if started is not None:
                n = f"{started} step{'' if started == 1 else 's'}"
                self.say(logging.WARNING, f"MLflow tracking server unreachable ({_reason(error)}): metrics are "
                         f"buffered in memory ({n} so far), training continues; retrying with backoff")
            if points or tags:  # refused by the server: to the file, not retried
                self._spill(points, tags)
                self.say(logging.WARNING, f"MLflow refused a batch of {len(points)} metric values ({_reason(error)}): "
                         f"written to {self.fallback_path} instead")
                continue
            with self._cond:
                wait = delay * random.uniform(0.8, 1.2)
                if self._closing:
                    wait = min(wait, 1.0)
                self._cond.wait_for(lambda: self._nudge or self._closed, timeout=wait)
                self._nudge = False
            delay = min(delay * 2, self.backoff_max_s)


def replay_metrics_file(path: str | os.PathLike, tracking_uri: str, run_id: str | None = None, *,
                        attempts: int = 5, request_timeout_s: float = 30.0) -> dict[str, int]:
    """Send a file of unsent MLflow data to MLflow, exactly once (``python -m volvlp_ray.tracking replay``).

    The file is what :class:`MetricLogger` (its ``fallback_path``) and :class:`PostTrainingLog` write: metric
    values and tags, and the driver's post-training records: ``artifacts`` (local files to upload),
    ``model_export`` (an export folder, logged as the run's pyfunc model) and ``status`` (the run's final status).
    Data go to ``run_id`` (default: the run named on each line), per run in that order: metrics, tags, artifacts,
    model, status. Before sending, the run's metric history of each key is read and values already there (same
    key, step and timestamp; for a value marked ``once``, same key and step) are left out, and a model already
    logged from the same export folder is not logged again, so replaying a file twice, or one of which part
    arrived, adds nothing twice. Each request is tried ``attempts`` times; then the error is raised (running it
    again is safe). Returns the counts ``{"sent", "present", "tags", "artifacts", "models", "status"}``."""
    runs: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            r = runs.setdefault(run_id or rec["run_id"], {"points": {}, "once": {}, "tags": {}, "artifacts": {},
                                                          "model": None, "status": None})
            if "tag" in rec:
                r["tags"][rec["tag"]] = rec["value"]
            elif "key" in rec:
                p = (rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"]))
                if rec.get("once"):
                    r["once"][(p[0], p[3])] = p  # one value per key and step: the last one written wins
                else:
                    r["points"][(p[0], p[3], p[2])] = p  # the same value twice in the file counts once
            elif "artifacts" in rec:
                r["artifacts"][(rec["artifacts"], rec.get("artifact_path"))] = True
            elif "model_export" in rec:
                r["model"] = rec["model_export"]
            elif "status" in rec:
                r["status"] = (rec["status"], int(rec.get("end_time") or time.time() * 1000))
            else:
                raise ValueError(f"{path}:{lineno}: not a line of an unsent MLflow file: {line.strip()[:200]}")

    transport = _Transport(tracking_uri, request_timeout_s)
    out = {"sent": 0, "present": 0, "tags": 0, "artifacts": 0, "models": 0, "status": 0}
    for rid, r in runs.items():
        for once in (False, True):
            points = list(r["once" if once else "points"].values())
            todo = _retried(transport.missing, attempts, rid, points, once) if points else []
            out["present"] += len(points) - len(todo)
            for i in range(0, len(todo), 500):
                _send_exactly_once(transport, rid, todo[i : i + 500], {}, attempts)
                out["sent"] += len(todo[i : i + 500])
        tag_items = list(r["tags"].items())
        for i in range(0, len(tag_items), 100):
            _send_exactly_once(transport, rid, [], dict(tag_items[i : i + 100]), attempts)
        out["tags"] += len(tag_items)
        if r["artifacts"]:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)  # uploads: MLflow's own retries
            for local, artifact_path in r["artifacts"]:
                (client.log_artifacts if os.path.isdir(local) else client.log_artifact)(rid, local, artifact_path)
                out["artifacts"] += 1
        if r["model"]:
            export = r["model"]
            tags = _retried(transport.get_run, attempts, rid).data.tags
            if not (tags.get("volvlp.model_export") == export and tags.get("volvlp.model_uri")):
                if not os.path.isfile(os.path.join(export, "vlp_config.json")):
                    raise FileNotFoundError(f"{path}: the model's export folder {export} is not there (no "
                                            "vlp_config.json); replay on a machine that has it")
                from volvlp_ray.serving import log_vlp_model

                log_vlp_model(rid, export, tracking_uri)
                _send_exactly_once(transport, rid, [], {"volvlp.model_export": export}, attempts)
                out["models"] += 1
        if r["status"]:
            _retried(transport.set_terminated, attempts, rid, *r["status"])
            out["status"] += 1
    _log.info("replayed %s into %s: %s", path, tracking_uri, out)
    return out


def _retried(fn, attempts: int, *args):
    for i in range(attempts):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001
            if i == attempts - 1 or _rejected(exc):
                raise
            time.sleep(min(2.0**i, 30.0))


def _send_exactly_once(transport: _Transport, run_id: str, points: list[tuple], tags: dict[str, str],
                       attempts: int) -> None:
    """One batch, tried ``attempts`` times; after a failure that may have reached the server, only the values
    the run's history does not have yet are sent again."""
    uncertain = False
    for i in range(attempts):
        try:
            todo = transport.missing(run_id, points) if uncertain and points else points
            if todo or tags:
                transport.log_batch(run_id, todo, tags)
            return
        except Exception as exc:  # noqa: BLE001
            if i == attempts - 1 or _rejected(exc):
                raise
            uncertain |= not _never_sent(exc)
            time.sleep(min(2.0**i, 30.0))


class PostTrainingLog:
    """The driver's MLflow calls once training is done: metrics, evaluation plots, the model, the final status.

    Training, checkpoint and export are safe by then, so a tracking server that is away must not fail the job.
    The server first gets ``wait_s`` to answer, with requests that fail fast (a dead server costs seconds, not
    MLflow's minutes of retries). While it answers, each call goes to it (metrics, tags and status: ``attempts``
    tries of ``request_timeout_s``; artifacts and the model: MLflow's own retries); from the first call that fails
    on, that call and every later one go to ``path`` -- the run's unsent file, beside whatever rank 0's
    :class:`MetricLogger` could not send -- and :meth:`report` prints what is missing and the command that sends
    it (:func:`replay_metrics_file`). A server that answers at the start while ``path`` exists (rank 0 could not
    deliver everything by its end) gets that file at once; it is then renamed ``*.replayed``. Never raises for
    a tracking failure."""

    def __init__(self, tracking_uri: str, run_id: str, path: str | os.PathLike, *, wait_s: float = 10.0,
                 request_timeout_s: float = 10.0, attempts: int = 3):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id, self.path, self.attempts = tracking_uri, run_id, Path(path), attempts
        self.request_timeout_s = request_timeout_s
        self.transport = _Transport(tracking_uri, request_timeout_s)
        self.client = MlflowClient(tracking_uri)  # artifact uploads and the model
        self.filed: list[str] = []  # what went to the file
        self.lost: list[str] = []  # what could not be written there either
        self.error = self._probe(wait_s)
        if self.error is not None:
            print(f"[mlflow] warning: tracking server {self.uri} unreachable after training ({self.error}): the "
                  f"job's MLflow data go to {self.path}", flush=True)
        elif self.path.is_file():
            self._send_rank0_file()

    def _probe(self, wait_s: float) -> str | None:
        """None once the server returns the run; else the last error, after ``wait_s``."""
        deadline, delay = time.monotonic() + wait_s, 0.5
        while True:
            try:
                self.transport.get_run(self.run_id)
                return None
            except Exception as exc:  # noqa: BLE001
                left = deadline - time.monotonic()
                if left <= 0 or _rejected(exc):
                    return _reason(exc)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    def _send_rank0_file(self) -> None:
        try:
            out = replay_metrics_file(self.path, self.uri, attempts=self.attempts,
                                      request_timeout_s=self.request_timeout_s)
        except Exception as exc:  # noqa: BLE001
            self.error = _reason(exc)
            print(f"[mlflow] warning: sending {self.path} (what rank 0 could not send) failed ({self.error}); the "
                  "job's MLflow data go there too", flush=True)
            return
        done = self.path.with_name(self.path.name + ".replayed")
        os.replace(self.path, done)
        print(f"[mlflow] the metrics rank 0 could not send are in MLflow now: {out['sent']} values sent, "
              f"{out['present']} already there (file kept as {done})", flush=True)

    def _file(self, points: list[tuple] = (), records: list[dict] | None = None) -> None:
        _append_jsonl(self.path, self.run_id, list(points), {}, once=True, records=records)

    def _call(self, what: str, online, offline):
        if self.error is None:
            try:
                return online()
            except Exception as exc:  # noqa: BLE001
                self.error = _reason(exc)
                print(f"[mlflow] warning: logging {what} to {self.uri} failed ({self.error}): it and the job's "
                      f"later MLflow data go to {self.path}", flush=True)
        try:
            offline()
            self.filed.append(what)
        except Exception as exc:  # noqa: BLE001
            print(f"[mlflow] error: {what} could not be written to {self.path} either ({_short(exc)})", flush=True)
            self.lost.append(what)
        return None

    def metrics(self, metrics: dict[str, float], step: int, *, sentinel: str | None = None,
                what: str | None = None) -> bool | None:
        """Log ``metrics`` at ``step`` unless the run already has them there (``sentinel``, default: each key is
        checked): a resumed or repeated job does not duplicate points. True: logged; False: already there;
        None: written to the file (each value marked ``once``)."""
        now = int(time.time() * 1000)
        points = [(str(k), float(v), now, int(step)) for k, v in metrics.items()]

        def last(key: str) -> int:
            return max((m.step for m in _retried(self.transport.history, self.attempts, self.run_id, key)),
                       default=-1)

        def online() -> bool:
            if sentinel is not None:
                todo = points if last(sentinel) < step else []
            else:
                todo = [p for p in points if last(p[0]) < step]
            for i in range(0, len(todo), 500):
                _send_exactly_once(self.transport, self.run_id, todo[i : i + 500], {}, self.attempts)
            return bool(todo)

        return self._call(what or ", ".join(sorted(metrics)), online, lambda: self._file(points))

    def artifacts(self, files: list[str], artifact_path: str, what: str | None = None) -> None:
        """Upload local ``files`` under ``artifact_path``; offline they are copied beside the file first."""
        def online() -> None:
            for f in files:
                self.client.log_artifact(self.run_id, f, artifact_path)

        def offline() -> None:
            dest = self.path.parent / f"{self.run_id}-artifacts" / artifact_path
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dest)
            self._file(records=[{"artifacts": str(dest), "artifact_path": artifact_path}])

        if files:
            self._call(what or f"{len(files)} artifacts ({artifact_path}/)", online, offline)

    def model(self, export_dir: str) -> str | None:
        """Log ``export_dir`` as the run's pyfunc model unless that export is logged already; the model URI, or
        None when it went to the file."""
        def online() -> str:
            tags = _retried(self.transport.get_run, self.attempts, self.run_id).data.tags
            if tags.get("volvlp.model_export") == export_dir and tags.get("volvlp.model_uri"):
                return tags["volvlp.model_uri"]  # a finished run started again: its model is logged already
            from volvlp_ray.serving import log_vlp_model

            uri = log_vlp_model(self.run_id, export_dir, self.uri)
            _send_exactly_once(self.transport, self.run_id, [], {"volvlp.model_export": export_dir}, self.attempts)
            return uri

        return self._call("the model", online, lambda: self._file(records=[{"model_export": str(export_dir)}]))

    def terminate(self, status: str = "FINISHED") -> None:
        now = int(time.time() * 1000)
        self._call(f"the run's {status} status",
                   lambda: _retried(self.transport.set_terminated, self.attempts, self.run_id, status, now),
                   lambda: self._file(records=[{"status": status, "end_time": now}]))

    def report(self, done: str) -> bool:
        """After the last call: if anything went to the file, print (one ``[mlflow] error:`` block) what is
        missing from the run and the command that sends it; ``done`` says what is safe. True when it printed."""
        if not self.filed and not self.lost:
            return False
        items = []
        steps: set[int] = set()
        values = 0
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line) if line.strip() else {}
                    if "key" in rec and not rec.get("once"):
                        values += 1
                        steps.add(int(rec["step"]))
        except OSError:
            pass
        if values:
            items.append(f"{values} step metric values from rank 0 (steps {min(steps)}..{max(steps)})")
        items += self.filed
        text = (f"[mlflow] error: the tracking server {self.uri} was unreachable after training ({self.error}). "
                f"{done}. Not logged to MLflow run {self.run_id}: {'; '.join(items)}. All of it is in {self.path}; "
                f"once the server is back, send it (exactly once, safe to repeat) with:\n"
                f"  {replay_command(self.path, self.uri)}")
        if self.lost:
            text += f"\n[mlflow] error: lost (the file could not be written): {'; '.join(self.lost)}"
        print(text, flush=True)
        return True


def set_run_status(tracking_uri: str, run_id: str, status: str, timeout_s: float = 10.0) -> bool:
    """Mark the run ``status`` with one fail-fast request; a warning instead of an error. True when it was."""
    try:
        _Transport(tracking_uri, timeout_s).set_terminated(run_id, status, int(time.time() * 1000))
        return True
    except Exception as exc:  # noqa: BLE001
        print(f"[mlflow] warning: could not mark run {run_id} {status} at {tracking_uri} ({_reason(exc)})", flush=True)
        return False


def log_volume_artifact(cfg: Config, run_id: str, volume: Any, path: str) -> None:
    """Log a volume (array) as a ``.npy`` artifact; refused unless ``tracking.log_volumes`` is true."""
    if not cfg.tracking.log_volumes:
        raise PrivacyError("CT voxels are patient data: set tracking.log_volumes=true to log them to MLflow")
    import tempfile

    import numpy as np
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path) if path.endswith(".npy") else os.path.basename(path) + ".npy")
        np.save(local, np.asarray(volume), allow_pickle=False)
        MlflowClient(resolve_tracking_uri(cfg)).log_artifact(run_id, local, os.path.dirname(path) or None)


def log_text_artifact(cfg: Config, run_id: str, text: str, path: str) -> None:
    """Log report-derived text; refused unless ``tracking.log_text`` is true."""
    if not cfg.tracking.log_text:
        raise PrivacyError("report text is patient data: set tracking.log_text=true to log it to MLflow")
    from mlflow.tracking import MlflowClient

    MlflowClient(resolve_tracking_uri(cfg)).log_text(run_id, text, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m volvlp_ray.tracking replay FILE... [--tracking-uri URI] [--run-id ID]``."""
    parser = argparse.ArgumentParser(prog="python -m volvlp_ray.tracking",
                                     description="Send MLflow data a training run could not deliver.")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="send unsent files ({workspace}/mlflow-unsent/RUN_ID.jsonl) to MLflow, "
                                       "exactly once (safe to repeat)")
    rp.add_argument("files", nargs="+", metavar="FILE")
    rp.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    rp.add_argument("--run-id", default=None, help="send to this run (default: the run named in the file)")
    rp.add_argument("--attempts", type=int, default=5, help="tries per request (default 5)")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("--tracking-uri is required (or set MLFLOW_TRACKING_URI)")
    for path in args.files:
        if not os.path.isfile(path):
            print(f"[mlflow] error: {path}: no such file", file=sys.stderr, flush=True)
            return 2
        try:
            out = replay_metrics_file(path, args.tracking_uri, args.run_id, attempts=args.attempts)
        except Exception as exc:  # noqa: BLE001
            print(f"[mlflow] error: replaying {path} into {args.tracking_uri} failed ({_reason(exc)}); what was sent "
                  "stays sent: run the same command again", file=sys.stderr, flush=True)
            return 1
        print(f"[mlflow] replayed {path}: {out['sent']} metric values sent, {out['present']} already there; "
              f"{out['tags']} tags, {out['artifacts']} artifacts, {out['models']} models logged, "
              f"{out['status']} run status set", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
