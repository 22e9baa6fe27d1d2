"""Ablations: a grid of pre-training runs over loss x text x alpha x global batch x seed, each evaluated on the
held-out split; a results table and the papers' two plots. ``run_ablation(cfg)`` is what ``jobs/ablate.py`` calls.

1. the trials (``ablation_trials``): the main grid ``ablation.losses x ablation.texts x ablation.seeds`` at
   ``loss.alpha`` and the config's global batch, an alpha arm (``alpha_losses x alphas x seeds``, report text) and a
   batch arm (``batch_losses x global_batches x seeds``, report text); a trial two arms share runs once; every
   override is checked with ``config.voided_by`` (alpha is set only for SWCA losses);
2. data, shards and tokenizer once; an MLflow parent run (tag ``volvlp.ablation``);
3. a Tune function trainable per trial (the sweep's machinery, FIFO: every trial runs to the end): a
   ``TorchTrainer`` run, then the held-out evaluation of its export in the trial (retrieval both ways with
   bootstrap CIs, zero-shot AUROC with bootstrap CIs), logged to its MLflow child run;
4. afterwards (``summarise``): per cell (loss, text, alpha, global batch) the mean over seeds, the seed SD and the
   mean 95 % bootstrap CI of each metric, as ``results.md`` / ``results.json`` in ``{workspace}/ablations/{name}``
   and on the parent run, with the plots ``alpha_retrieval.png`` (SCALE-VLP Fig. 5: CT->report recall against
   alpha) and ``batch_size.png`` (SigVLP Fig. 2: the metrics against the global batch).

Run again with the same ``ablation.name``: finished trials are kept, unfinished ones restart.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from volvlp_ray import console
from volvlp_ray.config import Config, ConfigError, config_to_dict, voided_by

__all__ = ["LOSS_ARMS", "METRICS", "ablation_trials", "recall_with_cis", "run_ablation", "summarise"]

LOSS_ARMS: dict[str, dict[str, str]] = {
    "clip": {"loss.kind": "clip"},
    "sigmoid": {"loss.kind": "sigmoid"},
    "swca-sigmoid": {"loss.kind": "swca", "loss.form": "sigmoid"},
    "swca-softmax": {"loss.kind": "swca", "loss.form": "softmax"},
}
METRICS: dict[str, str] = {
    "v2t/recall_at_1": "CT→report R@1", "v2t/recall_at_5": "CT→report R@5", "v2t/recall_at_10": "CT→report R@10",
    "t2v/recall_at_1": "report→CT R@1", "t2v/recall_at_5": "report→CT R@5", "t2v/recall_at_10": "report→CT R@10",
    "zeroshot/mean/auroc": "zero-shot AUROC",
}
"""The table's metrics (keys under ``ablation/`` in the child runs, with ``_ci_low`` / ``_ci_high``)."""


def ablation_trials(cfg: Config) -> list[dict[str, Any]]:
    """The trials of ``cfg.ablation``, each ``{"id", "cell": {loss, text, alpha, global_batch}, "seed",
    "overrides"}``; a ``ConfigError`` for an unknown arm, a batch the workers cannot split, or an override that
    would have no effect."""
    from volvlp_ray.tune import apply_params

    a, workers = cfg.ablation, cfg.scaling.num_workers
    base_batch = cfg.train.batch_size * workers
    for loss in [*a.losses, *a.alpha_losses, *a.batch_losses]:
        if loss not in LOSS_ARMS:
            raise ConfigError(f"ablation loss {loss!r} is not one of {list(LOSS_ARMS)}")
    for loss in a.alpha_losses:
        if not loss.startswith("swca"):
            raise ConfigError(f"ablation.alpha_losses: {loss!r} has no alpha (only the SWCA losses do)")
    for text in a.texts:
        if text not in ("report", "organ"):
            raise ConfigError(f"ablation text {text!r} is not one of ['report', 'organ']")
    if not a.seeds:
        raise ConfigError("ablation.seeds is empty: give at least one seed (two for a seed spread)")
    base = config_to_dict(cfg)
    base["run_name"] = None
    cells: list[tuple[str, str, float | None, int]] = []
    for loss in a.losses:
        for text in a.texts:
            cells.append((loss, text, cfg.loss.alpha if loss.startswith("swca") else None, base_batch))
    cells += [(loss, "report", float(alpha), base_batch) for loss in a.alpha_losses for alpha in a.alphas]
    cells += [(loss, "report", cfg.loss.alpha if loss.startswith("swca") else None, int(g))
              for loss in a.batch_losses for g in a.global_batches]
    trials, seen = [], set()
    for loss, text, alpha, batch in cells:
        if batch % workers:
            raise ConfigError(f"ablation global batch {batch} does not split over scaling.num_workers={workers}")
        per_worker = batch // workers
        overrides: dict[str, Any] = {**LOSS_ARMS[loss], "data.text_mode": text, "train.batch_size": per_worker,
                                     "data.chunks_per_volume": a.chunks_per_volume if text == "organ" else 1}
        if alpha is not None:
            overrides["loss.alpha"] = alpha
        for seed in a.seeds:
            key = json.dumps({**overrides, "seed": seed}, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            trial_cfg = apply_params(base, {**overrides, "seed": seed})  # validates (batch a multiple of K, ...)
            for k in overrides:
                reason = voided_by(trial_cfg, k)
                if reason and k != "data.chunks_per_volume":
                    raise ConfigError(f"ablation trial {loss}/{text}: {k} has no effect with {reason}")
            cell = {"loss": loss, "text": text, "alpha": alpha, "global_batch": batch}
            name = f"{loss}-{text}-a{alpha if alpha is not None else 'na'}-b{batch}-s{seed}"
            trials.append({"id": name, "cell": cell, "seed": seed, "overrides": {**overrides, "seed": seed}})
    return trials


def recall_with_cis(text: np.ndarray, volume: np.ndarray, ks=(1, 5, 10), n_bootstrap: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """Recall@K both ways (``t2v/recall_at_K``: a report finds its volume; ``v2t``: a volume its report) with
    percentile 95 % bootstrap CIs over the queries (``..._ci_low``, ``..._ci_high``); the gallery is the whole split.
    Row ``i`` of ``text`` and ``volume`` belong together; embeddings are L2-normalised here."""
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    v = volume / np.linalg.norm(volume, axis=1, keepdims=True)
    sims = t @ v.T
    n = len(t)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_bootstrap, n)) if n_bootstrap else None
    out: dict[str, float] = {}
    for name, s in (("t2v", sims), ("v2t", sims.T)):
        rank = (s > np.diag(s)[:, None]).sum(axis=1)  # items ranked above the true one (ties count for it)
        for k in ks:
            hit = (rank < k).astype(np.float64)
            out[f"{name}/recall_at_{k}"] = float(hit.mean())
            if draws is not None:
                boots = hit[draws].mean(axis=1)
                out[f"{name}/recall_at_{k}_ci_low"] = float(np.percentile(boots, 2.5))
                out[f"{name}/recall_at_{k}_ci_high"] = float(np.percentile(boots, 97.5))
    return out


def _trial(params: dict[str, Any], *, base: dict, name: str, tokenizer_dir: str, tracking_uri: str,
           parent_run_id: str, storage: str) -> None:
    """One trial (in a Tune trial actor): pre-training with the trial's overrides, then the held-out evaluation."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from ray import tune

    from volvlp_ray.eval.run import evaluate_model
    from volvlp_ray.models import VLP
    from volvlp_ray.tracking import start_run
    from volvlp_ray.train.trainer import build_trainer, local_export
    from volvlp_ray.tune import apply_params

    spec = params["spec"]
    cfg = apply_params(base, spec["overrides"])
    cfg.run_name = f"{name}-{spec['id']}"
    cfg.eval.every = 0  # evaluated once, at the end, on the whole held-out split
    run_id = start_run(cfg, cfg.run_name, tags={
        "mlflow.parentRunId": parent_run_id, "volvlp.ablation": name, "volvlp.ablation_trial": spec["id"],
        "volvlp.ablation_cell": json.dumps(spec["cell"], sort_keys=True), "volvlp.seed": str(spec["seed"])})
    client = MlflowClient(tracking_uri)
    try:
        result = build_trainer(cfg, cfg.run_name, tokenizer_dir, tracking_uri, run_id, storage=storage).fit()
        if result.error:
            raise result.error
        model = VLP.from_pretrained(local_export(result.checkpoint))
        res = evaluate_model(model, cfg, "valid", tokenizer_dir, prefix="ablation/")
        emb = res["embeddings"]
        metrics = {k: v for k, v in res["metrics"].items()
                   if k.startswith("ablation/zeroshot/mean/") or k == "ablation/n"}
        metrics.update({f"ablation/{k}": v for k, v in recall_with_cis(
            emb["text"], emb["volume"], n_bootstrap=cfg.eval.n_bootstrap, seed=cfg.seed).items()})
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, cfg.train.steps) for k, v in metrics.items()
                                          if math.isfinite(float(v))])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    tune.report({"done": 1.0, **{k.replace("/", "_"): float(v) for k, v in metrics.items()}})


def run_ablation(cfg: Config) -> dict[str, Any]:
    """The whole ablation; returns ``summarise``'s result plus ``name`` and ``parent_run_id``."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    import ray

    from volvlp_ray.tracking import resolve_tracking_uri, start_run
    from volvlp_ray.train.trainer import ensure_ray, ensure_shards, ensure_tokenizer, runs_storage
    from volvlp_ray.tune import resumable_tuner, trial_concurrency

    t0 = time.time()
    name = cfg.ablation.name or f"ablation-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.ablation.name = name
    trials = ablation_trials(cfg)
    base = config_to_dict(cfg)
    base["run_name"] = None
    log_path = console.setup_logging(cfg.workspace_path / "logs", f"ablation-{name}")
    ensure_ray(cfg, concurrent_trials=cfg.ablation.max_concurrent or 2)
    ensure_shards(cfg)
    tokenizer_dir = ensure_tokenizer(cfg)
    concurrency = trial_concurrency(cfg, ray.cluster_resources())
    if cfg.ablation.max_concurrent:
        concurrency = min(concurrency, cfg.ablation.max_concurrent)
    tracking_uri = resolve_tracking_uri(cfg)
    parent_run_id = start_run(cfg, f"ablation:{name}", tags={"volvlp.ablation": name,
                                                             "volvlp.ablation_parent": "true"})
    client = MlflowClient(tracking_uri)
    root = f"{runs_storage(cfg)}/ablations"
    print(f"[ablate] {name}: {len(trials)} trials ({len({json.dumps(t['cell'], sort_keys=True) for t in trials})} "
          f"cells x {len(cfg.ablation.seeds)} seeds), {concurrency} at a time, {cfg.train.steps} steps each; "
          f"MLflow parent run {parent_run_id}", flush=True)
    trainable = tune.with_parameters(_trial, base=base, name=name, tokenizer_dir=tokenizer_dir,
                                     tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                     storage=f"{root}/{name}/trials")
    trainable = tune.with_resources(trainable, {"CPU": 0.01})  # the trial's TorchTrainer workers hold the CPUs
    try:
        tuner = resumable_tuner(root, name, trainable, "ablate", lambda: dict(
            param_space={"spec": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency)))
        with console.Relay():  # the trials' warnings and errors reach this console
            grid = tuner.fit()
        errors = [str(r.error) for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} ablation trial(s) failed: " + "; ".join(errors[:3]))
        summary = summarise(cfg, name, client, parent_run_id)
        client.log_metric(parent_run_id, "ablation/seconds", time.time() - t0)
        client.set_terminated(parent_run_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    print(f"[ablate] done in {time.time() - t0:.0f}s; table {summary['table']}", flush=True)
    console.info(f"[ablate] library logs: {log_path}; the trials' own output: Ray's session logs (--verbose shows "
                 "both)")
    return {"name": name, "parent_run_id": parent_run_id, **summary}


def _cell_key(cell: dict[str, Any]) -> tuple:
    return (cell["loss"], cell["text"], -1.0 if cell["alpha"] is None else cell["alpha"], cell["global_batch"])


def summarise(cfg: Config, name: str, client, parent_run_id: str) -> dict[str, Any]:
    """The child runs of the ablation -> per cell: mean over seeds, seed SD and mean 95 % CI of each metric; the
    table (markdown, JSON) and plots written to ``{workspace}/ablations/{name}`` and logged to the parent run."""
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=10000)
    cells: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        if r.info.status != "FINISHED" or "volvlp.ablation_cell" not in r.data.tags:
            continue
        cell = json.loads(r.data.tags["volvlp.ablation_cell"])
        entry = cells.setdefault(_cell_key(cell), {"cell": cell, "seeds": [], "runs": []})
        entry["seeds"].append(int(r.data.tags.get("volvlp.seed", -1)))
        entry["runs"].append(r.data.metrics)
    if not cells:
        raise RuntimeError(f"ablation {name}: no finished trial in MLflow run {parent_run_id}")
    rows = []
    for key in sorted(cells):
        entry = cells[key]
        row = {**entry["cell"], "seeds": sorted(entry["seeds"]), "metrics": {}}
        for m in METRICS:
            vals = [x[f"ablation/{m}"] for x in entry["runs"] if f"ablation/{m}" in x]
            lows = [x[f"ablation/{m}_ci_low"] for x in entry["runs"] if f"ablation/{m}_ci_low" in x]
            highs = [x[f"ablation/{m}_ci_high"] for x in entry["runs"] if f"ablation/{m}_ci_high" in x]
            row["metrics"][m] = {
                "mean": float(np.mean(vals)) if vals else math.nan,
                "seed_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                "ci_low": float(np.mean(lows)) if lows else math.nan,
                "ci_high": float(np.mean(highs)) if highs else math.nan,
                "n": len(vals),
            }
        rows.append(row)
    out_dir = cfg.workspace_path / "ablations" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "results.md"
    table.write_text(_markdown(name, cfg, rows))
    (out_dir / "results.json").write_text(json.dumps({"name": name, "steps": cfg.train.steps, "cells": rows},
                                                     indent=2))
    plots = [p for p in (_alpha_plot(rows, out_dir / "alpha_retrieval.png"),
                         _batch_plot(rows, out_dir / "batch_size.png")) if p]
    for path in (table, out_dir / "results.json"):
        client.log_artifact(parent_run_id, str(path))
    for p in plots:
        client.log_artifact(parent_run_id, str(p), "plots")
    print(table.read_text(), flush=True)
    return {"table": str(table), "json": str(out_dir / "results.json"), "plots": [str(p) for p in plots],
            "cells": rows}


def _fmt(m: dict[str, float]) -> str:
    if math.isnan(m["mean"]):
        return "–"
    sd = f" ± {m['seed_sd']:.3f}" if not math.isnan(m["seed_sd"]) else ""
    ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if not math.isnan(m["ci_low"]) else ""
    return f"{m['mean']:.3f}{sd}{ci}"


def _markdown(name: str, cfg: Config, rows: list[dict[str, Any]]) -> str:
    head = ["loss", "text", "α", "global batch", "seeds", *METRICS.values()]
    lines = [f"# Ablation {name}", "",
             f"{cfg.train.steps} steps per trial; held-out split of {cfg.shards_path}. Each cell: mean over seeds "
             "± seed SD [mean of the seeds' 95 % bootstrap CIs].", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        alpha = "–" if r["alpha"] is None else f"{r['alpha']:g}"
        text = r["text"] if r["text"] == "report" else f"organ (K={cfg.ablation.chunks_per_volume})"
        cols = [r["loss"], text, alpha, str(r["global_batch"]), ",".join(map(str, r["seeds"])),
                *(_fmt(r["metrics"][m]) for m in METRICS)]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def _alpha_plot(rows: list[dict[str, Any]], path) -> str | None:
    """CT->report recall against alpha for each SWCA loss (report text), mean ± seed SD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["alpha"] is not None and r["text"] == "report":
            series.setdefault(f"{r['loss']} (batch {r['global_batch']})", []).append(r)
    series = {k: sorted(v, key=lambda r: r["alpha"]) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharex=True)
    for ax, k in zip(axes, (1, 5, 10)):
        m = f"v2t/recall_at_{k}"
        for label, rs in series.items():
            x = [r["alpha"] for r in rs]
            y = [r["metrics"][m]["mean"] for r in rs]
            e = [0.0 if math.isnan(r["metrics"][m]["seed_sd"]) else r["metrics"][m]["seed_sd"] for r in rs]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
        ax.set_xlabel("α (weight of the identity in the targets)")
        ax.set_title(f"CT→report R@{k}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _batch_plot(rows: list[dict[str, Any]], path) -> str | None:
    """CT->report R@5 and zero-shot AUROC against the global batch for each loss (report text), mean ± seed SD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["text"] == "report":
            label = r["loss"] + (f" α={r['alpha']:g}" if r["alpha"] is not None else "")
            series.setdefault(label, {})[r["global_batch"]] = r
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, m in zip(axes, ("v2t/recall_at_5", "zeroshot/mean/auroc")):
        for label, by_batch in series.items():
            xs = sorted(by_batch)
            ys = [by_batch[b]["metrics"][m]["mean"] for b in xs]
            es = [0.0 if math.isnan(by_batch[b]["metrics"][m]["seed_sd"]) else by_batch[b]["metrics"][m]["seed_sd"]
                  for b in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_title(METRICS[m])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
