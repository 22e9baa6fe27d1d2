"""The real job, end to end on a tiny config: what MLflow recorded, the checkpoint, the export. Jobs run as
``jobs/pretrain.py`` runs them (``run_pretraining``), in the test process on the session's Ray (conftest's
``pretrain_job``); ``test_job_submit.py`` and ``test_fault_tolerance.py`` run the script itself."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(1800)  # real jobs; one or two in a test (the module fixture's among them)


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_workspace):
    """The session's trained tiny run (conftest: run name ``tiny``, both ranks' step trace in ``trace/``)."""
    ws, out = trained_tiny_workspace
    assert "shm_comm_op built" not in out  # CPU runs skip DeepSpeed's shared-memory comm op (train/deepspeed.py)
    return ws, out


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
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'tiny'")
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
    run_dir = ws / "ray_results" / "tiny"
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


def test_no_report_text_reaches_mlflow(tiny_run, report_texts, mlflow_text_leaks):
    """No report of the training or held-out split, whole or by sentence, is anywhere in the MLflow store: the
    database (every table, raw bytes) and every file of the artifact locations the MLflow client names (conftest's
    scan)."""
    ws, _ = tiny_run
    texts = report_texts(ws)
    assert len(texts) > 40
    leaked, scanned = mlflow_text_leaks(ws / "mlflow.db", texts)
    assert not leaked, list(leaked.items())[:3]
    # what the scan read: the run's config and plots, the logged model's config, weights and tokenizer
    names = {Path(s.split("!")[0]).name for s in scanned}
    assert {"config.yaml", "similarity_matrix.png", "vlp_config.json", "model.safetensors", "tokenizer.json",
            "MLmodel"} <= names, sorted(names)


def test_the_privacy_scan_finds_report_text_logged_on_purpose(tmp_path, tiny_workspace, report_texts,
                                                              mlflow_text_leaks):
    """The scan above can fail: on a scratch run that logs report sentences on purpose (the opt-ins
    tracking.log_text / tracking.log_volumes), it finds each one where it was put, a training sentence in a text
    artifact, held-out ones in a tag and inside a compressed zip artifact, one as the raw bytes of a .npy volume,
    and not a sentence that was never logged."""
    import zipfile

    import numpy as np
    from mlflow.tracking import MlflowClient

    from volvlp_ray.config import load_config
    from volvlp_ray.tracking import log_text_artifact, log_volume_artifact, resolve_tracking_uri, start_run

    picked: list[str] = []  # sentences none of which holds another (each found only where it was put)

    def pick(texts: set[str], n: int) -> list[str]:
        out = []
        for t in sorted(t for t in texts if "." not in t):
            if len(out) < n and all(t not in p and p not in t for p in picked):
                out.append(t)
                picked.append(t)
        assert len(out) == n, (n, out)
        return out

    train_texts = report_texts(tiny_workspace, splits=("train",))
    train = pick(train_texts, 3)
    valid = pick(report_texts(tiny_workspace, splits=("valid",)) - train_texts, 2)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={tmp_path}", "tracking.log_text=true",
                                                       "tracking.log_volumes=true"])
    run_id = start_run(cfg, "leak")
    client = MlflowClient(resolve_tracking_uri(cfg))
    log_text_artifact(cfg, run_id, f"Findings: {train[0]}. Other text.", "reports/one.txt")
    client.set_tag(run_id, "note", f"{valid[0]}.")
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("inner/report.txt", f"{valid[1]}. " * 20)
    assert valid[1].encode() not in (tmp_path / "bundle.zip").read_bytes()  # compressed: only inside the zip
    client.log_artifact(run_id, str(tmp_path / "bundle.zip"), "bundles")
    log_volume_artifact(cfg, run_id, np.frombuffer(train[1].encode(), dtype=np.uint8), "volumes/v.npy")

    leaked, _ = mlflow_text_leaks(tmp_path / "mlflow.db", [*train[:3], *valid[:2]])
    where = {s: [Path(w).name for w in ws] for s, ws in leaked.items()}
    assert set(leaked) == {train[0], train[1], valid[0], valid[1]}, where  # train[2] was never logged
    assert "one.txt" in where[train[0]] and "v.npy" in where[train[1]], where
    assert any(w.startswith("mlflow.db:tags") for w in leaked[valid[0]]), leaked[valid[0]]
    assert "bundle.zip!inner" in str(leaked[valid[1]]), leaked[valid[1]]


def test_second_run_reuses_data(tmp_path, copy_tiny_workspace, pretrain_job):
    ws = copy_tiny_workspace(tmp_path / "ws")  # not the shared trained one: its latest checkpoint stays the run's
    # (and trains on volumes normalised in Ray Data rather than on the device: not a shard option, shards reused)
    # organ mode (SigVLP chunks cut at batch time to the step's agreed length): equal tokens, no mask, lengths vary
    out = pretrain_job(f"workspace={ws}", "run_name=e2e-again", "train.steps=6", "train.checkpoint_every=6",
                       "eval.at_end=false", "data.normalise_in=loader", "data.volume_transport=object_store",
                       "data.text_mode=organ", "data.chunk_depth=[8,40]",
                       env={"VOLVLP_STEP_TRACE": str(ws / "trace-organ")}).ok().output
    assert "synthetic dataset already at" in out and "shards ready" in out and "tokenizer built" not in out
    seen = assert_equal_work(read_traces(ws / "trace-organ"), 6)
    assert len(seen) >= 2, seen


def test_swca_with_grad_cache_through_the_job(tmp_path, copy_tiny_workspace, pretrain_job):
    """SWCA (soft targets from label and spatial affinity) with embedding-gradient caching under DeepSpeed:
    the same job without caching is the reference. Grad-cache is exact, so the two runs log the same loss at every
    step (step 1: the full-batch loss from micro-batch embeddings; later steps: after the same updates) and end with
    the same weights; and the cached run went through DeepSpeed's accumulation, two micro-batches of 2 per step
    of 4, with one optimizer step per training step. Without model.proj_norm: its BatchNorm normalises each
    micro-batch by that micro-batch's statistics (and updates the running statistics in both the no-grad pass and
    the replay), so with it the cached step is not the full-batch step."""
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    ws = copy_tiny_workspace(tmp_path / "ws")
    common = ["loss.kind=swca", "loss.alpha=0.5", "loss.negation_pairs=0", "model.proj_norm=false", "train.steps=3",
              "train.checkpoint_every=3", "train.log_every=1", "eval.at_end=false"]
    for name, extra in (("gc", ["train.grad_cache_micro_batch=2"]), ("full", [])):
        pretrain_job(f"workspace={ws}", f"run_name={name}", *common, *extra).ok()
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    curves, states = {}, {}
    for name in ("gc", "full"):
        (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`volvlp.run_name` = '{name}'")
        curves[name] = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                        for key in ("train/loss", "train/lr")}
        (ckpt,) = [c for c in (ws / "ray_results" / name).glob("checkpoint_*") if c.is_dir()]
        states[name] = torch.load(ckpt / "ckpt" / "mp_rank_00_model_states.pt", weights_only=True,
                                  map_location="cpu")
    gc, full = states["gc"], states["full"]
    assert (gc["ds_config"]["train_micro_batch_size_per_gpu"], gc["ds_config"]["gradient_accumulation_steps"]) == (2, 2)
    assert (full["ds_config"]["train_micro_batch_size_per_gpu"], full["ds_config"]["gradient_accumulation_steps"]) \
        == (4, 1)
    # 3 optimizer steps in both: with accumulation over 2, the cached run called engine.step() twice per step
    assert gc["global_steps"] == full["global_steps"] == gc["step"] == 3, (gc["global_steps"], full["global_steps"])
    assert curves["gc"]["train/lr"] == curves["full"]["train/lr"]
    assert any(lr > 0 for _, lr in curves["full"]["train/lr"][:2]), curves["full"]["train/lr"]  # updates happened
    steps = [s for s, _ in curves["gc"]["train/loss"]]
    assert steps == [s for s, _ in curves["full"]["train/loss"]] == [1, 2, 3]
    loss_gc = np.array([v for _, v in curves["gc"]["train/loss"]])
    loss_full = np.array([v for _, v in curves["full"]["train/loss"]])
    print(f"\nloss with grad-cache {loss_gc}, without {loss_full}")
    np.testing.assert_allclose(loss_gc, loss_full, rtol=1e-4, atol=1e-5)
    assert gc["module"].keys() == full["module"].keys()
    diff = 0.0
    for k, v in full["module"].items():
        diff = max(diff, float((gc["module"][k].float() - v.float()).abs().max()))
    print(f"max |weight difference| after 3 steps: {diff:.3g}")
    assert diff < 1e-4, diff


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
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'tiny'")
    logged = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(logged) == 1 and logged[0].name == "model"
    export = sorted(p for p in (ws / "ray_results" / "tiny").glob("checkpoint_*") if p.is_dir())[-1] / "export"
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
