"""The evaluate job, driver side: checkpoint -> config -> embeddings -> metrics -> JSON + MLflow.

``run_evaluation(...)`` is what ``jobs/evaluate.py`` calls:

1. resolve ``--checkpoint`` (export folder, Ray Train checkpoint folder, or ``latest``);
2. config = the training run's config saved in the export (less its ``eval`` section), then ``--config``, then
   ``key=value`` overrides;
3. the data: ``--data`` (a split folder with ``manifest.json``, or a shards root holding ``--split``), else
   split ``valid`` of the workspace's shards;
4. embed the split (and, for the linear probe, the ``train`` split next to it), compute retrieval, zero-shot
   and probe metrics with bootstrap CIs (1000 resamples unless ``eval.n_bootstrap`` is given), draw the plots;
5. write the JSON report and log metrics, plots and the JSON to MLflow: to the training run when it can be
   identified (MLflow tag ``volvlp.run_name``), else to a new run in the experiment.  Never report text or voxels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from volvlp_ray import console
from volvlp_ray.config import Config, ConfigError, config_from_dict, parse_override
from volvlp_ray.data import storage
from volvlp_ray.eval.checkpoint import CheckpointRef, resolve_checkpoint, run_config_of

__all__ = ["DEFAULT_JOB_BOOTSTRAP", "build_eval_config", "resolve_data", "run_evaluation"]

log = logging.getLogger(__name__)

DEFAULT_JOB_BOOTSTRAP = 1000
"""Bootstrap resamples of the evaluate job unless ``eval.n_bootstrap`` is given (the CT-CLIP protocol)."""


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _user_values(config_file: str | None, overrides: list[str]) -> dict:
    """The user's partial config tree: the ``--config`` file, then the dotted overrides."""
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        values = _deep_merge(values, loaded)
    for item in overrides:
        values = _deep_merge(values, parse_override(item))
    return values


def build_eval_config(run_config: dict | None, config_file: str | None, overrides: list[str]) -> tuple[Config, dict]:
    """Defaults <- the training run's config <- ``--config`` <- overrides; returns (config, the user's values).

    The run's config keeps what the model was trained with (HU window, text length, data paths, MLflow
    destination); its ``eval`` section (the training-end evaluation's settings) is not used: the evaluate job's
    settings are the defaults plus the user's. Keys of the run's config that this version does not know are
    dropped with a warning (an older or newer run)."""
    user = _user_values(config_file, overrides)
    config_from_dict(user)  # unknown keys / bad values in the user's input fail here, naming the key
    base: dict = {}
    if run_config:
        known = asdict(Config())
        base, dropped = _known_keys({k: v for k, v in run_config.items() if k != "eval"}, known)
        if dropped:
            log.warning("ignoring keys of the run's config unknown to this version: %s", dropped)
    return config_from_dict(_deep_merge(base, user)), user


def _known_keys(values: dict, known: dict, prefix: str = "") -> tuple[dict, list[str]]:
    out, dropped = {}, []
    for k, v in values.items():
        if k not in known:
            dropped.append(prefix + k)
        elif isinstance(known[k], dict) and isinstance(v, dict):
            out[k], d = _known_keys(v, known[k], f"{prefix}{k}.")
            dropped += d
        else:
            out[k] = v
    return out, dropped


def resolve_data(cfg: Config, data: str | None, split: str) -> tuple[Config, str, str]:
    """Point ``cfg`` at the shards to evaluate. Returns (config, split, dataset name for metric keys).

    ``data``: None (``split`` of the workspace's shards), a split folder (has ``manifest.json``) or a shards
    root holding ``split/manifest.json``."""
    def has_manifest(location: str) -> bool:
        return storage.is_file(storage.child(location, "manifest.json"))

    if data is None:
        root = storage.normalise(cfg.shards_path)
        if not has_manifest(storage.child(root, split)):
            missing = storage.redact(storage.child(root, split, "manifest.json"))
            raise FileNotFoundError(f"no shards to evaluate: {missing} does not exist (train in "
                                    f"workspace={cfg.workspace} first, or pass --data)")
        return cfg, split, split
    path = storage.normalise(data if storage.is_uri(data) else os.path.expanduser(data))
    if has_manifest(path):
        root, split = storage.parent(path)
    elif has_manifest(storage.child(path, split)):
        root = path
    else:
        here, below = (storage.redact(storage.child(path, *p, "manifest.json")) for p in ((), (split,)))
        raise FileNotFoundError(f"--data {storage.redact(data)}: neither {here} nor {below} exists (give a split "
                                "folder made by the shard preparation, or its parent with --split)")
    same = root == storage.normalise(cfg.shards_path)
    cfg = config_from_dict(_deep_merge(asdict(cfg), {"data": {"shards_dir": str(root)}}))
    name = split if same else f"{storage.parent(root)[1]}_{split}"
    return cfg, split, re.sub(r"[^\w.\-]+", "_", name)


def _find_run(client, experiment: str, run_name: str | None):
    if not run_name:
        return None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`volvlp.run_name` = '{run_name}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def target_run(cfg: Config, ref: CheckpointRef, kind: str, params: dict[str, str] | None = None):
    """The MLflow run a downstream job of ``ref`` logs to: the training run it came from (found by run name), else
    a new run ``{kind}-{run}-{time}`` tagged ``volvlp.kind={kind}`` with ``params``. Returns (client, run_id,
    where, created)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from volvlp_ray.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(cfg))
    run = _find_run(client, cfg.tracking.experiment, ref.run_name)
    if run is not None:
        return client, run.info.run_id, "the training run", False
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run_name = f"{kind}-{ref.run_name or ref.export_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"volvlp.kind": kind, "volvlp.evaluated_run_name": ref.run_name or "unknown"}
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()])
    where = "a new run (training run not found" + (f" for run_name {ref.run_name!r})" if ref.run_name else ")")
    return client, run_id, where, True


def log_metrics_at(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Finite ``metrics`` at ``step``, in batches of 500 (MLflow's limit)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])


def _log_to_mlflow(cfg: Config, ref: CheckpointRef, metrics: dict[str, float], plots: list[str], json_path: str,
                   name: str) -> dict[str, str]:
    """Metrics, plots and the JSON report to the training run (if found) or a new run. Returns where."""
    params = {"checkpoint": str(ref.export_dir), "data": cfg.shards_path,
              **{f"eval.{k}": v for k, v in asdict(cfg.eval).items()}}
    client, run_id, where, created = target_run(cfg, ref, "evaluate", params)
    log_metrics_at(client, run_id, metrics, ref.step if ref.step is not None else cfg.train.steps)
    for p in plots:
        client.log_artifact(run_id, p, f"evaluate/{name}/plots")
    client.log_artifact(run_id, json_path, f"evaluate/{name}")
    client.set_tag(run_id, f"volvlp.evaluated.{name}", str(ref.export_dir)[:5000])
    if created:
        client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": client.tracking_uri, "run_id": run_id, "logged_to": where}


def _summary(report: dict[str, Any], prefix: str) -> str:
    lines = [f"[eval] {report['n']} volumes, {len(report['label_names'])} labels"]
    r = report["retrieval"]
    for d, title in (("t2v", "report->volume"), ("v2t", "volume->report")):
        parts = [f"R@{k} {r[f'{d}/recall_at_{k}']:.3f} (random {r[f'{d}/recall_at_{k}_random']:.3f})"
                 for k in report["ks"] if k < report["n"]]
        parts.append(f"MRR {r[f'{d}/mrr']:.3f} (random {r[f'{d}/mrr_random']:.3f})")
        parts.append(f"median rank {r[f'{d}/median_rank']:.0f} (random {r[f'{d}/median_rank_random']:.1f})")
        lines.append(f"[eval] {title}: " + "  ".join(parts))
    if report["ks_capped"]:
        lines.append(f"[eval] K >= N={report['n']} capped at N (uninformative): {report['ks_capped']}")
    v2v = report["v2v"]
    if "jaccard_random" in v2v:
        lines.append("[eval] volume->volume label Jaccard: " + "  ".join(
            f"@{k} {v2v[f'jaccard_at_{k}']:.3f}" for k in report["ks"] if k < report["n"])
            + f"  (random {v2v['jaccard_random']:.3f})")
    for name in ("zeroshot", "probe"):
        res = report[name]
        if "mean" not in res:
            lines.append(f"[eval] {name}: skipped ({res.get('skipped')})")
            continue
        m = res["mean"]
        lines.append(f"[eval] {name}: mean AUROC {m['auroc']:.3f} (95% CI {m['auroc_ci_low']:.3f}-"
                     f"{m['auroc_ci_high']:.3f}), weighted F1 {m['f1_weighted']:.3f}, accuracy {m['accuracy']:.3f}, "
                     f"precision {m['precision_weighted']:.3f} over {res['n_labels_evaluated']} labels "
                     f"({res['n_bootstrap']} bootstrap resamples)")
    lines.append(f"[eval] metrics are logged under {prefix}")
    return "\n".join(lines)


def _model_labels(run_cfg: Config) -> list[str]:
    """The labels the model was trained with: its run's training split's (manifest), else CT-RATE's 18."""
    from volvlp_ray.data.ctrate import LABELS
    from volvlp_ray.eval.run import label_names_of

    try:
        return label_names_of(run_cfg, "train")
    except (FileNotFoundError, OSError, ValueError):
        return list(LABELS)


def _organ_classification(model, cfg: Config, split: str, tokenizer_dir: str, n_bootstrap: int,
                          train_cfg: Config | None, plots_dir: str, prefix: str) -> dict[str, Any]:
    """Organ classification of z-chunks (``eval.organs``): the evaluated split's chunks, zero-shot and (when the
    probe has a training split) by a probe fitted on the training split's chunks; metrics, report, radar plot."""
    from volvlp_ray.eval.organs import (ORGAN_GROUPS, embed_organ_chunks, flatten_organ_metrics,
                                        organ_classification, organ_prompt_embeddings, plot_organ_radar)
    from volvlp_ray.eval.plots import save_figure

    if not cfg.eval.organs:
        return {"report": {"skipped": "eval.organs=false"}, "metrics": {}, "plots": []}
    e = cfg.eval
    chunks = embed_organ_chunks(model, cfg, split, tokenizer_dir, e.organ_max_volumes, progress=f"{split} split")
    if len(chunks["targets"]) == 0:
        note = "the shards hold no organ z-extents (no segmentation or organ-extents CSV at preparation)"
        console.info(f"[eval] organ classification skipped: {note}")
        return {"report": {"skipped": note}, "metrics": {}, "plots": []}
    train = None
    if train_cfg is not None:
        caps = [c for c in (e.organ_max_volumes, e.probe_train_volumes) if c > 0]
        train = embed_organ_chunks(model, train_cfg, "train", tokenizer_dir, min(caps) if caps else 0,
                                   progress="train split")
    prompts = organ_prompt_embeddings(model, ORGAN_GROUPS, e.organ_prompt, cfg.data.max_text_length)
    result = organ_classification(chunks, prompts, train=train, n_bootstrap=n_bootstrap, seed=cfg.seed)
    result["chunk_depth"] = int(chunks["chunk_depth"])
    result["n_without_extents"] = int(chunks["n_without_extents"])
    plots = []
    fig = plot_organ_radar(result)
    if fig is not None:
        plots.append(save_figure(fig, os.path.join(plots_dir, "organ_radar.png")))
    for kind in ("zeroshot", "probe"):
        res = result.get(kind, {})
        if "mean" in res:
            console.info(f"[eval] organ classification, {kind}: mean AP {res['mean']['ap']:.3f} (random "
                         f"{res['mean']['prevalence']:.3f}) over {len(res['evaluated'])} organs, "
                         f"{result['n_chunks']} chunks of {result['chunk_depth']} slices; "
                         + ", ".join(f"{g} {res['per_organ'][g]['ap']:.2f}" for g in res["evaluated"]))
    return {"report": result, "metrics": flatten_organ_metrics(result, prefix), "plots": plots}


def run_evaluation(
    checkpoint: str,
    data: str | None = None,
    split: str = "valid",
    out: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    mlflow: bool = True,
) -> dict[str, Any]:
    """The whole evaluate job (see the module docstring). Returns the JSON report as a dict."""
    import torch

    from volvlp_ray.eval.run import embed_split, evaluate_model, label_names_of
    from volvlp_ray.models import VLP

    t0 = time.time()
    overrides = list(overrides or [])
    pre, user = build_eval_config(None, config_file, overrides)  # the workspace that `latest` looks in
    # Ray's and the libraries' own records: to this file (the console only with --verbose)
    log_path = console.setup_logging(pre.workspace_path / "logs", f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    ref = resolve_checkpoint(checkpoint, pre.workspace_path)
    console.info(f"[eval] checkpoint: {ref.export_dir} ({ref.kind}; run {ref.run_name or 'unknown'}, "
                 f"step {ref.step if ref.step is not None else 'unknown'})")
    run_config = run_config_of(ref.export_dir)
    if run_config is None:
        console.warn("[eval] warning: the export has no run config: data options (HU window, text length) are the "
                     "defaults")
    cfg, user = build_eval_config(run_config, config_file, overrides)
    n_boot = cfg.eval.n_bootstrap if "n_bootstrap" in user.get("eval", {}) else DEFAULT_JOB_BOOTSTRAP
    run_cfg = cfg  # the run's own data (the probe's training split when the evaluated data has none)
    cfg, split, name = resolve_data(cfg, data, split)
    prefix = f"evaluate/{name}/"
    console.info(f"[eval] data: split {split!r} of {cfg.shards_path}; volumes embedded "
                 f"{'whole' if cfg.eval.volume_mode == 'whole' else f'in sliding chunks of {cfg.eval.chunk_depth} slices every {cfg.eval.chunk_stride}, {cfg.eval.chunk_pool}-pooled'}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = VLP.from_pretrained(ref.export_dir, map_location=device)
    tokenizer_dir = str(ref.export_dir / "tokenizer")
    train_emb = train_cfg = None
    probe_note = None
    if cfg.eval.probe:
        # the probe's training split: the evaluated data's own, else (an external set of one split) the run's
        for candidate in (cfg, run_cfg):
            train_split_dir = storage.child(storage.normalise(candidate.shards_path), "train")
            if storage.is_file(storage.child(train_split_dir, "manifest.json")):
                train_cfg = candidate
                break
        if split == "train" and train_cfg is cfg:
            probe_note, train_cfg = "the evaluated split is the training split", None
        elif train_cfg is not None:
            limit = cfg.eval.probe_train_volumes
            train_split_dir = storage.child(storage.normalise(train_cfg.shards_path), "train")
            console.info(f"[eval] linear probe: embedding {'all' if not limit else f'at most {limit}'} training "
                         f"volumes of {train_split_dir}")
            train_emb = embed_split(model, train_cfg, "train", tokenizer_dir, max_volumes=limit,
                                    progress="train split")
        else:
            probe_note = f"no training split at {storage.child(storage.normalise(cfg.shards_path), 'train')}"
    else:
        probe_note = "eval.probe=false"
    if probe_note:
        console.info(f"[eval] linear probe skipped: {probe_note}")
    model_labels = _model_labels(run_cfg)
    train_labels = label_names_of(train_cfg, "train") if train_cfg is not None else None

    with tempfile.TemporaryDirectory(prefix="volvlp-eval-") as tmp:
        plots_dir = os.path.join(tmp, "plots")
        res = evaluate_model(model, cfg, split, tokenizer_dir, plots_dir=plots_dir, n_bootstrap=n_boot,
                             train_emb=train_emb, prefix=prefix, progress=f"{split} split", labels=model_labels,
                             train_label_names=train_labels)
        report = res["report"]
        if probe_note:
            report["probe"] = {"skipped": probe_note}
        organ = _organ_classification(model, cfg, split, tokenizer_dir, n_boot, train_cfg=train_cfg,
                                      plots_dir=plots_dir, prefix=prefix)
        report["organ"] = organ["report"]
        res["metrics"].update(organ["metrics"])
        res["plots"].extend(organ["plots"])
        report = {
            "checkpoint": {"export_dir": str(ref.export_dir), "checkpoint_dir": str(ref.checkpoint_dir or ""),
                           "run_name": ref.run_name, "step": ref.step, "kind": ref.kind},
            "data": {"shards_dir": cfg.shards_path, "split": split, "name": name},
            "eval_config": asdict(cfg.eval) | {"n_bootstrap": n_boot},
            **report,
            "metrics": res["metrics"],
            "seconds": time.time() - t0,
        }
        console.info(_summary(report, prefix))
        json_path = os.path.join(tmp, "metrics.json")
        Path(json_path).write_text(_to_json(report))
        if mlflow:
            where = _log_to_mlflow(cfg, ref, res["metrics"], res["plots"], json_path, name)
            report["mlflow"] = where
            console.info(f"[eval] MLflow: {len(res['metrics'])} metrics and {len(res['plots'])} plots logged to "
                         f"{where['logged_to']} {where['run_id']} at {where['tracking_uri']}")
    if out:
        out_path = Path(out).expanduser().absolute()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(_to_json(report))
        console.info(f"[eval] JSON report: {out_path}")
    console.info(f"[eval] done in {time.time() - t0:.0f}s")
    zs = report.get("zeroshot", {}).get("mean", {})
    r = report["retrieval"]
    console.summary("evaluation done", [
        ("model", f"{ref.export_dir} (run {ref.run_name or 'unknown'}, step {ref.step if ref.step is not None else '?'})"),
        ("data", f"{name}: {report['n']} volumes"),
        ("retrieval", f"report->volume MRR {r['t2v/mrr']:.3f}, volume->report MRR {r['v2t/mrr']:.3f}"),
        ("zero-shot", f"mean AUROC {zs['auroc']:.3f} (95% CI {zs['auroc_ci_low']:.3f}-{zs['auroc_ci_high']:.3f})"
                      if zs else None),
        ("organs", ", ".join(f"{k} mean AP {report['organ'][k]['mean']['ap']:.3f}" for k in ("zeroshot", "probe")
                             if "mean" in report["organ"].get(k, {}))
                   + f" (random {report['organ']['zeroshot']['mean']['prevalence']:.3f})"
                   if "mean" in report.get("organ", {}).get("zeroshot", {}) else None),
        ("MLflow", f"{report['mlflow']['logged_to']} {report['mlflow']['run_id']}" if "mlflow" in report else None),
        ("JSON", str(Path(out).expanduser().absolute()) if out else None),
        ("logs", log_path),
    ])
    return report


def _plain(x: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, non-finite floats to None (strict JSON has no NaN)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _to_json(report: dict[str, Any]) -> str:
    return json.dumps(_plain(report), indent=1, allow_nan=False)
