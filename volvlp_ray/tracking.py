"""MLflow: where runs go, the run of a training job, and metric logging from rank 0.

Tracking URI: ``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///{workspace}/mlflow.db``. The driver creates (or, for the same run name, reopens) the run and
logs the resolved config as params and as ``config.yaml``; rank 0 of the workers logs step metrics to it.

Privacy: nothing here logs report text or voxels. Artifacts that could hold them (``log_text_artifact``,
``log_volume_artifact``) refuse unless the config opts in with ``tracking.log_text`` / ``tracking.log_volumes``.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from volvlp_ray.config import Config, config_to_dict, dump_yaml, flatten

__all__ = [
    "MetricLogger", "PrivacyError", "last_logged_step", "log_text_artifact", "log_volume_artifact",
    "resolve_tracking_uri", "start_run", "system_info",
]

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
    """Step metrics to one MLflow run (used by rank 0 inside the training loop)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.skip_through = -1

    def skip_logged_steps(self, key: str) -> int:
        """After a resume the steps between the checkpoint and the failure run again: do not log a step that
        ``key`` already has in this run (the recomputed values equal the logged ones on a deterministic run).
        Returns the last step already logged (-1: none)."""
        self.skip_through = last_logged_step(self.client, self.run_id, key)
        return self.skip_through

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


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
