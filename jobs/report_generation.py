"""Train a radiology-report generator on a pre-trained ViT3D and score it (a Ray Train job).

    python jobs/report_generation.py --checkpoint latest                      # newest run in ./workspace
    python jobs/report_generation.py --checkpoint latest workspace=/mnt/volvlp report.steps=2000 --out rg.json
    python jobs/report_generation.py --checkpoint path/to/export --config configs/report_llm.yaml

Trains the generator of ``volvlp_ray/downstream/reports.py`` (the ViT3D's patch tokens pooled into a prefix of a
causal language model) on the training split, generates the held-out split's reports (greedy and beam search) and
scores them with ``volvlp_ray/eval/report_metrics.py`` (BLEU-1..4, METEOR, ROUGE-L, BERTScore, clinical-efficacy
P/R/F1 over the 18 CT-RATE findings, 95 % bootstrap intervals) beside two baselines scored the same way: the most
frequent training report, and the training report whose pre-trained text embedding is nearest to the volume's.
Logs metrics, plots and the generator to the pre-training run in MLflow (else to a new run); generated text only
with ``tracking.log_text=true``. Writes a JSON report (--out). Joins the Ray cluster at $RAY_ADDRESS when set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from volvlp_ray import console
from volvlp_ray.config import ConfigError, config_to_dict, with_absolute_paths

SYSTEMS_ORDER = ("greedy", "beam", "most_frequent", "retrieval")
HEADLINE = ("bleu_1", "bleu_4", "meteor", "rouge_l", "bertscore_f1")


def _flat_metrics(scores: dict) -> dict[str, float]:
    """``report_gen/<system>/<metric>`` (and ``.../ce_<avg>_<part>``, ``.../ce_f1/<label>``) for MLflow."""
    out: dict[str, float] = {}
    for system, s in scores.items():
        for k, v in s.items():
            if isinstance(v, dict) and "value" in v and v["value"] is not None:
                out[f"report_gen/{system}/{k}"] = v["value"]
        for k, v in s["ce"].items():
            if isinstance(v, dict) and "value" in v and v["value"] is not None:
                out[f"report_gen/{system}/ce_{k}"] = v["value"]
        for label, e in s["ce"]["per_label"].items():
            out[f"report_gen/{system}/ce_f1/{label.replace(' ', '_')}"] = e["f1"]
    return out


def _plots(scores: dict, folder: Path) -> list[str]:
    """Bars with 95 % intervals of the headline metrics per system, and per-finding clinical F1 per system."""
    import numpy as np

    from volvlp_ray.eval.plots import _figure

    systems = [s for s in SYSTEMS_ORDER if s in scores]
    metrics = [m for m in (*HEADLINE, "ce_macro_f1", "ce_micro_f1")
               if all((scores[s]["ce"].get(m[3:]) if m.startswith("ce_") else scores[s].get(m)) for s in systems)]
    fig = _figure(1.3 * len(metrics) + 2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / max(1, len(systems))
    for j, s in enumerate(systems):
        vals, lo, hi = [], [], []
        for m in metrics:
            e = scores[s]["ce"][m[3:]] if m.startswith("ce_") else scores[s][m]
            v = e["value"] if e["value"] is not None else np.nan
            ci = e["ci95"] or [v, v]
            vals.append(v)
            lo.append(max(0.0, v - ci[0]))
            hi.append(max(0.0, ci[1] - v))
        ax.bar(np.arange(len(metrics)) + (j - (len(systems) - 1) / 2) * w, vals, w, yerr=[lo, hi], capsize=2,
               label=s.replace("_", " "))
    ax.set_xticks(np.arange(len(metrics)), [m.replace("_", "-") for m in metrics], rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Generated reports vs baselines on the held-out split (95 % bootstrap intervals)", fontsize=9)
    ax.legend(fontsize=7)
    paths = [str(folder / "report_metrics.png")]
    fig.savefig(paths[0], dpi=110)

    labels = list(scores[systems[0]]["ce"]["per_label"])
    fig = _figure(10, 4)
    ax = fig.add_subplot(1, 1, 1)
    for j, s in enumerate(systems):
        ax.bar(np.arange(len(labels)) + (j - (len(systems) - 1) / 2) * w,
               [scores[s]["ce"]["per_label"][lab]["f1"] for lab in labels], w, label=s.replace("_", " "))
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("F1")
    ax.set_title(f"Clinical efficacy per finding (labels by {scores[systems[0]]['ce']['labeler']})", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(str(folder / "report_ce_per_label.png"))
    fig.savefig(paths[1], dpi=110)
    return paths


def _log_to_mlflow(cfg, ref, metrics: dict[str, float], files: list[str], generator_dir: Path,
                   generations: Path) -> dict[str, str]:
    """Metrics at the checkpoint's step, plots, the JSON report and the generator under ``report_generation/``;
    the generated and reference texts only with ``tracking.log_text``."""
    from volvlp_ray.eval.job import log_metrics_at, target_run

    client, run_id, where, created = target_run(cfg, ref, "report_generation", {"checkpoint": str(ref.export_dir)})
    log_metrics_at(client, run_id, metrics, ref.step if ref.step is not None else cfg.train.steps)
    for f in files:
        client.log_artifact(run_id, f, "report_generation")
    client.log_artifacts(run_id, str(generator_dir), "report_generation/generator")
    if cfg.tracking.log_text:
        client.log_artifact(run_id, str(generations), "report_generation")
    if created:
        client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": client.tracking_uri, "run_id": run_id, "logged_to": where}


def run_report_generation(checkpoint: str, config_file: str | None = None, overrides: list[str] | None = None,
                          out: str | None = None, mlflow: bool = True) -> dict:
    """The whole job; returns the JSON report as a dict."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from volvlp_ray.data.pipeline import read_corpus
    from volvlp_ray.downstream.reports import GENERATIONS, GENERATOR_DIR, decoder_tokenizer, tokenizer_to_spec, \
        train_dataset, train_loop_per_worker
    from volvlp_ray.eval.checkpoint import resolve_checkpoint, run_config_of
    from volvlp_ray.eval.job import build_eval_config
    from volvlp_ray.eval.report_metrics import score_systems
    from volvlp_ray.train.trainer import ensure_ray, runs_storage, worker_env

    t0 = time.time()
    overrides = list(overrides or [])
    pre, _ = build_eval_config(None, config_file, overrides)
    log_path = console.setup_logging(pre.workspace_path / "logs", f"report_generation-{time.strftime('%Y%m%d-%H%M%S')}")
    ref = resolve_checkpoint(checkpoint, pre.workspace_path)
    cfg = with_absolute_paths(build_eval_config(run_config_of(ref.export_dir), config_file, overrides)[0])
    r = cfg.report
    from volvlp_ray.data import storage
    from volvlp_ray.data.shards import read_manifest

    for split in ("train", "valid"):
        location = storage.child(storage.normalise(cfg.shards_path), split)
        try:
            manifest = read_manifest(location)
        except (FileNotFoundError, OSError):
            raise FileNotFoundError(f"no {split} shards at {storage.redact(location)} (pre-train in "
                                    f"workspace={cfg.workspace} first, or set data.shards_dir)") from None
        n = int(manifest.get("num_samples", 0))
        if split == "train" and n < r.batch_size * cfg.scaling.num_workers:
            raise ConfigError(f"the training split has {n} volumes: too few for report.batch_size={r.batch_size} on "
                              f"each of scaling.num_workers={cfg.scaling.num_workers} workers")
    console.info(f"[report] checkpoint: {ref.export_dir} (run {ref.run_name or 'unknown'}); decoder {r.decoder} "
                 f"({r.decoder_tuning}), encoder {r.encoder}, {r.steps} steps, {cfg.scaling.num_workers} workers")
    ensure_ray(cfg)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    t_corpus = time.time()
    corpus = read_corpus(cfg, "train")
    if not corpus:
        raise FileNotFoundError(f"the training shards at {cfg.shards_path}/train hold no reports")
    tokenizer = decoder_tokenizer(r.decoder, corpus, r.vocab_size)
    console.info(f"[report] {len(corpus)} training reports read ({time.time() - t_corpus:.0f}s); decoder "
                 f"vocabulary {len(tokenizer)} tokens")
    run_name = f"report_generation-{ref.run_name or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"
    env = worker_env(cfg)
    with console.Relay() as relay:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": config_to_dict(cfg), "export_dir": str(ref.export_dir), "console": relay.handle,
                "tokenizer": tokenizer_to_spec(tokenizer) if r.decoder.startswith("scratch-") else None,
                "train_reports": ray.put(corpus) if r.baselines else None,
            },
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo",
                                     timeout_s=cfg.train.timeout_s),
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(name=run_name, storage_path=runs_storage(cfg), worker_runtime_env=env,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=r.max_failures)),
            datasets={"train": train_dataset(cfg)},
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    folder = Path(result.checkpoint.path)
    rows = [json.loads(line) for line in (folder / GENERATIONS).read_text().splitlines() if line.strip()]
    run_info = json.loads((folder / "run.json").read_text())
    train_log = json.loads((folder / "train_log.json").read_text())
    refs = [row["reference"] for row in rows]
    systems = {s: [row[s] for row in rows] for s in SYSTEMS_ORDER if rows and s in rows[0]}
    console.info(f"[report] scoring {len(systems)} systems on {len(rows)} held-out reports "
                 f"({r.n_bootstrap} bootstrap resamples)")
    t_score = time.time()
    scores = score_systems(refs, systems, labeler=r.labeler, bertscore_model=r.bertscore_model,
                           bertscore_layers=r.bertscore_layers, n_bootstrap=r.n_bootstrap, seed=cfg.seed,
                           progress=lambda name: console.info(f"[report] scored {name} "
                                                              f"({time.time() - t_score:.0f}s)"))
    beats = {}
    for s in ("greedy", "beam"):
        if s in scores:
            beats[s] = {b: {m: (scores[s]["ce"][m]["value"] > scores[b]["ce"][m]["value"]) for m in ("macro_f1",
                                                                                                  "micro_f1")}
                        for b in ("most_frequent", "retrieval") if b in scores}
    report = {
        "checkpoint": {"export_dir": str(ref.export_dir), "run_name": ref.run_name, "step": ref.step},
        "n_eval": len(rows), "scores": scores, "beats_baselines_on_ce": beats, "train": run_info,
        "train_loss": train_log, "results_dir": str(folder), "shards_dir": cfg.shards_path,
        "config": config_to_dict(cfg)["report"], "seconds": None,
        "metric_libraries": {"bleu": "pycocoevalcap Bleu(4), corpus", "meteor": "pycocoevalcap Meteor 1.5 (Java)",
                             "rouge_l": "rouge-score rougeL F", "bertscore": "bert-score F1",
                             "ce": "scikit-learn precision_recall_fscore_support"},
    }
    files = _plots(scores, folder)
    report["seconds"] = time.time() - t0
    (folder / "report_generation.json").write_text(json.dumps(report, indent=1))
    if mlflow:
        report["mlflow"] = _log_to_mlflow(cfg, ref, _flat_metrics(scores), [*files, str(folder / "report_generation.json")],
                                          folder / GENERATOR_DIR, folder / GENERATIONS)
        (folder / "report_generation.json").write_text(json.dumps(report, indent=1))
    if out:
        Path(out).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "report_generation.json", Path(out).expanduser().absolute())

    def fmt(e) -> str:
        return "n/a" if e is None or e.get("value") is None else f"{e['value']:.3f}"

    lines = []
    for s, sc in scores.items():
        lines.append((s.replace("_", " "), " ".join(f"{m.replace('_', '-')} {fmt(sc.get(m))}" for m in HEADLINE
                                                     if m in sc) + f"; CE F1 macro {fmt(sc['ce']['macro_f1'])} "
                                                                   f"micro {fmt(sc['ce']['micro_f1'])}"))
    if "meteor" in next(iter(scores.values()), {}) and next(iter(scores.values()))["meteor"].get("unavailable"):
        lines.append(("METEOR", next(iter(scores.values()))["meteor"]["unavailable"]))
    verdict = []
    for s, by in beats.items():
        for b, m in by.items():
            verdict.append(f"{s} {'beats' if m['macro_f1'] else 'does not beat'} {b.replace('_', ' ')} (CE macro F1)")
    console.summary("report generation done", [
        *lines,
        ("verdict", "; ".join(verdict) or None),
        ("held-out", f"{len(rows)} volumes of {cfg.shards_path}/valid; training {run_info['steps']} steps, "
                     f"{run_info['train_seconds']:.0f} s on {run_info['world_size']} workers"),
        ("MLflow", f"{report['mlflow']['logged_to']} {report['mlflow']['run_id']}" if "mlflow" in report else None),
        ("JSON", str(Path(out).expanduser().absolute()) if out else str(folder / "report_generation.json")),
        ("generations", f"{folder / GENERATIONS} (local only{'' if not cfg.tracking.log_text else '; also MLflow'})"),
        ("time", f"{report['seconds']:.0f} s"),
        ("logs", log_path),
    ])
    return report


def main(argv: list[str] | None = None) -> int:
    from volvlp_ray.downstream.cli import downstream_main

    return downstream_main(argv, __doc__.splitlines()[0], run_report_generation, "report.steps=800 workspace=ws")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
