"""The real entry point, end to end on a tiny config: what MLflow recorded, the checkpoint, the export."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_job(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), *args]
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop("RAY_ADDRESS", None)
    e.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
    if p.returncode != 0:
        print(p.stdout[-6000:], p.stderr[-6000:])
    return p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    p = run_job(f"workspace={ws}", "run_name=e2e", env={"VOLVLP_STEP_TRACE": str(ws / "trace")})
    assert p.returncode == 0
    return ws, p.stdout + p.stderr


def read_traces(trace_dir: Path, world: int = 2) -> list[list[dict]]:
    """Per step, both ranks' records (``VOLVLP_STEP_TRACE``: what each rank's vision tower got)."""
    import json

    per_rank = [[json.loads(line) for line in open(trace_dir / f"rank_{r}.jsonl")] for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1, [len(p) for p in per_rank]
    return [list(step) for step in zip(*per_rank)]


def assert_equal_work(steps: list[list[dict]], n_steps: int) -> set[int]:
    """Every step: the same vision tokens on every rank, no padding mask built, no attention call with a mask
    (the model's counter); returns the token counts seen."""
    assert [s[0]["step"] for s in steps] == list(range(1, n_steps + 1))
    seen = set()
    for s in steps:
        assert len({r["vision_tokens"] for r in s}) == 1, s
        assert len({tuple(r["shape"]) for r in s}) == 1, s
        assert not any(r["mask_built"] for r in s), s
        assert all(r["masked_attention_calls"] == 0 for r in s), s
        seen.add(s[0]["vision_tokens"])
    return seen


def test_job_logs_to_mlflow(tiny_run):
    from mlflow.tracking import MlflowClient

    ws, out = tiny_run
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'e2e'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == "6" and params["loss.kind"] == "sigmoid" and params["scaling.num_workers"] == "2"
    assert run.data.tags["sys.torch"] and run.data.tags["sys.ray"] and run.data.tags["sys.deepspeed"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert all(m.value == m.value and m.value > 0 for m in history)
    pair = client.get_metric_history(run.info.run_id, "train/pair_loss")  # the negation-pair loss is on by default
    assert [m.step for m in pair] == [2, 4, 6] and all(0 < m.value < 10 for m in pair)
    assert 0 < run.data.metrics["train/pair_coverage"] <= 1
    for key in ("eval/t2v/recall_at_1", "eval/t2v/recall_at_5", "eval/t2v/recall_at_10", "eval/zeroshot/mean/auroc",
                "eval/zeroshot/per_label/Cardiomegaly/auroc", "train/samples_per_s"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots"} <= artifacts
    assert run.data.tags["volvlp.model_uri"].startswith("models:/")
    assert "[eval] zero-shot mean AUROC" in out and "[train] step 6/6" in out


def test_checkpoint_and_export(tiny_run):
    import torch

    from volvlp_ray.models import VLP

    ws, _ = tiny_run
    run_dir = ws / "ray_results" / "e2e"
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2  # steps 3 and 6 (num_to_keep=2)
    last = ckpts[-1]
    shards = {p.name for p in (last / "ckpt").iterdir()}
    assert "mp_rank_00_model_states.pt" in shards
    assert sum(n.startswith("zero_pp_rank_") for n in shards) == 2  # one optimizer shard per worker
    state = torch.load(last / "ckpt" / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 6
    model = VLP.from_pretrained(last / "export")
    emb = model.embed_text(["Cardiomegaly is present.", "No pleural effusion."])
    assert emb.shape == (2, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_equal_vision_tokens_on_both_ranks_and_no_mask(tiny_run):
    """data.sampler=equal (the default), report mode, 2 real workers: step by step both ranks' vision towers
    process the same number of tokens and attention never receives a mask."""
    ws, _ = tiny_run
    steps = read_traces(ws / "trace")
    assert_equal_work(steps, 6)
    # the depth still varies between steps on this data (the first steps of a run are the same on every rerun)
    assert len({s[0]["shape"][2] for s in steps}) >= 2, [s[0]["shape"] for s in steps]


def test_no_report_text_reaches_mlflow(tiny_run):
    import csv

    ws, _ = tiny_run
    reports = ws / "data" / "synthetic" / "radiology_text_reports" / "train_reports.csv"
    findings = [r["Findings_EN"] for r in csv.DictReader(open(reports))]
    sentences = {s.strip() for f in findings for s in f.split(".") if len(s.strip()) > 25}
    db = sqlite3.connect(ws / "mlflow.db")
    blobs = []
    for table in ("params", "tags", "metrics", "runs"):
        blobs += [" ".join(map(str, row)) for row in db.execute(f"select * from {table}")]
    for path in (ws / "mlartifacts").rglob("*") if (ws / "mlartifacts").exists() else []:
        if path.is_file() and path.suffix in (".yaml", ".json", ".txt"):
            blobs.append(path.read_text(errors="ignore"))
    text = "\n".join(blobs)
    leaked = [s for s in sentences if s in text]
    assert not leaked, leaked[:3]


def test_second_run_reuses_data(tiny_run):
    ws, _ = tiny_run
    # (and trains on volumes normalised in Ray Data rather than on the device: not a shard option, shards reused)
    # organ mode (SigVLP chunks cut at batch time to the step's agreed length): equal tokens, no mask, lengths vary
    p = run_job(f"workspace={ws}", "run_name=e2e-again", "train.steps=6", "train.checkpoint_every=6",
                "eval.at_end=false", "data.normalise_in=loader", "data.volume_transport=object_store",
                "data.text_mode=organ", "data.chunk_depth=[8,40]", env={"VOLVLP_STEP_TRACE": str(ws / "trace-organ")})
    assert p.returncode == 0
    out = p.stdout + p.stderr
    assert "synthetic dataset already at" in out and "shards ready" in out and "tokenizer built" not in out
    seen = assert_equal_work(read_traces(ws / "trace-organ"), 6)
    assert len(seen) >= 2, seen


def test_swca_with_grad_cache_through_the_job(tmp_path):
    """SWCA (soft targets from label and spatial affinity) with embedding-gradient caching under DeepSpeed."""
    from mlflow.tracking import MlflowClient

    p = run_job(f"workspace={tmp_path}", "run_name=gc", "loss.kind=swca", "loss.alpha=0.5",
                "train.grad_cache_micro_batch=2", "loss.negation_pairs=0", "train.steps=2", "train.checkpoint_every=2", "train.log_every=1",
                "eval.at_end=false")
    assert p.returncode == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'gc'")
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)
    assert lrs[0] != lrs[1]  # one optimizer/scheduler step per global step, not per micro-batch


def test_run_model_and_one_call_embeddings(tiny_run):
    """The export is the run's MLflow model; the model embeds a report and a NIfTI file in one call each,
    and the NIfTI path gives the embedding of the training pipeline's own sample of that volume."""
    import tarfile

    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from mlflow.tracking import MlflowClient

    import volvlp_ray
    from volvlp_ray.data.ctrate import read_split
    from volvlp_ray.data.shards import decode_sample
    from volvlp_ray.data.transforms import normalise

    ws, _ = tiny_run
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("volvlp_ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'e2e'")
    logged = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(logged) == 1 and logged[0].name == "model"
    export = sorted(p for p in (ws / "ray_results" / "e2e").glob("checkpoint_*") if p.is_dir())[-1] / "export"
    model = volvlp_ray.VLP.from_pretrained(export)

    report = "The heart is enlarged. No pleural effusion."
    e_report = model.embed_report(report)
    assert e_report.shape == (128,)
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(run.data.tags["volvlp.model_uri"])
    out = pyfunc.predict(pd.DataFrame({"text": [report]}))
    np.testing.assert_allclose(np.asarray(out["text_embedding"][0]), e_report.numpy(), rtol=1e-5, atol=1e-6)

    records, _ = read_split(ws / "data" / "synthetic", "valid")
    rec = records[0]
    e_nifti = model.embed_nifti(rec.path, slope=rec.slope, intercept=rec.intercept)
    sample = None
    for tar in sorted((ws / "shards" / "valid").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        keys = {n.split(".", 1)[0] for n in members}
        for key in keys:
            row = {"__key__": key, **{n.split(".", 1)[1]: b for n, b in members.items() if n.split(".", 1)[0] == key}}
            if decode_sample(row)["meta"].get("source", "").endswith(rec.volume_name):
                sample = decode_sample(row)
    assert sample is not None, f"{rec.volume_name} not found in the valid shards"
    window = tuple(model.run_config["data"]["hu_window"])
    e_shard = model.embed_volume(normalise(sample["volume"], window))
    torch.testing.assert_close(e_nifti, e_shard, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        model.embed_report("  ")
