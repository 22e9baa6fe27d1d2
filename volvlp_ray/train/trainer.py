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
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from volvlp_ray import console
from volvlp_ray.config import Config, ConfigError, config_to_dict

__all__ = ["ClusterTooSmallError", "ensure_ray", "ensure_shards", "ensure_tokenizer", "fit_cluster", "plan_worker_cpus",
           "run_pretraining", "train_timeouts"]

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config, concurrent_trials: int = 1, quiet: bool = True) -> None:
    """Join the cluster at ``$RAY_ADDRESS`` if set, else start a local Ray instance sized for
    ``concurrent_trials`` training runs at once (a sweep). ``quiet``: the workers' own output stays in Ray's log
    files unless ``--verbose`` (``console.ray_init_kwargs``); the project's lines reach the console through the
    job's relay."""
    import ray

    if not cfg.scaling.use_gpu:  # this driver uses no accelerator: DeepSpeed (imported with transformers) need not
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # detect one and print that it found none
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**console.ray_init_kwargs(quiet))
        console.info(f"[ray] joined cluster at {os.environ['RAY_ADDRESS']}: {ray.cluster_resources()}")
        return
    # Logical CPUs: the training workers hold theirs for the whole run, and Ray Data's read/decode tasks
    # need CPUs of their own beside them, so a small machine gets headroom over its core count.
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker * concurrent_trials
    num_cpus = max(os.cpu_count() or 1, need) + max(2, need, cfg.scaling.data_cpus * concurrent_trials)
    # the dashboard process serves the state API that Ray Train's controller polls
    # workers' own output (Ray's, DeepSpeed's logs) stays in Ray's log files unless --verbose; the project's lines
    # from workers reach the console through the job's relay (console.Relay)
    start_local_ray(num_cpus=num_cpus, include_dashboard=True, **console.ray_init_kwargs(quiet))
    console.info(f"[ray] started a local instance with {num_cpus} logical CPUs")


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot hold the run's training workers and the CPUs its data pipeline needs beside them."""


def plan_worker_cpus(scaling, nodes: list[dict[str, float]], nodes_may_join: str | None = None) -> tuple[float, str | None]:
    """CPUs each training worker reserves on a cluster of ``nodes`` (each node's total resources), and a line to
    print about it (or None).

    The run needs ``scaling.num_workers`` bundles of ``scaling.cpus_per_worker`` CPUs (and one GPU with
    ``scaling.use_gpu``), each on one node, plus ``scaling.data_cpus`` CPUs left free for Ray Data's tasks (a task
    takes one CPU; workers holding every CPU leave the input waiting forever). A cluster that holds it all gets the
    asked reservation. On a fixed cluster of one node that holds the workers but not the data CPUs beside them, each
    worker reserves its share of the CPUs the data pipeline leaves ((CPUs - data_cpus) / num_workers): the workers'
    threads and Ray Data's tasks then share the cores, which they do on one machine anyway. On several nodes the CPUs
    such fractional reservations leave would be split across nodes where a one-CPU task may fit on none, so no
    fitting there. Anything else raises :class:`ClusterTooSmallError` naming the missing resources and the settings
    to change, unless ``nodes_may_join`` (why an autoscaler may add nodes) is given: then the line says what is
    missing now and the run waits for the nodes.
    """
    n, cpus, data = scaling.num_workers, float(scaling.cpus_per_worker), float(scaling.data_cpus)
    gpus = 1.0 if scaling.use_gpu else 0.0
    total_cpu = sum(float(r.get("CPU", 0)) for r in nodes)
    total_gpu = sum(float(r.get("GPU", 0)) for r in nodes)

    def bundles(cpu: float) -> int:  # workers that fit, each bundle on one node
        fit = 0
        for r in nodes:
            k = int(float(r.get("CPU", 0)) / cpu + 1e-9)
            fit += min(k, int(float(r.get("GPU", 0)) / gpus + 1e-9)) if gpus else k
        return fit

    ask = (f"scaling.num_workers={n} x scaling.cpus_per_worker={scaling.cpus_per_worker} CPU"
           + (" + 1 GPU" if gpus else "") + f" for the training workers, each on one node, and scaling.data_cpus="
           f"{scaling.data_cpus} CPU free beside them for Ray Data's tasks")
    has = (f"{total_cpu:g} CPUs" + (f" and {total_gpu:g} GPUs" if gpus else "") + f" on {len(nodes)} node"
           + ("s" if len(nodes) != 1 else ""))
    missing = []
    if gpus and total_gpu < n:
        missing.append(f"{n - total_gpu:g} GPU(s)")
    if total_cpu < n * cpus:
        missing.append(f"{n * cpus - total_cpu:g} CPU(s) for the training workers")
    elif bundles(cpus) < n and not missing:
        missing.append(f"nodes that hold {n} bundles of {cpus:g} CPU" + (" + 1 GPU" if gpus else "")
                       + f" (the cluster's nodes hold {bundles(cpus)})")
    free = total_cpu - n * cpus
    if not missing and free >= data:
        return float(scaling.cpus_per_worker), None
    if nodes_may_join:
        short = "; ".join(missing) or f"{data - free:g} CPU(s) for Ray Data's tasks"
        return float(scaling.cpus_per_worker), (
            f"[train] the cluster has {has} now; the run needs {ask}: missing {short}. Nodes may join ({nodes_may_join}):"
            " the workers wait for them (Ray Train retries the start every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=60 "
            "s; set scaling.cluster=fixed to fail at once instead)")
    if not missing and len(nodes) == 1 and total_cpu > data:
        share = int((total_cpu - data) / n * 100) / 100  # two decimals, rounded down
        if share >= 0.01:
            return share, (
                f"[train] the cluster has {has}; the run asks for {ask}, {n * cpus + data:g} CPUs in all: each "
                f"training worker reserves {share:g} CPU instead of {cpus:g}, so that {total_cpu - n * share:g} stay "
                f"free for Ray Data's tasks (the workers still run {scaling.cpus_per_worker} thread(s) each: they share "
                "the cores with the data pipeline; give the cluster more CPUs for the full reservation)")
    if not missing:
        missing.append(f"{data - max(free, 0):g} CPU(s) for Ray Data's tasks beside the training workers"
                       + (" (fitting by smaller reservations is done on one node only)" if len(nodes) > 1 else ""))
    raise ClusterTooSmallError(
        f"the cluster cannot run this job: it has {has}; the run needs {ask}. Missing: {'; '.join(missing)}. Lower "
        "scaling.num_workers or scaling.cpus_per_worker" + (" (or scaling.use_gpu=false)" if gpus else "")
        + ", or scaling.data_cpus (0 keeps no CPU for the data pipeline: its tasks may then never run), or give the "
        "cluster more resources (ray start --num-cpus=N on a node). If an autoscaler will add nodes, set "
        "scaling.cluster=autoscaling")


def nodes_may_join(gcs_address: str | None = None) -> str | None:
    """Why an autoscaler may add nodes to the cluster this process is connected to (a short reason), or None:
    KubeRay manages it, its cluster config has node groups that scale, or its autoscaler monitor on this machine runs
    with a cluster config (``ray up``'s head, where jobs run)."""
    if os.environ.get("RAY_USAGE_STATS_KUBERAY_IN_USE"):
        return "KubeRay manages the cluster"
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        if is_autoscaling_enabled():
            return "its node groups autoscale"
    except Exception:  # noqa: BLE001 - an internal API; absent means unknown
        pass
    try:
        import psutil

        import ray

        gcs = gcs_address or ray.get_runtime_context().gcs_address
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if (any(c.endswith("monitor.py") for c in cmd) and f"--gcs-address={gcs}" in cmd
                    and any(c.startswith("--autoscaling-config=") for c in cmd)):
                return "its autoscaler runs with a cluster config"
    except Exception:  # noqa: BLE001
        pass
    return None


def fit_cluster(cfg: Config, quiet: bool = False) -> float:
    """CPUs per training worker on the cluster Ray is connected to (``plan_worker_cpus``; ``scaling.cluster``
    says whether nodes may join: auto-detected, ``fixed`` or ``autoscaling``). Prints what it decides (unless
    ``quiet``); raises :class:`ClusterTooSmallError` at once rather than letting the run wait forever."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    mode = cfg.scaling.cluster
    joining = None if mode == "fixed" else ("scaling.cluster=autoscaling" if mode == "autoscaling" else nodes_may_join())
    cpus, line = plan_worker_cpus(cfg.scaling, nodes, joining)
    if quiet:
        return cpus
    if line:
        console.info(line)
    free = ray.available_resources()
    n = cfg.scaling.num_workers
    want = {"CPU": n * cpus + cfg.scaling.data_cpus, **({"GPU": n} if cfg.scaling.use_gpu else {})}
    short = {k: v for k, v in want.items() if free.get(k, 0) + 1e-9 < v}
    if short and not line:
        console.warn(f"[train] the cluster holds enough, but only {', '.join(f'{free.get(k, 0):g} {k}' for k in short)}"
                     f" of it free now (other jobs hold the rest): the workers wait for it (Ray Train retries the start "
                     "every 60 s)")
    return cpus


_TIMEOUT_ENV = "RAY_TRAIN_COLLECTIVE_TIMEOUT_S"
_timeout_set: dict[str, str] = {}


def train_timeouts(cfg: Config) -> int:
    """``train.timeout_s``, for the process group (returned: ``TorchConfig.timeout_s``) and for Ray Train's own
    barriers (``ray.train.report``): ``RAY_TRAIN_COLLECTIVE_TIMEOUT_S``, which Ray Train hands from the driver to its
    controller and workers when ``fit`` starts, is set here unless the user set it."""
    value = str(cfg.train.timeout_s)
    if os.environ.get(_TIMEOUT_ENV) in (None, _timeout_set.get(_TIMEOUT_ENV)):
        os.environ[_TIMEOUT_ENV] = _timeout_set[_TIMEOUT_ENV] = value
    return cfg.train.timeout_s


# Ray Train settings for a local instance (one node of this machine, which no autoscaler drains): the controller's
# poll of its workers every 0.5 s instead of 2 s (each run waits on that poll to see its workers started and
# finished), and no preemption watcher (an actor per run, polling for a node drain that cannot come). Measured on the
# 2-core machine, a 6-step configs/tiny.yaml run on a warm local Ray: 27.4 s on average (21.7-33.6) -> 19.2 s
# (18.7-20.5). A value the user set stays; a cluster (``$RAY_ADDRESS``) keeps Ray Train's defaults.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_ray_train_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """:data:`LOCAL_RAY_TRAIN_ENV` into ``environ`` (the driver's environment, which ``fit()`` hands to Ray Train's
    controller), each value only where the user set none."""
    for key, value in LOCAL_RAY_TRAIN_ENV.items():
        environ.setdefault(key, value)


def start_local_ray(**init_kwargs: Any) -> str:
    """A new local Ray instance of our own (never a cluster some ``ray start`` left on this machine) whose
    processes know its address: Ray Train's placement-group cleaner finds "the" cluster through
    ``$RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster``, and the file names whichever instance on the machine
    started last -- with two instances (a test session and a job, two jobs) the cleaner would query the wrong
    one and never free the resources of a run that was stopped (a sweep's early-stopped trial).
    Returns the GCS address."""
    import socket

    import ray

    local_ray_train_env()
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
    splits: list[str] = ["train", "valid"]
    if source == "synthetic":
        from volvlp_ray.data.synthetic import generate_dataset

        source = str(generate_dataset(cfg.workspace_path / "data" / "synthetic", cfg.data.num_volumes,
                                      cfg.data.num_val_volumes, seed=cfg.seed))
    else:
        from volvlp_ray.data.ctrate import layout_check

        problem, splits = layout_check(source)  # one listing of the source, used by everything below
        if "train" not in splits:
            raise ConfigError(f"data.source={source} holds no complete train split (its splits: "
                             f"{splits or 'none'}{f'; {problem}' if problem else ''}): pre-training needs one; an "
                             "evaluation-only set is prepared with jobs/prepare_data.py --source DIR and evaluated "
                             "with jobs/evaluate.py --data SHARDS")
    if shards_ready(cfg.shards_path, prepare_options(cfg), source_id(source), splits):
        console.info(f"[data] shards ready at {cfg.shards_path}")
    else:
        prepare_shards(source, cfg.shards_path, cfg, splits=splits)
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
        console.info(f"[data] tokenizer built from {len(corpus)} reports: {len(tok)} tokens -> {out}")
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


def worker_env(cfg: Config) -> dict:
    """The ``worker_runtime_env`` of a job's Ray Train workers (pre-training and the downstream jobs)."""
    env = {"env_vars": {
        "OMP_NUM_THREADS": str(cfg.scaling.cpus_per_worker),
        "TOKENIZERS_PARALLELISM": "false",
        # the project's lines go through the relay (or, without one, to stdout, which Ray forwards with
        # --verbose; Train's print patch would route them to a logger that the driver does not show)
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }}
    if not cfg.scaling.use_gpu:
        env["env_vars"]["DS_ACCELERATOR"] = "cpu"
    # the project's test hooks (VOLVLP_STEP_TRACE, VOLVLP_INJECT_NAN, ...) and --verbose reach the workers on a
    # cluster too
    env["env_vars"].update({k: v for k, v in os.environ.items() if k.startswith("VOLVLP_")})
    return env


def build_trainer(cfg: Config, run_name: str, tokenizer_dir: str, tracking_uri: str, run_id: str,
                  callbacks: list | None = None, storage: str | None = None, relay=None):
    """The TorchTrainer of one training run; ``storage``: where Ray Train keeps the run (default
    ``{workspace}/ray_results``); ``callbacks``: Ray Train callbacks (a sweep passes Tune's); ``relay``: the
    driver's console relay (``console.Relay().handle``), which the workers' lines and rank 0's steps go to."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ray.data
    from ray.data import ExecutionOptions

    from volvlp_ray.data.pipeline import TrainDatasetFactory
    from volvlp_ray.train.badsteps import FailureBudget
    from volvlp_ray.train.loop import train_loop_per_worker

    # the loop prints its own progress; per-operator bars from the streaming split would flood the log
    ray.data.DataContext.get_current().enable_progress_bars = False

    env = worker_env(cfg)
    if cfg.data.volume_transport == "direct":  # the workers read the voxels from the shards themselves
        from volvlp_ray.data.storage import task_runtime_env

        env["env_vars"].update((task_runtime_env(cfg.shards_path) or {}).get("env_vars", {}))
    storage = storage or runs_storage(cfg)
    from volvlp_ray.data.storage import child

    run_dir = child(storage, run_name)  # a URI keeps its query (endpoint, region) after the run's name
    # a rollback after train.max_bad_steps non-finite steps is a worker failure to Ray Train: its limit covers
    # train.max_rollbacks of them besides train.max_failures, and FailureBudget keeps the two apart (and stops the
    # run without a retry when the rollbacks are used up)
    max_failures = cfg.train.max_failures
    if max_failures >= 0 and cfg.train.max_bad_steps > 0:
        max_failures += cfg.train.max_rollbacks
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "tokenizer_dir": tokenizer_dir,
                           "tracking_uri": tracking_uri, "run_id": run_id,
                           "run_dir": run_dir,  # bad_steps.json: rollbacks (badsteps.py)
                           "console": relay},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo", timeout_s=train_timeouts(cfg)),
        # checked against the cluster now: a run that cannot be placed fails here, not after an endless wait
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": fit_cluster(cfg)}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env=env,
            callbacks=[*(callbacks or []), FailureBudget(cfg.train.max_failures)],
        ),
        # a factory: Ray Train calls it at every (re)start of the worker group, so a resumed run's stream
        # starts at the epoch of its latest checkpoint
        datasets={"train": TrainDatasetFactory(cfg, tokenizer_dir, run_dir)},
        dataset_config=DataConfig(execution_options={"train": ExecutionOptions(
            preserve_order=cfg.data.deterministic)}),
    )


def run_pretraining(cfg: Config) -> dict[str, Any]:
    """The whole job. Returns {run_name, run_id, checkpoint, export, tracking_uri, metrics, mlflow_unsent}
    (``mlflow_unsent``: the file holding what MLflow did not take, None when it took everything)."""
    from volvlp_ray.tracking import (PostTrainingLog, resolve_tracking_uri, set_run_status, start_run,
                                     unsent_metrics_path)

    t0 = time.time()
    run_name = cfg.run_name or default_run_name(cfg)
    # Ray's, DeepSpeed's, MLflow's own log records: to this file (and the console only with --verbose)
    log_path = console.setup_logging(cfg.workspace_path / "logs", run_name)
    ensure_ray(cfg)
    fit_cluster(cfg, quiet=True)  # a cluster too small for the run fails now, before any data is prepared
    ensure_shards(cfg)
    tokenizer_dir = ensure_tokenizer(cfg)
    cfg.run_name = run_name  # the export's config then names its run (jobs/evaluate.py finds the MLflow run)
    tracking_uri = resolve_tracking_uri(cfg)
    run_id = start_run(cfg, run_name)
    console.info(f"[mlflow] run {run_name} ({run_id}) at {tracking_uri}")
    try:
        with console.Relay() as relay:
            trainer = build_trainer(cfg, run_name, tokenizer_dir, tracking_uri, run_id, relay=relay.handle)
            console.info(f"[train] {cfg.scaling.num_workers} workers, {cfg.train.steps} steps, global batch "
                         f"{cfg.train.batch_size * cfg.scaling.num_workers}, ZeRO-{cfg.train.zero_stage}, "
                         f"{cfg.loss.kind} loss")
            t_fit = time.time()
            result = trainer.fit()
            fit_s = time.time() - t_fit
        if result.error:
            raise result.error
        ckpt_dir = result.checkpoint.path
        export_dir = local_export(result.checkpoint)
        console.info(f"[train] done in {fit_s:.0f}s; checkpoint {ckpt_dir}")
        if not os.path.isfile(os.path.join(export_dir, "vlp_config.json")):
            raise RuntimeError(f"the final checkpoint {ckpt_dir} has no export/ (was the run stopped before its "
                               "last step?)")
        # from here on training, checkpoint and export are safe: a tracking server that is away does not fail the
        # job; what it does not take goes to the run's unsent file (with rank 0's), and the job says how to send it
        post = PostTrainingLog(tracking_uri, run_id, unsent_metrics_path(cfg, run_id))
        post.metrics({"train/fit_seconds": fit_s}, cfg.train.steps, what="train/fit_seconds")
        metrics: dict[str, float] = {}
        if cfg.eval.at_end:
            metrics = evaluate_export(cfg, export_dir, tokenizer_dir, post)
        model_uri = post.model(export_dir)
        post.metrics({"job/seconds": time.time() - t0}, cfg.train.steps, what="job/seconds")
        post.terminate("FINISHED")
        unsent = post.report(f"Training, checkpoint and export are complete: {ckpt_dir}")
    except BaseException:
        set_run_status(tracking_uri, run_id, "FAILED")  # one fail-fast try: the job's own error is what matters
        raise
    note = " (incomplete: see the [mlflow] error above)" if unsent else ""
    job_s = time.time() - t0
    console.info(f"[job] finished in {job_s:.0f}s; MLflow run {run_id}{note}")
    held_out = None
    if metrics:
        held_out = (f"t2v R@10 {metrics.get('eval/t2v/recall_at_10', float('nan')):.3f}, v2t R@10 "
                    f"{metrics.get('eval/v2t/recall_at_10', float('nan')):.3f}, zero-shot mean AUROC "
                    f"{metrics.get('eval/zeroshot/mean/auroc', float('nan')):.3f} ({int(metrics['eval/n'])} volumes)")
    console.summary("pre-training done", [
        ("run", f"{run_name} (MLflow run {run_id}){note}"),
        ("MLflow UI", f"mlflow ui --backend-store-uri {tracking_uri}"),
        ("time", f"{job_s:.0f} s (training {fit_s:.0f} s)"),
        ("held-out", held_out),
        ("checkpoint", ckpt_dir),
        ("model", f"{model_uri} (mlflow.pyfunc.load_model)" if model_uri else "not logged yet (see above)"),
        ("export", f"{export_dir} (volvlp_ray.VLP.from_pretrained)"),
        ("logs", f"{log_path} (driver); {_ray_log_dir()} (Ray workers)"
                 + ("" if console.is_verbose() else "; --verbose shows them here")),
    ])
    return {"run_name": run_name, "run_id": run_id, "checkpoint": ckpt_dir, "export": export_dir,
            "tracking_uri": tracking_uri, "metrics": metrics, "mlflow_unsent": str(post.path) if unsent else None}


def evaluate_export(cfg: Config, export_dir: str, tokenizer_dir: str, post) -> dict[str, float]:
    """Held-out evaluation of the export; plots and metrics logged through ``post`` (a ``PostTrainingLog``:
    metrics not logged twice at the same step, and kept in the unsent file when the server is away)."""
    from volvlp_ray.eval.run import evaluate_model
    from volvlp_ray.models import VLP

    model = VLP.from_pretrained(export_dir)
    with tempfile.TemporaryDirectory() as plots_dir:
        res = evaluate_model(model, cfg, "valid", tokenizer_dir, plots_dir=plots_dir)
        post.artifacts(res["plots"], "plots", what=f"{len(res['plots'])} evaluation plots")
    m = res["metrics"]
    if post.metrics(m, cfg.train.steps, sentinel="eval/n", what=f"{len(m)} held-out metrics (eval/...)") is False:
        console.info(f"[eval] run {post.run_id} already has held-out metrics at step {cfg.train.steps}: not logged "
                     "again")
    console.info(_summary(m))
    return m


def _summary(m: dict[str, float]) -> str:
    from volvlp_ray.data.ctrate import LABELS

    lines = [f"[eval] held-out split: {int(m['eval/n'])} volumes"]
    for d in ("t2v", "v2t"):
        ks = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith(f"eval/{d}/recall_at_") and "random" not in k)
        lines.append(f"[eval] {d}: " + "  ".join(
            f"R@{k} {m[f'eval/{d}/recall_at_{k}']:.3f} (random {m[f'eval/{d}/recall_at_{k}_random']:.3f})" for k in ks))
    lines.append(f"[eval] zero-shot mean AUROC {m.get('eval/zeroshot/mean/auroc', float('nan')):.3f}; per label:")
    cells = []
    for label in LABELS:
        key = "eval/zeroshot/per_label/" + "".join(c if c.isalnum() or c in "-_./ " else "_" for c in label) + "/auroc"
        if key in m:
            cells.append(f"{label[:30]:30s} {m[key]:.3f}")
    for i in range(0, len(cells), 3):  # three to a line: the whole table at a glance
        lines.append("[eval]   " + "   ".join(cells[i:i + 3]))
    return "\n".join(lines)


def _ray_log_dir() -> str | None:
    """Where this Ray session keeps its processes' logs (the workers' output when not --verbose)."""
    try:
        import ray

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - a cluster's driver may not know; Ray's docs say where
        return "the Ray session's logs folder (/tmp/ray/session_latest/logs on each node)"
