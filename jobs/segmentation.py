"""Train and evaluate organ segmentation heads on a pre-trained ViT3D (a Ray Train job).

    python jobs/segmentation.py --checkpoint latest                          # newest run in ./workspace
    python jobs/segmentation.py --checkpoint latest workspace=/mnt/volvlp segmentation.encoder=tuned --out seg.json
    python jobs/segmentation.py --checkpoint path/to/export segmentation.heads=[unetr] segmentation.steps=2000

For each head (a linear probe per patch, a UNETR-style decoder) and each encoder (the pre-trained one and a randomly
initialised one), trains on the training split's organ label maps and reports the Dice per organ on held-out
volumes (sliding-window inference), with overlay pictures. Logs to the pre-training run in MLflow (else to a new
run), writes a JSON report (--out). Joins the Ray cluster at $RAY_ADDRESS when set. See
``volvlp_ray/downstream/segmentation.py``.
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


def _label_map_problem(cfg) -> str | None:
    from volvlp_ray.data import storage
    from volvlp_ray.data.shards import read_manifest

    for split in ("train", "valid"):
        location = storage.child(storage.normalise(cfg.shards_path), split)
        try:
            manifest = read_manifest(location)
        except (FileNotFoundError, OSError):
            return f"no shards at {storage.redact(location)} (pre-train in workspace={cfg.workspace} first)"
        with_maps = sum(n for k, n in manifest.get("labelmaps_from", {}).items() if k != "none")
        if not with_maps:
            return (f"the {split} shards at {storage.redact(location)} hold no organ label maps (made before label "
                    "maps existed, with data.label_maps=none, or from a source without labelmaps/ or segmentations/): "
                    "rebuild them with jobs/prepare_data.py")
    return None


def _log_to_mlflow(cfg, ref, metrics: dict[str, float], files: list[str]) -> dict[str, str]:
    """Metrics at the checkpoint's step and the files under ``segmentation/``, to the pre-training run (else a new
    run tagged ``volvlp.kind=segmentation``)."""
    from volvlp_ray.eval.job import log_metrics_at, target_run

    client, run_id, where, created = target_run(cfg, ref, "segmentation", {"checkpoint": str(ref.export_dir)})
    log_metrics_at(client, run_id, metrics, ref.step if ref.step is not None else cfg.train.steps)
    for f in files:
        client.log_artifact(run_id, f, "segmentation")
    if created:
        client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": client.tracking_uri, "run_id": run_id, "logged_to": where}


def run_segmentation(checkpoint: str, config_file: str | None = None, overrides: list[str] | None = None,
                     out: str | None = None, mlflow: bool = True) -> dict:
    """The whole job; returns the JSON report as a dict."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from volvlp_ray.downstream.segmentation import train_dataset, train_loop_per_worker
    from volvlp_ray.eval.checkpoint import resolve_checkpoint, run_config_of
    from volvlp_ray.eval.job import build_eval_config
    from volvlp_ray.train.trainer import ensure_ray, runs_storage, worker_env

    t0 = time.time()
    overrides = list(overrides or [])
    pre, _ = build_eval_config(None, config_file, overrides)
    log_path = console.setup_logging(pre.workspace_path / "logs", f"segmentation-{time.strftime('%Y%m%d-%H%M%S')}")
    ref = resolve_checkpoint(checkpoint, pre.workspace_path)
    # absolute local paths: rank 0 reads the held-out shards from Ray's working directory
    cfg = with_absolute_paths(build_eval_config(run_config_of(ref.export_dir), config_file, overrides)[0])
    s = cfg.segmentation
    if any(c % p for c, p in zip(s.crop, cfg.model.patch)):
        raise ConfigError(f"segmentation.crop={s.crop} must be a multiple of the model's patch {cfg.model.patch}")
    problem = _label_map_problem(cfg)
    if problem:
        raise FileNotFoundError(problem)
    console.info(f"[seg] checkpoint: {ref.export_dir} (run {ref.run_name or 'unknown'}); heads {s.heads}, encoders "
                 f"pre-trained{' and random' if s.random_baseline else ''} ({'tuned' if s.encoder == 'tuned' else 'frozen'}"
                 f" for unetr), {s.steps} steps each, crops {s.crop}, {cfg.scaling.num_workers} workers")
    ensure_ray(cfg)
    run_name = f"segmentation-{ref.run_name or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"
    env = worker_env(cfg)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    with console.Relay() as relay:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config_to_dict(cfg), "export_dir": str(ref.export_dir),
                               "console": relay.handle},
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(name=run_name, storage_path=runs_storage(cfg), worker_runtime_env=env),
            datasets={"train": train_dataset(cfg, cfg.seed)},
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    folder = Path(result.checkpoint.path)
    report = json.loads((folder / "segmentation.json").read_text())
    report.update(checkpoint={"export_dir": str(ref.export_dir), "run_name": ref.run_name, "step": ref.step},
                  results_dir=str(folder), seconds=time.time() - t0, shards_dir=cfg.shards_path,
                  config=config_to_dict(cfg)["segmentation"])
    files = sorted(str(p) for p in folder.glob("overlay_*.png"))
    (folder / "segmentation.json").write_text(json.dumps(report, indent=1))
    if mlflow:
        report["mlflow"] = _log_to_mlflow(cfg, ref, result.metrics, [*files, str(folder / "segmentation.json")])
    if out:
        Path(out).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "segmentation.json", Path(out).expanduser().absolute())
    rows = []
    for name, e in report["variants"].items():
        per = ", ".join(f"{c} {v:.2f}" for c, v in e["dice"].items() if v is not None)
        rows.append((name, f"mean Dice {e['dice_mean']:.3f} ({per}); {e['train_seconds']:.0f} s training"))
    console.summary("segmentation done", [
        *rows,
        ("held-out", f"{report['n_eval']} volumes of {cfg.shards_path}/valid, sliding window {s.crop}"),
        ("overlays", ", ".join(files) or None),
        ("MLflow", f"{report['mlflow']['logged_to']} {report['mlflow']['run_id']}" if "mlflow" in report else None),
        ("JSON", str(Path(out).expanduser().absolute()) if out else str(folder / "segmentation.json")),
        ("time", f"{report['seconds']:.0f} s"),
        ("logs", log_path),
    ])
    return report


def main(argv: list[str] | None = None) -> int:
    from volvlp_ray.downstream.cli import downstream_main

    return downstream_main(argv, __doc__.splitlines()[0], run_segmentation, "segmentation.steps=300 workspace=ws")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
