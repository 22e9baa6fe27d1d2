"""Sweeps: Ray Tune over config keys (α, the initial temperature, lr, loss kind, ...), every trial a distributed
pre-training run, all of it in MLflow.

``run_sweep(cfg)`` is what ``jobs/sweep.py`` calls:

1. data, shards and tokenizer as for one run (made once, shared by all trials);
2. an MLflow parent run for the sweep (tag ``volvlp.sweep``), found again when the sweep is resumed;
3. a Tune *function trainable* per trial that builds and fits a ``TorchTrainer`` (the Ray 2.60 pattern), with
   ``TuneReportCallback`` forwarding the trial's Ray Train reports (validation metrics, see ``eval.every``)
   to Tune; each trial is its own Ray Train run (own checkpoints) and its own MLflow child run
   (``mlflow.parentRunId``) with its params and metric curves;
4. ASHA stops weak trials at validation points; concurrency follows the cluster's resources and the trial's
   worker count;
5. afterwards: the best trial is tagged, its config written as ``best.yaml`` (runs as is with
   ``jobs/pretrain.py --config``) and a plot of the metric against the swept values logged to the parent.

Run again with the same ``sweep.name``, an interrupted sweep resumes: finished trials are kept, unfinished
ones restart and their training runs continue from their own latest checkpoints.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

from volvlp_ray import console
from volvlp_ray.config import Config, ConfigError, config_from_dict, config_to_dict, dump_yaml, parse_override

__all__ = ["apply_params", "check_swept_keys_matter", "parse_search_space", "resumable_tuner", "run_sweep",
           "trial_concurrency"]

_DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


def apply_params(base: dict, params: dict[str, Any]) -> Config:
    """The base config (a dict) with dotted ``params`` applied; unknown keys fail with the valid ones named."""
    merged = copy.deepcopy(base)
    for key, value in params.items():
        node = merged
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"sweep key {key!r}: {part!r} is not a section")
        node[leaf] = value
    return config_from_dict(merged)


def parse_search_space(space: dict[str, Any], base: dict) -> dict[str, Any]:
    """``sweep.search_space`` -> Tune domains keyed by dotted config key (each key checked against the tree)."""
    from ray import tune

    if not space:
        raise ConfigError("sweep.search_space is empty: give at least one key to sweep")
    out: dict[str, Any] = {}
    for key, spec in space.items():
        parse_override(f"{key}=0")  # syntax
        if isinstance(spec, list):
            spec = {"grid": spec}
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _DOMAINS):
            raise ConfigError(f"sweep.search_space[{key!r}] must be a list or one of "
                              f"{{{', '.join(f'{d}: ...' for d in _DOMAINS)}}}, got {spec!r}")
        (kind, values), = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.search_space[{key!r}].{kind} needs a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
            raise ConfigError(f"sweep.search_space[{key!r}].{kind} needs [low, high], got {values!r}")
        for v in values if kind in ("grid", "choice") else values[:1]:
            apply_params(base, {key: v})  # the key exists and the value has its type
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](values) if kind in ("grid", "choice") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*values)
    check_swept_keys_matter(space, base)
    return out


def check_swept_keys_matter(space: dict[str, Any], base: dict, what: str = "sweep.search_space") -> None:
    """A swept key that has no effect in some of the trials (``config.voided_by``: alpha with a loss that ignores
    it, ...) is a ``ConfigError`` naming the key and the setting that voids it: those trials would differ only in
    their name. Every combination of the listed (grid / choice) values is checked; a sampled range counts with
    its low end."""
    import itertools

    from volvlp_ray.config import voided_by

    listed = {}
    for key, spec in space.items():
        values = spec if isinstance(spec, list) else next(iter(spec.values()))
        kind = "grid" if isinstance(spec, list) else next(iter(spec))
        listed[key] = list(values) if kind in ("grid", "choice") else [values[0]]
    combos = itertools.islice(itertools.product(*listed.values()), 4096)
    for combo in combos:
        params = dict(zip(listed, combo))
        cfg = apply_params(base, params)
        for key in space:
            reason = voided_by(cfg, key)
            if reason:
                setting = reason.split("=")[0]
                where = "in the trials with" if setting in params and setting != key else "with"
                raise ConfigError(
                    f"{what} key {key!r} has no effect {where} {reason}: trials that differ only in it would "
                    f"train the same model; drop the key or change {setting}")


def trial_concurrency(cfg: Config, resources: dict[str, float]) -> int:
    """Trials that fit at once: each needs ``num_workers`` x (``cpus_per_worker`` CPUs [+ 1 GPU]) plus one CPU
    for its data pipeline; ``sweep.max_concurrent`` caps it."""
    s = cfg.scaling
    cpu_per_trial = s.num_workers * s.cpus_per_worker + 1
    fit = int(resources.get("CPU", 0) // cpu_per_trial)
    if s.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // s.num_workers))
    if fit < 1:
        raise RuntimeError(f"one trial needs {cpu_per_trial} CPUs{f' and {s.num_workers} GPUs' if s.use_gpu else ''}; "
                           f"the cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs")
    return min(fit, cfg.sweep.max_concurrent) if cfg.sweep.max_concurrent > 0 else fit


def _trial(params: dict[str, Any], *, base: dict, sweep: str, tokenizer_dir: str, tracking_uri: str,
           parent_run_id: str, storage: str) -> None:
    """One trial (runs in a Tune trial actor): the config with ``params``, an MLflow child run, a TorchTrainer."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from volvlp_ray.tracking import start_run
    from volvlp_ray.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(base, params)
    cfg.run_name = f"{sweep}-{trial_id}"
    cfg.sweep.name = sweep
    run_id = start_run(cfg, cfg.run_name, tags={
        "mlflow.parentRunId": parent_run_id, "volvlp.sweep": sweep, "volvlp.trial_id": trial_id,
        **{f"volvlp.sweep_param.{k}": str(v) for k, v in params.items()},
    })
    client = MlflowClient(tracking_uri)
    try:
        trainer = build_trainer(cfg, cfg.run_name, tokenizer_dir, tracking_uri, run_id,
                                callbacks=[TuneReportCallback()], storage=storage)
        result = trainer.fit()
        if result.error:
            raise result.error
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def run_sweep(cfg: Config) -> dict[str, Any]:
    """The whole sweep; returns {name, parent_run_id, best_run_id, best_params, best_metric, best_config}."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    import ray

    from volvlp_ray.tracking import resolve_tracking_uri, start_run
    from volvlp_ray.train.trainer import ensure_ray, ensure_shards, ensure_tokenizer, runs_storage

    t0 = time.time()
    if cfg.eval.every < 1:
        raise ConfigError("a sweep ranks trials by validation during training: set eval.every (e.g. "
                          "train.steps // 4) so every trial reports sweep.metric")
    if not cfg.sweep.metric.startswith("val/"):
        raise ConfigError(f"sweep.metric={cfg.sweep.metric!r}: trials report validation metrics, named val/...")
    name = cfg.sweep.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.sweep.name = name
    base = config_to_dict(cfg)
    base["run_name"] = None
    space = parse_search_space(cfg.sweep.search_space, base)

    log_path = console.setup_logging(cfg.workspace_path / "logs", f"sweep-{name}")
    ensure_ray(cfg, concurrent_trials=cfg.sweep.max_concurrent or 2)
    ensure_shards(cfg)
    tokenizer_dir = ensure_tokenizer(cfg)
    concurrency = trial_concurrency(cfg, ray.cluster_resources())
    tracking_uri = resolve_tracking_uri(cfg)
    parent_run_id = start_run(cfg, f"sweep:{name}", tags={"volvlp.sweep": name, "volvlp.sweep_parent": "true"})
    client = MlflowClient(tracking_uri)
    root = f"{runs_storage(cfg)}/sweeps"  # Tune's experiment and the trials' Ray Train runs (a path or URI)
    storage = f"{root}/{name}/trials"
    print(f"[sweep] {name}: {', '.join(cfg.sweep.search_space)}; {cfg.sweep.scheduler} on {cfg.sweep.metric} "
          f"({cfg.sweep.mode}); {concurrency} trial(s) at a time; MLflow parent run {parent_run_id}", flush=True)

    trainable = tune.with_parameters(_trial, base=base, sweep=name, tokenizer_dir=tokenizer_dir,
                                     tracking_uri=tracking_uri, parent_run_id=parent_run_id, storage=storage)
    # the trial actor only drives its TorchTrainer, whose workers hold the resources (Tune needs a non-empty
    # request); how many trials run at once is max_concurrent_trials
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    steps = cfg.train.steps
    try:
        def scheduler():
            return ASHAScheduler(
                # max_t beyond the last step: a trial that gets there ends by itself (Tune would otherwise
                # stop -- kill -- it at its final report, before its run is closed)
                time_attr="step", max_t=steps + 1, grace_period=cfg.sweep.grace_period or max(1, steps // 4),
                reduction_factor=cfg.sweep.reduction_factor,
            ) if cfg.sweep.scheduler == "asha" else FIFOScheduler()

        tuner = resumable_tuner(root, name, trainable, "sweep", lambda: dict(
            param_space=space,
            tune_config=tune.TuneConfig(metric=cfg.sweep.metric, mode=cfg.sweep.mode, scheduler=scheduler(),
                                        num_samples=cfg.sweep.num_samples, max_concurrent_trials=concurrency)))
        with console.Relay():  # the trials' warnings and errors reach this console
            grid = tuner.fit()
        summary = _summarise(cfg, name, grid, client, parent_run_id, base)
        client.log_metric(parent_run_id, "sweep/seconds", time.time() - t0)
        client.set_terminated(parent_run_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    print(f"[sweep] done in {time.time() - t0:.0f}s; best {cfg.sweep.metric} = {summary['best_metric']:.4f} with "
          f"{summary['best_params']}; config {summary['best_config']}", flush=True)
    console.info(f"[sweep] library logs: {log_path}; the trials' own output: Ray's session logs (--verbose shows both)")
    return summary


def resumable_tuner(root: str, name: str, trainable, tag: str, new_kwargs):
    """The Tune experiment ``{root}/{name}/tune``: restored (finished trials kept, unfinished and errored ones run again)
    when it exists, else a new ``Tuner`` of ``trainable`` with ``new_kwargs()`` (param_space, tune_config). Sweeps
    and ablations resume by name through it."""
    from ray import tune

    experiment = f"{root}/{name}/tune"
    if tune.Tuner.can_restore(experiment):
        print(f"[{tag}] resuming {name} from {experiment}", flush=True)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    # Tune's status table every 30 s only with --verbose; else a bar over the trials (console.trial_progress)
    return tune.Tuner(trainable, run_config=tune.RunConfig(
        name="tune", storage_path=f"{root}/{name}", verbose=1 if console.is_verbose() else 0,
        callbacks=[] if console.is_verbose() else [console.trial_progress(tag)]), **new_kwargs())


def _summarise(cfg: Config, name: str, grid, client, parent_run_id: str, base: dict) -> dict[str, Any]:
    """Tag the best trial, write/log its config, plot metric vs swept values, close stopped child runs."""
    import tempfile

    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    rows = []
    for res in grid:
        params = {k: v for k, v in (res.config or {}).items()}
        value = (res.metrics or {}).get(metric)
        rows.append({"trial_id": (res.metrics or {}).get("trial_id"), "params": params,
                     "metric": float(value) if value is not None else math.nan,
                     "step": (res.metrics or {}).get("step"), "error": res.error})
    scored = [r for r in rows if not math.isnan(r["metric"])]
    if not scored:
        raise RuntimeError(f"no trial of sweep {name} reported {metric}: " + "; ".join(
            f"{r['trial_id']}: {r['error']}" for r in rows))
    best = (max if mode == "max" else min)(scored, key=lambda r: r["metric"])

    exp_ids = [client.get_run(parent_run_id).info.experiment_id]
    children = {r.data.tags.get("volvlp.trial_id"): r for r in client.search_runs(
        exp_ids, filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000)}
    for r in rows:
        child = children.get(r["trial_id"])
        if child is None:
            continue
        client.set_tag(child.info.run_id, "volvlp.best_trial", str(r is best).lower())
        # Tune's outcome is the truth: a trial killed by the scheduler never closes its run, and one that was
        # running when an interrupted sweep's driver died may have marked itself FAILED before Tune, on
        # resume, found it complete
        if r["error"] is not None:
            status = "FAILED"
        elif r["step"] is not None and r["step"] >= cfg.train.steps:
            status = "FINISHED"
        else:
            status = "KILLED"
            client.set_tag(child.info.run_id, "volvlp.stopped_early", "true")
        if child.info.status != status:
            client.set_terminated(child.info.run_id, status)
    best_child = children.get(best["trial_id"])

    best_cfg = apply_params(base, best["params"])
    best_cfg.run_name = None
    out_dir = cfg.workspace_path / "sweeps" / name  # local, next to the data, whatever train.storage_path is
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path = out_dir / "best.yaml"
    best_path.write_text(f"# best trial of sweep {name}: {metric} = {best['metric']:.6g} with {best['params']}\n"
                         f"# run it with: python jobs/pretrain.py --config {best_path}\n" + dump_yaml(best_cfg))
    client.log_artifact(parent_run_id, str(best_path))
    client.set_tag(parent_run_id, "volvlp.best_trial_id", str(best["trial_id"]))
    if best_child is not None:
        client.set_tag(parent_run_id, "volvlp.best_run_id", best_child.info.run_id)
    client.log_metric(parent_run_id, f"best/{metric}", best["metric"])
    for k, v in best["params"].items():
        client.set_tag(parent_run_id, f"volvlp.best_param.{k}", str(v))
    with tempfile.TemporaryDirectory() as tmp:
        plot = _plot(rows, metric, os.path.join(tmp, "sweep_metric.png"))
        client.log_artifact(parent_run_id, plot, "plots")
    for r in sorted(rows, key=lambda r: -r["metric"] if mode == "max" else r["metric"]):
        print(f"[sweep]   {r['trial_id']}: {metric} {r['metric']:.4f} at step {r['step']}  {r['params']}"
              f"{'  <- best' if r is best else ''}", flush=True)
    return {"name": name, "parent_run_id": parent_run_id,
            "best_run_id": best_child.info.run_id if best_child else None, "best_params": best["params"],
            "best_metric": best["metric"], "best_config": str(best_path), "trials": rows}


def _axis(key: str, values: list[float]) -> tuple[str, list[float]]:
    if key == "model.init_logit_scale":  # the logit scale is the inverse temperature
        return "initial temperature (1 / model.init_logit_scale)", [1.0 / v for v in values]
    return key, values


def _plot(rows: list[dict], metric: str, path: str) -> str:
    """The metric against the (up to two) numeric swept keys: a scatter coloured by the metric."""
    from volvlp_ray.eval.plots import _figure

    keys = [k for k in rows[0]["params"] if all(isinstance(r["params"].get(k), (int, float)) for r in rows)][:2]
    fig = _figure(6.0, 4.5)
    ax = fig.subplots()
    vals = [r["metric"] for r in rows]
    if len(keys) == 2:
        xl, xs = _axis(keys[0], [float(r["params"][keys[0]]) for r in rows])
        yl, ys = _axis(keys[1], [float(r["params"][keys[1]]) for r in rows])
        sc = ax.scatter(xs, ys, c=vals, cmap="viridis", s=120, edgecolors="black")
        for x, y, v in zip(xs, ys, vals):
            ax.annotate(f"{v:.3f}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        fig.colorbar(sc, ax=ax, label=metric)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    else:
        xl, xs = _axis(keys[0], [float(r["params"][keys[0]]) for r in rows]) if keys else ("trial", list(range(len(rows))))
        ax.scatter(xs, vals, s=60)
        ax.set_xlabel(xl)
        ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
