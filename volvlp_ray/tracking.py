"""MLflow: where runs go, the run of a training job, and metric logging from rank 0.

Tracking URI: ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///{workspace}/mlflow.db``. The driver creates (or, for the same run name, reopens) the run and
logs the resolved config as params and as ``config.yaml``; rank 0 of the workers logs step metrics to it through
:class:`MetricLogger`, whose background thread does the sending: a tracking server that is down or slow never holds
the training loop (values wait in memory, then in a local JSONL file that :func:`replay_metrics_file` sends later).

Privacy: nothing here logs report text or voxels. Artifacts that could hold them (``log_text_artifact``,
``log_volume_artifact``) refuse unless the config opts in with ``tracking.log_text`` / ``tracking.log_volumes``.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import logging
import os
import platform
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from volvlp_ray.config import Config, config_to_dict, dump_yaml, flatten

__all__ = [
    "MetricLogger", "PrivacyError", "last_logged_step", "log_text_artifact", "log_volume_artifact",
    "replay_metrics_file", "resolve_tracking_uri", "start_run", "system_info",
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


def start_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run for ``run_name`` (or return the id of an existing one) and log the config.
    ``tags`` are added to a new run (e.g. ``mlflow.parentRunId`` makes it a nested child run)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
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
    outage starts and one info line when the backlog has been sent; training goes on meanwhile.

    Exactly once: each value keeps the timestamp ``log()`` gave it, so a re-sent value is identical to the
    first (an SQL-backed MLflow store, the server's, keeps one row per (key, timestamp, step, value) and
    takes the duplicate insert as a no-op); and a batch whose earlier attempt may have reached the server
    (any failure other than a refused connection: timeout, reset, 5xx) is re-sent only after the run's
    metric history of its keys has been read and the values already there removed from it, which holds
    for any store.

    Buffer: at most ``max_buffered`` values in memory. Past that the oldest are appended to
    ``fallback_path`` (a JSONL file; default ``./mlflow-unsent-metrics-{run_id}.jsonl``), with a warning
    naming it; ``close()`` appends there whatever is still unsent at its deadline. Such a file is sent later,
    exactly once, with :func:`replay_metrics_file`. Nothing is dropped except NaN values (as before).

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
                 skip_timeout_s: float = 60.0, exit_timeout_s: float = 10.0):
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
                                     backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
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
            _log.warning("MLflow tracking server did not return the history of %r within %.0f s (%s): no step is "
                         "skipped, so steps already logged before this resume may be logged again",
                         key, timeout_s, _short(result.get("error", "timed out")))
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

    def missing(self, run_id: str, points: list[tuple]) -> list[tuple]:
        """``points`` less those the run already has (same key, step and timestamp)."""
        present: dict[str, set] = {}
        for key in {p[0] for p in points}:
            present[key] = {(m.step, m.timestamp) for m in self.history(run_id, key)}
        return [p for p in points if (p[3], p[2]) not in present[p[0]]]


def _append_jsonl(path: Path, run_id: str, points: list[tuple], tags: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for k, v, ts, step in points:
            f.write(json.dumps({"run_id": run_id, "key": k, "value": v, "timestamp": ts, "step": step}) + "\n")
        for k, v in tags.items():
            f.write(json.dumps({"run_id": run_id, "tag": k, "value": v}) + "\n")


class _MetricSender:
    """The buffer and the daemon thread behind :class:`MetricLogger` (holds no reference to the logger)."""

    def __init__(self, transport: _Transport, run_id: str, fallback_path: Path, *, max_buffered: int,
                 batch_size: int, backoff_initial_s: float, backoff_max_s: float):
        self.transport, self.run_id, self.fallback_path = transport, run_id, fallback_path
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
                _log.warning("%s: the oldest values go to %s; send them later with "
                             "volvlp_ray.tracking.replay_metrics_file(%r, %r, %r)", why, self.fallback_path,
                             str(self.fallback_path), self.transport_uri(), self.run_id)

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
                steps = len({p[3] for p in points})
                _log.warning("MLflow tracking server %s at close: %d metric values (%d steps) and %d tags written "
                             "to %s; send them (exactly once, safe to repeat) with:\n  python -c \"from "
                             "volvlp_ray.tracking import replay_metrics_file; replay_metrics_file(%r, %r, %r)\"",
                             "unreachable" if outage else "too slow", len(points), steps, len(tags),
                             self.fallback_path, str(self.fallback_path), self.transport_uri(), self.run_id)
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
                        o, self._outage = self._outage, None
                        _log.info("MLflow tracking server reachable again after %.0f s: sent the %d metric values "
                                  "(%d steps) buffered during the outage", time.monotonic() - o["since"],
                                  o["sent"], len(o["steps"]))
                    self._cond.notify_all()
                    continue
                self._failures += 1
                if _rejected(error):
                    points, tags = self._inflight, self._inflight_tags
                    self._inflight, self._inflight_tags = [], {}
                    self._cond.notify_all()
                else:
                    self._uncertain |= not _never_sent(error)
                    points, tags = [], {}
                    if self._outage is None:
                        buffered = self._inflight + list(self._queue)
                        self._outage = {"since": time.monotonic(), "sent": 0, "steps": set()}
                        _log.warning("MLflow tracking server unreachable (%s): %d steps buffered, training "
                                     "continues; retrying", _short(error), len({p[3] for p in buffered}))
            if points or tags:  # refused by the server: to the file, not retried
                self._spill(points, tags)
                _log.warning("MLflow refused a batch of %d metric values (%s): written to %s instead",
                             len(points), _short(error), self.fallback_path)
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
    """Send a file written by :class:`MetricLogger` (its ``fallback_path``) to MLflow, exactly once.

    Values go to ``run_id`` (default: the run named on each line). Before sending, the run's metric history
    of each key is read and values already there (same key, step and timestamp) are left out, so replaying a
    file twice, or one of which part arrived, adds nothing twice. Each request is tried ``attempts`` times;
    then the error is raised (running it again is safe). Returns ``{"sent": n, "present": m, "tags": t}``."""
    runs: dict[str, tuple[dict, dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            points, tags = runs.setdefault(run_id or rec["run_id"], ({}, {}))
            if "tag" in rec:
                tags[rec["tag"]] = rec["value"]
            else:
                p = (rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"]))
                points[(p[0], p[3], p[2])] = p  # the same value twice in the file counts once

    transport = _Transport(tracking_uri, request_timeout_s)
    out = {"sent": 0, "present": 0, "tags": 0}
    for rid, (points, tags) in runs.items():
        todo = _retried(transport.missing, attempts, rid, list(points.values())) if points else []
        out["present"] += len(points) - len(todo)
        for i in range(0, len(todo), 500):
            _send_exactly_once(transport, rid, todo[i : i + 500], {}, attempts)
            out["sent"] += len(todo[i : i + 500])
        tag_items = list(tags.items())
        for i in range(0, len(tag_items), 100):
            _send_exactly_once(transport, rid, [], dict(tag_items[i : i + 100]), attempts)
        out["tags"] += len(tag_items)
    _log.info("replayed %s into %s: %d metric values sent, %d already there, %d tags", path, tracking_uri,
              out["sent"], out["present"], out["tags"])
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
