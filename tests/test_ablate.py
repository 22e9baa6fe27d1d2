"""The ablation job (``jobs/ablate.py``, ``volvlp_ray/ablate.py``): its trial list, the recall CIs, and a real
6-trial grid on the tiny data (Ray Tune trials of real training runs, one worker each, each evaluated on the held-out
split, two at a time) whose table, JSON, plots and MLflow runs are checked against the child runs' own metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from volvlp_ray.ablate import METRICS, ablation_trials, recall_with_cis
from volvlp_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_grid_trials_are_distinct_and_valid():
    """configs/ablation.yaml (what `python jobs/ablate.py` runs): the main grid, the alpha arm and the batch arm, a
    trial two arms share once; alpha only on SWCA losses; the organ arm with K chunks; per-worker batches."""
    cfg = load_config(ROOT / "configs" / "ablation.yaml")
    trials = ablation_trials(cfg)
    keys = [json.dumps(t["overrides"], sort_keys=True) for t in trials]
    assert len(keys) == len(set(keys)) == 26
    main = [t for t in trials if t["cell"]["global_batch"] == 16 and t["cell"]["alpha"] in (None, 0.5)]
    assert len(main) == 4 * 2 * 2  # losses x texts x seeds
    for t in trials:
        o = t["overrides"]
        assert ("loss.alpha" in o) == t["cell"]["loss"].startswith("swca")
        assert o["data.chunks_per_volume"] == (2 if t["cell"]["text"] == "organ" else 1)
        assert o["train.batch_size"] * cfg.scaling.num_workers == t["cell"]["global_batch"]
    alphas = sorted({t["cell"]["alpha"] for t in trials if t["cell"]["loss"] == "swca-softmax"
                     and t["cell"]["global_batch"] == 16 and t["cell"]["text"] == "report"})
    assert alphas == [0.25, 0.5, 0.75, 1.0]


def test_trial_list_errors():
    with pytest.raises(ConfigError, match="'triplet' is not one of"):
        ablation_trials(load_config(None, ["ablation.losses=[triplet]"]))
    with pytest.raises(ConfigError, match="has no alpha"):
        ablation_trials(load_config(None, ["ablation.alpha_losses=[clip]"]))
    with pytest.raises(ConfigError, match="does not split over scaling.num_workers=2"):
        ablation_trials(load_config(None, ["ablation.global_batches=[7]"]))
    with pytest.raises(ConfigError, match="multiple of data.chunks_per_volume=2"):  # organ: 6 / 2 workers = 3
        ablation_trials(load_config(None, ["train.batch_size=3", "ablation.texts=[organ]"]))


def test_recall_with_cis_against_a_hand_made_case():
    """Reports = the axes; volumes (0.6, 0, 0.8), (0, 0.6, 0.8), (0.6, 0.8, 0). Report 0 scores the volumes 0.6, 0,
    0.6 (a tie with its own counts for it: first), report 1 0, 0.6, 0.8 (second), report 2 0.8, 0.8, 0 (third);
    volume 0 scores the reports 0.6, 0, 0.8 (second), volume 1 0, 0.6, 0.8 (second), volume 2 0.6, 0.8, 0 (third)."""
    text = np.eye(3)
    volume = np.array([[0.6, 0.0, 0.8], [0.0, 0.6, 0.8], [0.6, 0.8, 0.0]])
    r = recall_with_cis(text, volume, ks=(1, 2, 3), n_bootstrap=500, seed=0)
    assert [r[f"t2v/recall_at_{k}"] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [r[f"v2t/recall_at_{k}"] for k in (1, 2, 3)] == pytest.approx([0.0, 2 / 3, 1.0])
    # bootstrap over the 3 queries: the CI brackets the value; with every query a hit (K = N) or none, no spread
    assert r["t2v/recall_at_1_ci_low"] == 0.0 < 1 / 3 < r["t2v/recall_at_1_ci_high"] <= 1.0
    assert r["t2v/recall_at_3_ci_low"] == r["t2v/recall_at_3_ci_high"] == 1.0
    assert r["v2t/recall_at_1_ci_low"] == r["v2t/recall_at_1_ci_high"] == 0.0
    assert "t2v/recall_at_1_ci_low" not in recall_with_cis(text, volume, ks=(1,), n_bootstrap=0)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ablation_job_writes_the_table_the_child_runs_hold(tmp_path, copy_tiny_workspace):
    from mlflow.tracking import MlflowClient

    ws = copy_tiny_workspace(tmp_path / "ws")
    cmd = [sys.executable, str(ROOT / "jobs" / "ablate.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"workspace={ws}", "ablation.name=t", "ablation.losses=[swca-softmax]", "ablation.texts=[report]",
           "ablation.seeds=[0,1]", "ablation.alpha_losses=[swca-softmax]", "ablation.alphas=[0.25]",
           "ablation.batch_losses=[swca-softmax]", "ablation.global_batches=[2]", "train.steps=2",
           "scaling.num_workers=1",  # one training worker per trial: the table's wiring does not need two
           "train.checkpoint_every=2", "train.warmup_steps=1", "eval.n_bootstrap=20",
           "ablation.max_concurrent=2"]  # two trials at a time: 261 s -> 163 s on the 2-core machine
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    out = p.stdout + p.stderr
    (tmp_path / "console.txt").write_text(out)
    assert p.returncode == 0, out[-6000:]
    assert "[ablate] t: 6 trials (3 cells x 2 seeds)" in out
    # the console: a bar over the trials, not Tune's status table nor the trials' own lines (--verbose has them)
    assert "[ablate] trials 6/6 done (100%)" in out, out[-3000:]
    for noise in ("Trial status:", "RayTrainWorker", "TrainController", "SplitCoordinator", "Execution plan"):
        assert noise not in out, noise
    result = json.loads((ws / "ablations" / "t" / "results.json").read_text())
    cells = {(c["alpha"], c["global_batch"]): c for c in result["cells"]}
    assert set(cells) == {(0.5, 4), (0.25, 4), (0.5, 2)} and all(c["seeds"] == [0, 1] for c in cells.values())
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`volvlp.ablation_parent` = 'true'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    for c in children:  # every child trained its own settings and was evaluated on the whole held-out split
        cell = json.loads(c.data.tags["volvlp.ablation_cell"])
        assert float(c.data.params["loss.alpha"]) == cell["alpha"]
        assert int(c.data.params["train.batch_size"]) == cell["global_batch"]  # one worker
        assert c.data.metrics["ablation/n"] == 8
        assert c.data.metrics["ablation/v2t/recall_at_1_ci_low"] <= c.data.metrics["ablation/v2t/recall_at_1"] \
            <= c.data.metrics["ablation/v2t/recall_at_1_ci_high"]
    for (alpha, batch), cell in cells.items():  # the table's figures are the children's, averaged over seeds
        runs = [c for c in children if json.loads(c.data.tags["volvlp.ablation_cell"]) ==
                {"loss": "swca-softmax", "text": "report", "alpha": alpha, "global_batch": batch}]
        assert len(runs) == 2
        for m in METRICS:
            vals = [r.data.metrics[f"ablation/{m}"] for r in runs]
            assert cell["metrics"][m]["mean"] == pytest.approx(np.mean(vals))
            assert cell["metrics"][m]["seed_sd"] == pytest.approx(np.std(vals, ddof=1))
    table = (ws / "ablations" / "t" / "results.md").read_text()
    assert table.count("| swca-softmax | report |") == 3 and "CT→report R@1" in table
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == \
        {"plots/alpha_retrieval.png", "plots/batch_size.png"}
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert "[ablate] done in" in out
