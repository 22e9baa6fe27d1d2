"""The pre-training job, driver side: data -> shards -> tokenizer -> MLflow run -> TorchTrainer -> evaluation.

``run_pretraining(cfg)`` is what ``jobs/pretrain.py`` calls. Each stage is skipped when its output already
exists (synthetic data, shards, tokenizer), so a second run reuses the data made by the first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from volvlp_ray.config import Config, config_to_dict

__all__ = ["ensure_ray", "ensure_shards", "ensure_tokenizer", "run_pretraining"]

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config, concurrent_trials: int = 1) -> None:
    """Join the cluster at ``$RAY_ADDRESS`` if set, else start a local Ray instance sized for
    ``concurrent_trials`` training runs at once (a sweep)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        print(f"[ray] joined cluster at {os.environ['RAY_ADDRESS']}: {ray.cluster_resources()}", flush=True)
        return
    # Logical CPUs: the training workers hold theirs for the whole run, and Ray Data's read/decode tasks
    # need CPUs of their own beside them, so a small machine gets headroom over its core count.
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker * concurrent_trials
    num_cpus = max(os.cpu_count() or 1, need) + max(2, need)
    # the dashboard process serves the state API that Ray Train's controller polls
    start_local_ray(num_cpus=num_cpus, include_dashboard=True, logging_level=logging.WARNING)
    print(f"[ray] started a local instance with {num_cpus} logical CPUs", flush=True)


def start_local_ray(**init_kwargs: Any) -> str:
    """A new local Ray instance of our own (never a cluster some ``ray start`` left on this machine) whose
    processes know its address: Ray Train's placement-group cleaner finds "the" cluster through
    ``$RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster``, and the file names whichever instance on the machine
    started last -- with two instances (a test session and a job, two jobs) the cleaner would query the wrong
    one and never free the resources of a run that was stopped (a sweep's early-stopped trial).
    Returns the GCS address."""
    import socket

    import ray

    with socket.socket() as sock:  # a free port for the GCS, so that its address is known before it starts
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    ip = ray.util.get_node_ip_address()
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": f"{ip}:{port}"}
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ctx = ray.init(address="local", runtime_env=runtime_env, **init_kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    gcs = ctx.address_info["gcs_address"]
    if gcs != f"{ip}:{port}":
        log.warning("local Ray's GCS is at %s, not %s:%d as planned", gcs, ip, port)
    return gcs


def ensure_shards(cfg: Config) -> str:
    """Synthetic data (if asked for) and WebDataset shards, each made only when missing or stale."""
    from volvlp_ray.data.prepare import prepare_options, prepare_shards, shards_ready, source_id

    source = cfg.data.source
    if source == "synthetic":
        from volvlp_ray.data.synthetic import generate_dataset

        source = str(generate_dataset(cfg.workspace_path / "data" / "synthetic", cfg.data.num_volumes,
                                      cfg.data.num_val_volumes, seed=cfg.seed))
    if shards_ready(cfg.shards_path, prepare_options(cfg), source_id(source)):
        print(f"[data] shards ready at {cfg.shards_path}", flush=True)
    else:
        prepare_shards(source, cfg.shards_path, cfg)
    return source


def ensure_tokenizer(cfg: Config) -> str:
    """A tokenizer folder the workers load: built from the training reports for a scratch text tower
    (cached by corpus and vocabulary size), else the pretrained model's own tokenizer."""
    from volvlp_ray.data import storage
    from volvlp_ray.data.pipeline import read_corpus
    from volvlp_ray.data.shards import read_manifest
    from volvlp_ray.models.text import build_tokenizer, load_tokenizer

    root = cfg.workspace_path / "tokenizers"
    if not cfg.model.text_model.startswith("scratch-"):
        out = root / hashlib.sha1(cfg.model.text_model.encode()).hexdigest()[:12]
        if not (out / "tokenizer_config.json").is_file():
            load_tokenizer(cfg.model).save_pretrained(str(out))
        return str(out)
    manifest = read_manifest(storage.child(storage.normalise(cfg.shards_path), "train"))
    key = hashlib.sha1(json.dumps([[s["sha256"] for s in manifest["shards"]], cfg.model.text_vocab_size])
                       .encode()).hexdigest()[:12]
    out = root / key
    if not (out / "tokenizer_config.json").is_file():
        corpus = read_corpus(cfg, "train")
        tok = build_tokenizer(corpus, cfg.model.text_vocab_size)
        tmp = root / f".{key}.tmp"
        tok.save_pretrained(str(tmp))
        os.replace(tmp, out)
        print(f"[data] tokenizer built from {len(corpus)} reports: {len(tok)} tokens -> {out}", flush=True)
    return str(out)


def runs_storage(cfg: Config) -> str:
    """Ray Train's ``storage_path``: ``train.storage_path`` (a path or URI) or ``{workspace}/ray_results``."""
    return (cfg.train.storage_path or str(cfg.workspace_path / "ray_results")).rstrip("/")


def local_export(checkpoint) -> str:
    """The final checkpoint's ``export/`` as a local folder (downloaded when the checkpoint is remote)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return os.path.join(checkpoint.path, "export")
    local = Path(tempfile.mkdtemp(prefix="volvlp-export-"))
    pyarrow.fs.copy_files(f"{checkpoint.path}/export", str(local), source_filesystem=checkpoint.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return str(local)


def default_run_name(cfg: Config) -> str:
    return f"{cfg.loss.kind}-{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_trainer(cfg: Config, run_name: str, tokenizer_dir: str, tracking_uri: str, run_id: str,
                  callbacks: list | None = None, storage: str | None = None):
    """The TorchTrainer of one training run; ``storage``: where Ray Train keeps the run (default
    ``{workspace}/ray_results``); ``callbacks``: Ray Train callbacks (a sweep passes Tune's)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ray.data
    from ray.data import ExecutionOptions

    from volvlp_ray.data.pipeline import TrainDatasetFactory
    from volvlp_ray.train.loop import train_loop_per_worker

    # the loop prints its own progress; per-operator bars from the streaming split would flood the log
    ray.data.DataContext.get_current().enable_progress_bars = False

    env = {"env_vars": {
        "OMP_NUM_THREADS": str(cfg.scaling.cpus_per_worker),
        "TOKENIZERS_PARALLELISM": "false",
        # rank 0's progress lines go to stdout, which Ray forwards to the driver (Train's print patch would
        # route them to a logger that the driver does not show)
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }}
    if not cfg.scaling.use_gpu:
        env["env_vars"]["DS_ACCELERATOR"] = "cpu"
    if cfg.data.volume_transport == "direct":  # the workers read the voxels from the shards themselves
        from volvlp_ray.data.storage import task_runtime_env

        env["env_vars"].update((task_runtime_env(cfg.shards_path) or {}).get("env_vars", {}))
    storage = storage or runs_storage(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "tokenizer_dir": tokenizer_dir,
                           "tracking_uri": tracking_uri, "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=env,
            callbacks=callbacks,
        ),
        # a factory: Ray Train calls it at every (re)start of the worker group, so a resumed run's stream
        # starts at the epoch of its latest checkpoint
        datasets={"train": TrainDatasetFactory(cfg, tokenizer_dir, os.path.join(storage, run_name))},
        dataset_config=DataConfig(execution_options={"train": ExecutionOptions(
            preserve_order=cfg.data.deterministic)}),
    )


def run_pretraining(cfg: Config) -> dict[str, Any]:
    """The whole job. Returns {run_name, run_id, checkpoint, export, metrics}."""
    from mlflow.tracking import MlflowClient

    from volvlp_ray.tracking import resolve_tracking_uri, start_run

    t0 = time.time()
    ensure_ray(cfg)
    ensure_shards(cfg)
    tokenizer_dir = ensure_tokenizer(cfg)
    run_name = cfg.run_name or default_run_name(cfg)
    cfg.run_name = run_name  # the export's config then names its run (jobs/evaluate.py finds the MLflow run)
    tracking_uri = resolve_tracking_uri(cfg)
    run_id = start_run(cfg, run_name)
    client = MlflowClient(tracking_uri)
    print(f"[mlflow] run {run_name} ({run_id}) at {tracking_uri}", flush=True)
    try:
        trainer = build_trainer(cfg, run_name, tokenizer_dir, tracking_uri, run_id)
        print(f"[train] {cfg.scaling.num_workers} workers, {cfg.train.steps} steps, global batch "
              f"{cfg.train.batch_size * cfg.scaling.num_workers}, ZeRO-{cfg.train.zero_stage}, {cfg.loss.kind} loss",
              flush=True)
        t_fit = time.time()
        result = trainer.fit()
        fit_s = time.time() - t_fit
        if result.error:
            raise result.error
        ckpt_dir = result.checkpoint.path
        export_dir = local_export(result.checkpoint)
        print(f"[train] done in {fit_s:.0f}s; checkpoint {ckpt_dir}", flush=True)
        if not os.path.isfile(os.path.join(export_dir, "vlp_config.json")):
            raise RuntimeError(f"the final checkpoint {ckpt_dir} has no export/ (was the run stopped before its "
                               "last step?)")
        log_once(client, run_id, {"train/fit_seconds": fit_s}, cfg.train.steps)
        metrics: dict[str, float] = {}
        if cfg.eval.at_end:
            metrics = evaluate_export(cfg, export_dir, tokenizer_dir, client, run_id)
        tags = client.get_run(run_id).data.tags
        if tags.get("volvlp.model_export") == export_dir and tags.get("volvlp.model_uri"):
            model_uri = tags["volvlp.model_uri"]  # a finished run started again: its model is logged already
        else:
            from volvlp_ray.serving import log_vlp_model

            model_uri = log_vlp_model(run_id, export_dir, tracking_uri)
            client.set_tag(run_id, "volvlp.model_export", export_dir)
        print(f"[mlflow] model {model_uri} (mlflow.pyfunc.load_model); export folder {export_dir} "
              "(volvlp_ray.VLP.from_pretrained)", flush=True)
        log_once(client, run_id, {"job/seconds": time.time() - t0}, cfg.train.steps)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    print(f"[job] finished in {time.time() - t0:.0f}s; MLflow run {run_id}; "
          f"view with: mlflow ui --backend-store-uri {tracking_uri}", flush=True)
    return {"run_name": run_name, "run_id": run_id, "checkpoint": ckpt_dir, "export": export_dir,
            "tracking_uri": tracking_uri, "metrics": metrics}


def evaluate_export(cfg: Config, export_dir: str, tokenizer_dir: str, client, run_id: str) -> dict[str, float]:
    from volvlp_ray.eval.run import evaluate_model
    from volvlp_ray.models import VLP

    model = VLP.from_pretrained(export_dir)
    with tempfile.TemporaryDirectory() as plots_dir:
        res = evaluate_model(model, cfg, "valid", tokenizer_dir, plots_dir=plots_dir)
        for p in res["plots"]:
            client.log_artifact(run_id, p, "plots")
    m = res["metrics"]
    if not log_once(client, run_id, m, cfg.train.steps, sentinel="eval/n"):
        print(f"[eval] run {run_id} already has held-out metrics at step {cfg.train.steps}: not logged again",
              flush=True)
    print(_summary(m), flush=True)
    return m


def log_once(client, run_id: str, metrics: dict[str, float], step: int, sentinel: str | None = None) -> bool:
    """Log ``metrics`` at ``step`` unless the run already has them there (``sentinel``, default: each key is
    checked) -- a resumed or repeated job does not duplicate points. Returns whether anything was logged."""
    from mlflow.entities import Metric

    from volvlp_ray.tracking import last_logged_step

    if sentinel is not None:
        todo = metrics if last_logged_step(client, run_id, sentinel) < step else {}
    else:
        todo = {k: v for k, v in metrics.items() if last_logged_step(client, run_id, k) < step}
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in todo.items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])
    return bool(batch)


def _summary(m: dict[str, float]) -> str:
    from volvlp_ray.data.ctrate import LABELS

    lines = [f"[eval] held-out split: {int(m['eval/n'])} volumes"]
    for d in ("t2v", "v2t"):
        ks = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith(f"eval/{d}/recall_at_") and "random" not in k)
        lines.append(f"[eval] {d}: " + "  ".join(
            f"R@{k} {m[f'eval/{d}/recall_at_{k}']:.3f} (random {m[f'eval/{d}/recall_at_{k}_random']:.3f})" for k in ks))
    lines.append(f"[eval] zero-shot mean AUROC {m.get('eval/zeroshot/mean/auroc', float('nan')):.3f}")
    for label in LABELS:
        key = "eval/zeroshot/per_label/" + "".join(c if c.isalnum() or c in "-_./ " else "_" for c in label) + "/auroc"
        if key in m:
            lines.append(f"[eval]   {label:36s} AUROC {m[key]:.3f}")
    return "\n".join(lines)
