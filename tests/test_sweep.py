"""Sweeps: the search-space parser, the concurrency rule, and a real 2-trial sweep (one at a time, one training
worker per trial) on the tiny config that is interrupted after its first finished trial and resumed with the same
name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from clusterutil import kill_tree

from volvlp_ray.config import Config, ConfigError, config_to_dict, load_config
from volvlp_ray.tune import apply_params, parse_search_space, trial_concurrency

ROOT = Path(__file__).parents[1]


def test_search_space_forms_and_errors():
    from ray.tune.search.sample import Domain

    base = config_to_dict(load_config(None, ["loss.kind=swca"]))
    space = parse_search_space({"loss.alpha": [0.25, 0.5], "train.lr": {"loguniform": [1e-4, 1e-2]},
                                "loss.form": {"choice": ["sigmoid", "softmax"]}}, base)
    assert space["loss.alpha"] == {"grid_search": [0.25, 0.5]}
    assert isinstance(space["train.lr"], Domain) and isinstance(space["loss.form"], Domain)
    with pytest.raises(ConfigError, match="unknown config key 'loss.alhpa'"):
        parse_search_space({"loss.alhpa": [0.5]}, base)
    with pytest.raises(ConfigError, match="must be a number"):
        parse_search_space({"loss.alpha": ["high"]}, base)
    with pytest.raises(ConfigError, match="needs \\[low, high\\]"):
        parse_search_space({"train.lr": {"uniform": [1e-3]}}, base)
    with pytest.raises(ConfigError, match="must be a list or one of"):
        parse_search_space({"train.lr": {"normal": [0, 1]}}, base)
    cfg = apply_params(base, {"loss.alpha": 0.25, "model.init_logit_scale": 5.0})
    assert cfg.loss.alpha == 0.25 and cfg.model.init_logit_scale == 5.0 and cfg.train.lr == Config().train.lr


def test_a_swept_key_without_effect_is_a_config_error_naming_what_voids_it():
    """alpha with the sigmoid loss (the embedded default), alpha in the sigmoid trials of a loss-kind sweep, the
    same-study rule with one chunk per volume, the ring with a softmax loss: each would make trials that differ
    only in their name."""
    sigmoid = config_to_dict(Config())
    with pytest.raises(ConfigError, match=r"'loss.alpha' has no effect with loss.kind=sigmoid \(it applies to "
                                          r"loss.kind=swca only\).*change loss.kind"):
        parse_search_space({"loss.alpha": [0.5, 1.0]}, sigmoid)
    with pytest.raises(ConfigError, match="'loss.alpha' has no effect in the trials with loss.kind=sigmoid"):
        parse_search_space({"loss.kind": ["sigmoid", "swca"], "loss.alpha": [0.5, 1.0]}, sigmoid)
    with pytest.raises(ConfigError, match="'loss.same_study' has no effect with data.chunks_per_volume=1"):
        parse_search_space({"loss.same_study": ["soft", "ignore"]}, sigmoid)
    with pytest.raises(ConfigError, match="'loss.ring' has no effect in the trials with loss.kind=clip"):
        parse_search_space({"loss.kind": ["sigmoid", "clip"], "loss.ring": [True, False]}, sigmoid)
    organ = config_to_dict(load_config(None, ["data.text_mode=organ", "train.batch_size=8",
                                              "data.chunks_per_volume=2"]))
    parse_search_space({"loss.same_study": ["soft", "ignore"], "loss.kind": ["clip", "sigmoid"]}, organ)  # fine


def test_the_default_sweep_config_sweeps_alpha_and_temperature_with_swca():
    """``python jobs/sweep.py`` with no --config loads configs/sweep.yaml: SWCA, alpha x init_logit_scale, and
    its search space passes the no-effect check."""
    from jobutil import load_job

    job = load_job("sweep")
    cfg = load_config(job.DEFAULT_CONFIG)
    assert cfg.loss.kind == "swca" and set(cfg.sweep.search_space) == {"loss.alpha", "model.init_logit_scale"}
    parse_search_space(cfg.sweep.search_space, config_to_dict(cfg))
    assert job.main(["sweep.search_space={loss.alpha: [0.5, 1.0]}", "loss.kind=sigmoid"]) == 2  # a clear error


def test_concurrency_follows_resources():
    cfg = Config()  # 2 workers x 1 CPU + 1 CPU for data = 3 per trial
    assert trial_concurrency(cfg, {"CPU": 8}) == 2
    assert trial_concurrency(cfg, {"CPU": 30}) == 10
    cfg.sweep.max_concurrent = 3
    assert trial_concurrency(cfg, {"CPU": 30}) == 3
    cfg.scaling.use_gpu = True
    assert trial_concurrency(cfg, {"CPU": 30, "GPU": 4}) == 2
    with pytest.raises(RuntimeError, match="one trial needs 3 CPUs"):
        trial_concurrency(Config(), {"CPU": 2})


SWEEP_ARGS = [
    "loss.kind=swca", "scaling.num_workers=1", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "eval.every=2",
    "eval.val_volumes=8", "sweep.name=st", "sweep.max_concurrent=1", "sweep.grace_period=2",
    "sweep.search_space={loss.alpha: [0.5, 1.0], model.init_logit_scale: [5.0]}",
]


def _env() -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop("RAY_ADDRESS", None)
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def _children(client, exp_id: str, parent_id: str):
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.timeout(1800)  # two sweeps of real training trials, each up to 900 s
def test_sweep_interrupted_resumes_and_records_everything(tmp_path, copy_tiny_workspace):
    from mlflow.tracking import MlflowClient

    ws = copy_tiny_workspace(tmp_path / "ws")  # tiny.yaml's data, shards and tokenizer: the sweep trains at once
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"workspace={ws}", *SWEEP_ARGS]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")

    # first attempt: killed (the driver and its local Ray) as soon as one trial has finished
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    out1: list[str] = []
    reader = threading.Thread(target=lambda: out1.extend(proc.stdout), daemon=True)
    reader.start()
    finished, deadline = 0, time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        time.sleep(2)
        exp = client.get_experiment_by_name("volvlp_ray") if (ws / "mlflow.db").exists() else None
        parents = client.search_runs([exp.experiment_id], "tags.`volvlp.sweep_parent` = 'true'") if exp else []
        if parents:
            finished = sum(r.info.status == "FINISHED" for r in _children(client, exp.experiment_id,
                                                                           parents[0].info.run_id))
            if finished:
                kill_tree(proc.pid)
                break
    proc.wait()
    reader.join(timeout=10)
    assert finished >= 1, "no trial finished before the deadline:\n" + "".join(out1)[-5000:]
    assert "[data] shards ready" in "".join(out1) and "[prepare]" not in "".join(out1)

    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    out2 = p.stdout + p.stderr
    assert p.returncode == 0, out2[-6000:]
    assert "[sweep] resuming st" in out2

    exp = client.get_experiment_by_name("volvlp_ray")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`volvlp.sweep_parent` = 'true'")
    assert parent.info.status == "FINISHED" and parent.data.tags["volvlp.sweep"] == "st"
    children = _children(client, exp.experiment_id, parent.info.run_id)
    assert len(children) == 2, [c.info.run_name for c in children]  # resuming created no duplicate trials
    grid = {(c.data.params["loss.alpha"], c.data.params["model.init_logit_scale"]) for c in children}
    assert grid == {("0.5", "5.0"), ("1.0", "5.0")}
    for c in children:
        assert c.info.status in ("FINISHED", "KILLED")
        assert client.get_metric_history(c.info.run_id, "train/loss"), "each trial has its loss curve"
        assert client.get_metric_history(c.info.run_id, "val/zeroshot/mean/auroc")
    best = [c for c in children if c.data.tags.get("volvlp.best_trial") == "true"]
    assert len(best) == 1 and parent.data.tags["volvlp.best_run_id"] == best[0].info.run_id
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {"plots/sweep_metric.png"}

    best_yaml = ws / "sweeps" / "st" / "best.yaml"
    cfg = load_config(best_yaml)  # what `jobs/pretrain.py --config best.yaml` loads
    assert cfg.loss.alpha == float(best[0].data.params["loss.alpha"])
    assert cfg.model.init_logit_scale == float(best[0].data.params["model.init_logit_scale"])
    assert cfg.loss.kind == "swca" and cfg.train.steps == 4 and cfg.run_name is None
    assert "best.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
