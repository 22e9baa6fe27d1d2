"""jobs/evaluate.py end to end on a tiny trained workspace, and the Validator used during pre-training.

One tiny pre-training run (configs/tiny.yaml: 6 steps, checkpoints at steps 3 and 6, only the last with export/)
serves every test. The evaluate job runs as a real subprocess for `--checkpoint latest` and for the error path;
the export-folder and Ray-Train-checkpoint forms run in-process through the same `run_evaluation` (sharing this
process's Ray instance saves two Ray start-ups).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(1800)  # the module fixture is a real training job, then the evaluate job


def run_script(script: str, *args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=cwd)
    if p.returncode not in (0, 2):
        print(p.stdout[-6000:], p.stderr[-6000:])
    return p


@pytest.fixture(scope="module")
def workspace(trained_tiny_workspace) -> Path:
    ws, out = trained_tiny_workspace  # the session's trained tiny run (conftest), run name "tiny"
    assert "[eval] zero-shot mean AUROC" in out  # the training-end evaluation (volvlp_ray.eval.run) ran
    return ws


def _checkpoints(ws: Path) -> list[Path]:
    return sorted(p for p in (ws / "ray_results" / "tiny").glob("checkpoint_*") if p.is_dir())


def _training_run(ws: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'tiny'")
    return client, run


@pytest.fixture(scope="module")
def latest(workspace):
    out = workspace / "eval-latest.json"
    p = run_script("evaluate.py", "--checkpoint", "latest", "--out", str(out), f"workspace={workspace}",
                   cwd=workspace)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text(), parse_constant=_no_nan), p.stdout


def _no_nan(token: str):
    raise AssertionError(f"the JSON report is not strict JSON: {token}")


def test_latest_checkpoint_report(workspace, latest) -> None:
    report, stdout = latest
    ckpts = _checkpoints(workspace)
    assert report["checkpoint"]["kind"] == "latest" and report["checkpoint"]["run_name"] == "tiny"
    assert report["checkpoint"]["export_dir"] == str(ckpts[-1] / "export") and report["checkpoint"]["step"] == 6
    assert report["data"] == {"shards_dir": str(workspace / "shards"), "split": "valid", "name": "valid"}
    assert report["n"] == 8 and report["n_bootstrap"] == 1000  # the job's default: CT-CLIP's 1000 resamples
    assert report["ks"] == [1, 5, 10, 50, 100] and report["ks_capped"] == [10, 50, 100]
    r = report["retrieval"]
    for d in ("t2v", "v2t"):
        for k in (1, 5, 10, 50, 100):
            assert 0 <= r[f"{d}/recall_at_{k}"] <= 1 and f"{d}/recall_at_{k}_random" in r
        assert r[f"{d}/recall_at_1_random"] == pytest.approx(1 / 8) and r[f"{d}/recall_at_100"] == 1.0
        assert r[f"{d}/mrr_random"] == pytest.approx(sum(1 / i for i in range(1, 9)) / 8)
        assert 1 <= r[f"{d}/median_rank"] <= 8 and r[f"{d}/median_rank_random"] == 4.5
    assert 0 <= report["v2v"]["jaccard_at_1"] <= 1 and 0 < report["v2v"]["jaccard_random"] <= 1
    zs = report["zeroshot"]
    assert zs["n_bootstrap"] == 1000 and zs["n_labels"] == 18 and zs["n_labels_evaluated"] >= 1
    for label, entry in zs["per_label"].items():
        if label in zs["skipped"]:
            assert entry["auroc"] is None  # NaN becomes null in the JSON
            continue
        for m in ("auroc", "f1_weighted", "accuracy", "precision_weighted"):
            assert entry[f"{m}_ci_low"] <= entry[m] <= entry[f"{m}_ci_high"]
        assert entry["threshold"] is not None
    probe = report["probe"]
    assert probe["n_train"] == 16 and probe["n_labels_evaluated"] >= 1 and 0 <= probe["mean"]["auroc"] <= 1
    organ = report["organ"]  # organ classification of z-chunks (volvlp_ray.eval.organs)
    assert organ["n_volumes"] == 8 and organ["n_chunks"] >= 16 and organ["n_without_extents"] == 0
    for kind in ("zeroshot", "probe"):
        res = organ[kind]
        assert set(res["evaluated"]) | set(res["skipped"]) == set(organ["groups"]) and len(res["evaluated"]) >= 3
        for g in res["evaluated"]:
            e = res["per_organ"][g]
            assert 0 < e["prevalence"] < 1 and e["ap_ci_low"] <= e["ap"] <= e["ap_ci_high"]
        assert res["mean"]["ap"] == pytest.approx(np.mean([res["per_organ"][g]["ap"] for g in res["evaluated"]]))
    assert organ["probe"]["n_train_chunks"] >= 32
    for line in ("[eval] checkpoint:", "[eval] linear probe: embedding all training volumes",
                 "[eval] valid split: embedded 8/8 volumes", "[eval] report->volume: R@1",
                 "[eval] zeroshot: mean AUROC", "[eval] organ classification, zeroshot: mean AP",
                 "[eval] organ classification, probe: mean AP", "logged to the training run", "[eval] JSON report:"):
        assert line in stdout, line


def test_latest_checkpoint_logs_to_the_training_run(workspace, latest) -> None:
    report, _ = latest
    client, run = _training_run(workspace)
    assert report["mlflow"]["run_id"] == run.info.run_id
    metrics = run.data.metrics
    assert metrics["evaluate/valid/t2v/recall_at_1"] == report["retrieval"]["t2v/recall_at_1"]
    assert metrics["evaluate/valid/zeroshot/mean/auroc"] == pytest.approx(report["zeroshot"]["mean"]["auroc"])
    assert "evaluate/valid/probe/mean/auroc" in metrics and "evaluate/valid/v2v/jaccard_at_1" in metrics
    history = client.get_metric_history(run.info.run_id, "evaluate/valid/t2v/mrr")
    assert [m.step for m in history] == [6]  # at the checkpoint's step
    # the same model on the same split: the training-end evaluation found the same retrieval
    assert metrics["eval/t2v/recall_at_1"] == metrics["evaluate/valid/t2v/recall_at_1"]
    assert metrics["eval/v2t/mrr"] == pytest.approx(metrics["evaluate/valid/v2t/mrr"])
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluate/valid/plots")}
    assert {"recall_at_k.png", "auroc_zeroshot.png", "auroc_probe.png", "similarity_matrix.png",
            "projection_volume_n_abnormalities.png", "organ_radar.png"} <= plots
    assert metrics["evaluate/valid/organ/zeroshot/mean/ap"] == pytest.approx(report["organ"]["zeroshot"]["mean"]["ap"])
    assert "evaluate/valid/organ/probe/heart/ap_ci_high" in metrics
    assert "evaluate/valid/metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id, "evaluate/valid")}


def test_no_report_text_reaches_mlflow(workspace, latest, report_texts, mlflow_text_leaks) -> None:
    """After training and the evaluate job (which logs into the training run), no report of either split, whole or
    by sentence, is anywhere in the MLflow store: every table and the raw bytes of the database, every file under
    the artifact locations the MLflow client gives (conftest's scan; tests/test_pretrain_e2e.py shows it can fail)."""
    texts = report_texts(workspace)
    assert len(texts) > 40
    leaked, scanned = mlflow_text_leaks(workspace / "mlflow.db", texts)
    assert not leaked, list(leaked.items())[:3]
    # the scan read what the evaluate job logged: its JSON report and plots
    assert any(s.endswith("evaluate/valid/metrics.json") for s in scanned), scanned
    assert any(s.endswith("evaluate/valid/plots/similarity_matrix.png") for s in scanned), scanned


def test_deepspeed_only_checkpoint_is_refused_clearly(workspace) -> None:
    first = _checkpoints(workspace)[0]  # step 3: DeepSpeed shards, no export
    # overrides may follow the flags (parse_intermixed_args): the error is about the checkpoint, not the arguments
    p = run_script("evaluate.py", "eval.probe=false", "--checkpoint", str(first), "--no-mlflow", "eval.ks=[1]",
                   cwd=workspace)
    assert p.returncode == 2
    assert "DeepSpeed shards only" in p.stderr and str(_checkpoints(workspace)[-1]) in p.stderr
    assert "Traceback" not in p.stderr


def test_ray_checkpoint_with_data_folder_and_sliding_chunks(workspace, ray_session, tmp_path) -> None:
    from volvlp_ray.eval.job import run_evaluation

    last = _checkpoints(workspace)[-1]
    out = tmp_path / "sliding.json"
    report = run_evaluation(str(last), data=str(workspace / "shards" / "valid"), out=str(out), mlflow=False,
                            overrides=["eval.volume_mode=sliding", "eval.chunk_depth=8", "eval.chunk_stride=4",
                                       "eval.chunk_pool=max", "eval.probe=false", "eval.n_bootstrap=0"])
    assert report["checkpoint"]["kind"] == "ray_checkpoint" and report["checkpoint"]["run_name"] == "tiny"
    assert report["eval_config"]["volume_mode"] == "sliding" and report["n_bootstrap"] == 0
    assert report["probe"] == {"skipped": "eval.probe=false"} and "mlflow" not in report
    saved = json.loads(out.read_text(), parse_constant=_no_nan)
    assert saved["retrieval"] == pytest.approx(report["retrieval"])
    assert saved["zeroshot"]["mean"]["auroc_ci_low"] is None  # no bootstrap: no CI (NaN -> null)


def test_export_folder_outside_the_workspace_logs_a_new_run(workspace, latest, ray_session, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from volvlp_ray.eval.job import run_evaluation

    # e.g. the MLflow `model` artifact of a run started without run_name=… (the config then has none), downloaded:
    # neither its config nor a run folder around it names the run
    export = tmp_path / "model"
    shutil.copytree(_checkpoints(workspace)[-1] / "export", export)
    spec = json.loads((export / "vlp_config.json").read_text())
    spec["run_config"]["run_name"] = None
    (export / "vlp_config.json").write_text(json.dumps(spec))
    report = run_evaluation(str(export), overrides=["eval.n_bootstrap=10"])
    assert report["checkpoint"]["kind"] == "export" and report["checkpoint"]["run_name"] is None
    assert report["mlflow"]["logged_to"].startswith("a new run")
    # the run's own config (in the export) still points at its workspace's shards and MLflow database
    assert report["data"]["shards_dir"] == str(workspace / "shards")
    assert report["retrieval"] == pytest.approx(latest[0]["retrieval"])  # same model, same data
    run = MlflowClient(report["mlflow"]["tracking_uri"]).get_run(report["mlflow"]["run_id"])
    assert run.data.tags["volvlp.kind"] == "evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics["evaluate/valid/t2v/recall_at_1"] == report["retrieval"]["t2v/recall_at_1"]


def test_validator(workspace, latest, ray_session) -> None:
    from volvlp_ray.config import config_from_dict
    from volvlp_ray.eval.checkpoint import run_config_of
    from volvlp_ray.eval.validation import Validator
    from volvlp_ray.models import VLP

    export = _checkpoints(workspace)[-1] / "export"
    cfg = config_from_dict(run_config_of(export))
    model = VLP.from_pretrained(export).train()
    validator = Validator(cfg, str(export / "tokenizer"), max_volumes=100)  # more than the split has: all 8
    assert len(validator) == 8
    m = validator.run(model)
    assert model.training  # mode restored
    report = latest[0]
    # all 8 held-out volumes: the same numbers as the evaluate job (point estimates; no bootstrap here)
    for key in ("t2v/recall_at_1", "t2v/recall_at_5", "v2t/recall_at_1", "t2v/mrr", "v2t/median_rank"):
        assert m[f"val/{key}"] == pytest.approx(report["retrieval"][key]), key
    assert m["val/zeroshot/mean/auroc"] == pytest.approx(report["zeroshot"]["mean"]["auroc"])
    assert "val/t2v/recall_at_10" not in m  # K >= N is left out of validation metrics
    assert m["val/n"] == 8 and m["val/seconds"] < 60

    again = validator.run(model.eval())
    assert not model.training and {k: v for k, v in again.items() if k != "val/seconds"} == \
        {k: v for k, v in m.items() if k != "val/seconds"}

    small = Validator(cfg, str(export / "tokenizer"), max_volumes=4)  # a fixed subset: the first 4 in shard order
    assert len(small) == 4 and set(small.keys) < set(validator.keys)
    assert small.keys == Validator(cfg, str(export / "tokenizer"), max_volumes=4).keys
    assert small.run(model)["val/n"] == 4
    with pytest.raises(ValueError, match="at least 2"):
        Validator(cfg, str(export / "tokenizer"), max_volumes=1)


def test_organ_chunks_are_the_model_on_the_chunks_cut_by_hand(workspace, latest) -> None:
    """``embed_organ_chunks``: every chunk's embedding is ``encode_image`` of those slices of the volume as the
    shard holds them (read here with the shard reader, normalised by hand), its z-range follows the stored origin
    and spacing, and its targets the stored organ extents under the overlap rule."""
    import torch

    from volvlp_ray.config import config_from_dict
    from volvlp_ray.data.reader import iter_samples
    from volvlp_ray.data.shards import decode_sample
    from volvlp_ray.eval.checkpoint import run_config_of
    from volvlp_ray.eval.organs import ORGAN_GROUPS, chunk_targets, embed_organ_chunks
    from volvlp_ray.models import VLP

    export = _checkpoints(workspace)[-1] / "export"
    cfg = config_from_dict(run_config_of(export))
    model = VLP.from_pretrained(export)
    chunks = embed_organ_chunks(model, cfg, "valid", str(export / "tokenizer"), max_volumes=3)
    assert len(chunks["keys"]) == 3 and chunks["emb"].shape[0] == len(chunks["targets"]) == len(chunks["volume"])
    samples = {}
    for tar in sorted((workspace / "shards" / "valid").glob("*.tar")):
        with open(tar, "rb") as f:
            for raw in iter_samples(f, str(tar)):
                s = decode_sample(raw)
                samples[s["key"]] = s
    cd, pz, lo, hi = chunks["chunk_depth"], cfg.model.patch[0], *cfg.data.hu_window
    for v, key in enumerate(chunks["keys"]):
        s = samples[str(key)]
        vol, meta = s["volume"], s["meta"]
        z0, sz = meta["z_origin_mm"], meta["spacing"][0]
        rows = np.flatnonzero(chunks["volume"] == v)
        assert len(rows) >= 2
        for c in rows:
            a, b = chunks["z_range_mm"][c]
            start = int(round((a - z0) / sz + 0.5))
            n = int(round((b - a) / sz))
            assert n == min(cd, vol.shape[0] // pz * pz) and 0 <= start and start + n <= vol.shape[0]
            x = np.clip((vol[start:start + n].astype(np.float32) - (lo + hi) / 2) / ((hi - lo) / 2), -1, 1)
            with torch.no_grad():
                ref = model.encode_image(torch.from_numpy(x)[None, None], None)[0].numpy()
            np.testing.assert_allclose(chunks["emb"][c], ref, atol=1e-5)
            assert chunks["targets"][c].tolist() == chunk_targets(meta["organs"], (a, b),
                                                                  cfg.eval.organ_min_overlap).tolist()
        assert chunks["z_range_mm"][rows[-1]][1] == pytest.approx(z0 + (vol.shape[0] - 0.5) * sz)  # to the last slice
    assert set(np.unique(chunks["targets"])) <= {0, 1} and chunks["targets"].shape[1] == len(ORGAN_GROUPS)


def test_external_set_is_evaluated_over_the_shared_labels(workspace, latest, ray_session, tmp_path) -> None:
    """An external set (one split, labels of its own: 3 of CT-RATE's and "Pneumothorax"), prepared with the run's
    grid and evaluated with ``--data``: retrieval, zero-shot over the 3 labels it shares with the model (the 4th
    listed as not shared), the probe fitted on the run's own training split, organ classification; the shared
    labels' figures are those of the same embeddings evaluated without the restriction."""
    from test_external_sets import external_set

    from volvlp_ray.config import config_from_dict
    from volvlp_ray.data.prepare import prepare_shards
    from volvlp_ray.eval.checkpoint import run_config_of
    from volvlp_ray.eval.job import resolve_data, run_evaluation
    from volvlp_ray.eval.run import evaluate_model
    from volvlp_ray.models import VLP

    export = _checkpoints(workspace)[-1] / "export"
    cfg = config_from_dict(run_config_of(export))
    src = external_set(tmp_path / "ext", n=6)
    prepare_shards(str(src), str(tmp_path / "ext_shards"), cfg, progress=False)
    assert not (tmp_path / "ext_shards" / "train").exists()
    report = run_evaluation(str(export), data=str(tmp_path / "ext_shards"), mlflow=False,
                            overrides=["eval.n_bootstrap=50"])
    assert report["data"]["name"] == "ext_shards_valid" and report["n"] == 6
    assert report["label_names"] == ["Cardiomegaly", "Emphysema", "Lung nodule"]
    assert report["labels_not_shared"] == ["Pneumothorax"] and report["zeroshot"]["n_labels"] == 3
    assert report["probe"]["n_train"] == 16  # the run's training split (the external set has none)
    assert report["organ"]["n_volumes"] == 6 and report["organ"]["probe"]["n_train_chunks"] >= 32
    assert "t2v/recall_at_1" in report["retrieval"]
    ext_cfg, split, _ = resolve_data(cfg, str(tmp_path / "ext_shards"), "valid")
    unrestricted = evaluate_model(VLP.from_pretrained(export), ext_cfg, split, str(export / "tokenizer"),
                                  n_bootstrap=0)
    assert unrestricted["report"]["label_names"][-1] == "Pneumothorax"
    for label in report["label_names"]:
        assert report["zeroshot"]["per_label"][label]["auroc"] == \
            pytest.approx(unrestricted["zeroshot"]["per_label"][label]["auroc"], nan_ok=True)


def test_segmentation_job(workspace, latest, ray_session, tmp_path) -> None:
    """``jobs/segmentation.py`` (in this process, on the session's Ray): both heads on the pre-trained and on a
    random encoder, a Dice per organ present in the held-out label maps, overlays, the JSON report and the same
    figures in the training run's MLflow metrics; shards without label maps are refused clearly."""
    from jobutil import load_job
    from mlflow.tracking import MlflowClient

    job = load_job("segmentation")
    out = tmp_path / "seg.json"
    report = job.run_segmentation("latest", overrides=[f"workspace={workspace}", "segmentation.steps=3",
                                                       "segmentation.crop=[8,64,64]", "segmentation.eval_volumes=3",
                                                       "segmentation.overlays=2"], out=str(out))
    assert set(report["variants"]) == {"linear/pretrained", "linear/random", "unetr/pretrained", "unetr/random"}
    assert report["n_eval"] == 3 and report["global_batch"] == 8
    for name, v in report["variants"].items():
        present = {c: d for c, d in v["dice"].items() if d is not None}
        assert {"lung", "heart", "bones"} <= set(present) and "esophagus" not in present  # none rendered
        assert all(0.0 <= d <= 1.0 for d in present.values())
        assert v["dice_mean"] == pytest.approx(np.mean(list(present.values())))
    assert json.loads(out.read_text())["variants"] == report["variants"]
    assert {Path(p).name for p in Path(report["results_dir"]).glob("overlay_*.png")} == \
        {"overlay_linear.png", "overlay_unetr.png"}
    client, run = _training_run(workspace)
    assert report["mlflow"]["run_id"] == run.info.run_id
    metrics = MlflowClient(report["mlflow"]["tracking_uri"]).get_run(run.info.run_id).data.metrics
    assert metrics["segmentation/unetr/pretrained/dice/mean"] == pytest.approx(
        report["variants"]["unetr/pretrained"]["dice_mean"])
    assert metrics["segmentation/linear/random/dice/heart"] == pytest.approx(
        report["variants"]["linear/random"]["dice"]["heart"])
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "segmentation")} == \
        {"overlay_linear.png", "overlay_unetr.png", "segmentation.json"}
    # shards made without label maps: one clear error before any training
    bare = tmp_path / "bare"
    shutil.copytree(workspace / "shards", bare)
    for split in ("train", "valid"):
        manifest = json.loads((bare / split / "manifest.json").read_text())
        manifest["labelmaps_from"] = {"none": manifest["num_samples"]}
        (bare / split / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="hold no organ label maps"):
        job.run_segmentation("latest", overrides=[f"workspace={workspace}", f"data.shards_dir={bare}"])


# ------------------------------------------------------------------------------------------------------------------
# jobs/report_generation.py on the same trained workspace

REPORT_ARGS = ["report.steps=6", "report.batch_size=2", "report.eval_volumes=4", "report.n_bootstrap=10",
               "report.max_length=48", "report.warmup_steps=1"]


def test_report_generation_job(workspace, latest, ray_session, tmp_path, report_texts, mlflow_text_leaks) -> None:
    """``jobs/report_generation.py`` (in this process, on the session's Ray): the generator trains, both decodings
    and both baselines are scored with every metric and an interval, the JSON report, plots and the generator reach
    the training run in MLflow, and no report text does; with ``tracking.log_text=true`` the generations do."""
    from jobutil import load_job
    from mlflow.tracking import MlflowClient

    from volvlp_ray.eval.report_metrics import rouge_l

    job = load_job("report_generation")
    out = tmp_path / "rg.json"
    report = job.run_report_generation("latest", overrides=[f"workspace={workspace}", *REPORT_ARGS], out=str(out))
    assert json.loads(out.read_text())["scores"] == report["scores"]
    assert report["n_eval"] == 4 and report["train"]["steps"] == 6 and report["train"]["global_batch"] == 4
    assert [e["step"] for e in report["train_loss"]] == list(range(1, 7))
    assert set(report["scores"]) == {"greedy", "beam", "most_frequent", "retrieval"}
    folder = Path(report["results_dir"])
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert len({r["most_frequent"] for r in rows}) == 1
    for name, s in report["scores"].items():
        for m in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l"):
            assert 0.0 <= s[m]["value"] <= 1.0 and s[m]["ci95"][0] <= s[m]["value"] + 1e-9, (name, m, s[m])
        for m in ("macro_f1", "micro_f1", "macro_precision", "micro_recall"):
            assert 0.0 <= s["ce"][m]["value"] <= 1.0
        # the figure is the library's on the rows the job wrote
        hyps = [r[name] for r in rows]
        assert s["rouge_l"]["value"] == pytest.approx(float(rouge_l([r["reference"] for r in rows], hyps).mean()))
    assert {Path(p).name for p in folder.glob("*.png")} == {"report_metrics.png", "report_ce_per_label.png"}
    client, run = _training_run(workspace)
    assert report["mlflow"]["run_id"] == run.info.run_id
    metrics = MlflowClient(report["mlflow"]["tracking_uri"]).get_run(run.info.run_id).data.metrics
    assert metrics["report_gen/beam/rouge_l"] == pytest.approx(report["scores"]["beam"]["rouge_l"]["value"])
    assert metrics["report_gen/retrieval/ce_micro_f1"] == pytest.approx(
        report["scores"]["retrieval"]["ce"]["micro_f1"]["value"])
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report_generation")}
    assert logged == {"report_metrics.png", "report_ce_per_label.png", "report_generation.json", "generator"}
    gen_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report_generation/generator")}
    assert {"model.safetensors", "report_config.json", "tokenizer"} <= gen_files
    texts = report_texts(workspace)
    leaked, scanned = mlflow_text_leaks(workspace / "mlflow.db", texts)
    assert not leaked, list(leaked.items())[:3]
    assert any(s.endswith("report_generation/report_generation.json") for s in scanned)

    # the logged generator is the trained one: reloaded, it writes the same greedy reports
    from volvlp_ray.downstream.reports import held_out, load_generator, pad_volumes
    from volvlp_ray.config import load_config

    gen, tok = load_generator(str(folder / "generator"), report["checkpoint"]["export_dir"])
    cases = held_out(load_config(None, [f"workspace={workspace}"]), 4)
    x, d = pad_volumes([c["volume"] for c in cases], int(gen.vit.patch[0]), (-1000.0, 1000.0))
    again = [tok.decode(ids, skip_special_tokens=True) for ids in gen.generate(x, d, 47)]
    assert again == [r["greedy"] for r in rows]

    # the privacy switch, on stores of their own: generations only when tracking.log_text opts in
    from dataclasses import replace

    from volvlp_ray.eval.checkpoint import resolve_checkpoint

    ref = replace(resolve_checkpoint("latest", workspace), run_name=None)
    for opt_in in (False, True):
        db = tmp_path / f"optin-{opt_in}.db"
        cfg = load_config(None, [f"workspace={workspace}", f"tracking.tracking_uri=sqlite:///{db}",
                                 f"tracking.log_text={str(opt_in).lower()}"])
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            where = job._log_to_mlflow(cfg, ref, {"report_gen/x": 1.0}, [], folder / "generator",
                                       folder / "generations.jsonl")
        names = {Path(a.path).name for a in MlflowClient(f"sqlite:///{db}").list_artifacts(where["run_id"],
                                                                                             "report_generation")}
        assert ("generations.jsonl" in names) == opt_in, names
        leaked, _ = mlflow_text_leaks(db, {r["reference"] for r in rows})
        assert bool(leaked) == opt_in

    # shards that are not there, or too few volumes for a batch on every worker: one clear error before Ray
    from volvlp_ray.config import ConfigError

    with pytest.raises(FileNotFoundError, match="no train shards at"):
        job.run_report_generation("latest", overrides=[f"workspace={workspace}", f"data.shards_dir={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="has 16 volumes: too few for report.batch_size=9"):
        job.run_report_generation("latest", overrides=[f"workspace={workspace}", "report.batch_size=9"])


def test_report_generation_resumes_after_a_worker_kill(workspace, latest, tmp_path) -> None:
    """The job as a process: rank 0's Ray Train worker is SIGKILLed mid-run, once a checkpoint has been registered
    (Ray Train's controller takes reports in at its poll, every 0.5 s on a local Ray: the kill waits 2 s after the first
    one); Ray Train restarts
    the workers, which resume from the last registered checkpoint (not from step 0) and finish; every logged step is
    in the loss log once."""
    import re
    import signal
    import threading
    import time

    steps, every = 80, 4
    out = tmp_path / "rg-kill.json"
    cmd = [sys.executable, str(ROOT / "jobs" / "report_generation.py"), "--verbose", "--checkpoint", "latest",
           "--no-mlflow", "--out", str(out), f"workspace={workspace}", *REPORT_ARGS, f"report.steps={steps}",
           f"report.checkpoint_every={every}", "report.max_failures=1", "report.decoding=[greedy]",
           "report.baselines=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=workspace,
                            start_new_session=True)
    timer = threading.Timer(900, proc.kill)
    timer.start()
    step_line = re.compile(r"\(RayTrainWorker pid=(\d+)[^)]*\).*\[report\] step (\d+)/")
    reported = re.compile(r"Reporting training result \d+: TrainingReport\(checkpoint=Checkpoint")
    lines, killed_at, first_ckpt = [], -1, None
    try:
        for line in proc.stdout:
            lines.append(line)
            if first_ckpt is None and reported.search(line):
                first_ckpt = time.time()
            m = step_line.search(line)
            if m and killed_at < 0 and first_ckpt is not None and time.time() - first_ckpt > 2:
                killed_at = int(m.group(2))
                os.kill(int(m.group(1)), signal.SIGKILL)
        proc.wait()
    finally:
        timer.cancel()
    text = "".join(lines)
    assert proc.returncode == 0, text[-6000:]
    assert killed_at > 0, "the run ended before the kill:\n" + text[-3000:]
    resumed = re.search(r"\[report\] resumed from step (\d+)", text)
    assert resumed, "no resume line:\n" + text[-4000:]
    assert int(resumed.group(1)) % every == 0 and every <= int(resumed.group(1)) <= killed_at + every
    report = json.loads(out.read_text())
    assert report["train"]["steps"] == steps
    assert [e["step"] for e in report["train_loss"]] == list(range(4, steps + 1, 4))  # logged every steps // 20
    assert set(report["scores"]) == {"greedy"} and report["n_eval"] == 4
