"""Non-finite loss/gradients: skipped alike on every rank in every ZeRO stage, counted, rolled back, stopped.

NaN comes from the test-only hook ``VOLVLP_INJECT_NAN`` ("rank:step" or "step" items: that rank's loss, or every
rank's, times NaN at that global step), read by the training step itself; nothing of the code under test is
replaced.

- ``test_nan_step_is_skipped_on_every_rank_in_every_zero_stage``: one ``TorchTrainer.fit`` with 2 CPU workers
  (gloo) whose loop builds a DeepSpeed engine per ZeRO stage 0-3, plain and with grad-cache, and trains it with
  the project's own step (``loop._train_step_fn``): rank 0's loss is NaN at step 4, rank 1's at step 5.
- ``test_job_skips_...`` / ``test_job_stops_...``: the real job (``run_pretraining`` as ``jobs/pretrain.py`` runs
  it, in the test process on the session's Ray; ``configs/tiny.yaml``, 2 workers) twice on one workspace:
  isolated bad steps skipped and counted in MLflow, then ``max_bad_steps`` consecutive
  ones rolled back to the checkpoint and the run finishing; and a run whose bad steps outlast
  ``train.max_rollbacks``, ending with the clear error and no further retry.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from volvlp_ray.config import Config, ConfigError, load_config
from volvlp_ray.models import build_model, build_tokenizer
from volvlp_ray.train.badsteps import NanInjection, finite_or_nan
from volvlp_ray.train.deepspeed import deepspeed_config, param_groups

ROOT = Path(__file__).parents[1]
CORPUS = [
    "No pleural effusion. Mild cardiomegaly is present.",
    "A lung nodule in the right upper lobe; emphysema in both lungs.",
    "Coronary artery wall calcification. Hiatal hernia.",
    "Bronchiectasis and peribronchial thickening in the lower lobes.",
] * 3
# grad-cache is not available with ZeRO-3 (a config error)
CASES = [(stage, cache) for cache in (False, True) for stage in (0, 1, 2, 3) if not (cache and stage == 3)]
STEPS = 6  # DeepSpeed's WarmupCosineLR gives lr 0 to the first two steps (warmup 0 is refused); step 3 updates
INJECT = "0:4,1:5"  # rank 0's loss is NaN at step 4, rank 1's at step 5
BAD = {4, 5}


def test_injection_spec_and_poison():
    assert NanInjection("3, 0:5,1:7", rank=0).steps == {3, 5}
    assert NanInjection("3,0:5,1:7", rank=1).steps == {3, 7}
    assert not NanInjection("", rank=0) and not NanInjection(None, rank=0)
    with pytest.raises(ValueError, match="VOLVLP_INJECT_NAN"):
        NanInjection("x", rank=0)
    x = torch.tensor(2.0, requires_grad=True)
    y = finite_or_nan(x * 3)
    y.backward()
    assert float(y) == 6.0 and float(x.grad) == 3.0  # a finite loss and its gradient unchanged
    for loss_of, inject in ((lambda v: v * 3, True), (lambda v: torch.log(v - 2), False)):  # injected; -inf
        x.grad = None
        y = finite_or_nan(loss_of(x), inject)
        y.backward()
        assert not torch.isfinite(y) and not torch.isfinite(x.grad)


def test_failure_budget_decisions():
    """What the controller-side callback lets Ray Train retry (see also the Ray Train test below)."""
    from volvlp_ray.train.badsteps import FailureBudget, NonFiniteTrainingError, RollbackError

    budget = FailureBudget(max_failures=1)
    for _ in range(5):  # rollbacks are bounded by train.max_rollbacks, not here
        budget.after_exception(None, {0: RollbackError("r"), 1: RollbackError("r")})
    lost = RuntimeError("node reclaimed")
    lost.preempted = True
    budget.after_exception(None, {1: lost})  # a preemption: Ray Train's own budget
    budget.after_exception(None, {0: ValueError("bug")})  # failure 1 of 1: retried
    with pytest.raises(RuntimeError, match="worker failure 2 with train.max_failures=1: .*ValueError: bug"):
        budget.after_exception(None, {0: ValueError("bug")})
    with pytest.raises(NonFiniteTrainingError, match=r"^non-finite loss/gradients in 3 consecutive"):
        FailureBudget(-1).after_exception(None, {0: RuntimeError(
            "Traceback ...\nNonFiniteTrainingError: non-finite loss/gradients in 3 consecutive steps")})
    unlimited = FailureBudget(-1)
    for _ in range(5):
        unlimited.after_exception(None, {0: ValueError("bug")})


def test_bad_step_settings_are_checked():
    cfg = load_config(None, [])
    assert cfg.train.max_failures >= 1  # the embedded default survives a killed worker
    for bad in (["train.max_bad_steps=-1"], ["train.max_rollbacks=-2"], ["train.max_failures=-2"]):
        with pytest.raises(ConfigError, match=bad[0].split("=")[0]):
            load_config(None, bad)


# --------------------------------------------------------------------------------------------------------
# every ZeRO stage, plain and grad-cache, under Ray Train


def _gathered(engine) -> torch.Tensor:
    """Every parameter, flattened into one vector (ZeRO-3 partitions gathered)."""
    import deepspeed

    params = [p for _, p in engine.module.named_parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                           enabled=engine.zero_optimization_stage() == 3):
        return torch.cat([p.detach().float().flatten().clone() for p in params])


def _skip_loop(config: dict) -> None:
    """Ray Train worker: per case a fresh engine trained STEPS steps with the loop's own train step; what each
    step did goes to a JSON file per rank."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from volvlp_ray.losses import build_loss
    from volvlp_ray.train.loop import _train_step_fn

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    tokenizer = build_tokenizer(CORPUS, 200)
    loss_fn = build_loss("sigmoid")
    g = torch.Generator().manual_seed(100 + rank)
    enc = tokenizer(CORPUS[rank * 4:rank * 4 + 4], padding=True, return_tensors="pt")
    batch = {"volume": torch.randn(4, 1, 8, 32, 32, generator=g), "input_ids": enc["input_ids"],
             "attention_mask": enc["attention_mask"]}
    rows = []
    for stage, cache in CASES:
        cfg = Config()
        cfg.train.zero_stage, cfg.train.batch_size, cfg.train.steps, cfg.train.warmup_steps = stage, 4, 100, 1
        cfg.loss.negation_pairs = 0
        micro, n_micro = (2, 2) if cache else (0, 1)
        ds_cfg = deepspeed_config(cfg, use_gpu=False)
        if cache:
            ds_cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=n_micro)
        torch.manual_seed(0)
        model = build_model(cfg.model, tokenizer)
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05),
                                                       config=ds_cfg, dist_init_required=False)
        step_fn = _train_step_fn(cfg, engine, loss_fn, torch.float32, n_micro, micro, rank)
        row = {"stage": stage, "cache": cache, "applied": [], "lr": [], "changed": [], "loss_finite": [],
               "t0": time.time()}
        before = _gathered(engine)
        for step in range(1, STEPS + 1):
            loss, _ = step_fn(dict(batch), None, step)
            after = _gathered(engine)
            row["applied"].append(engine.was_step_applied())
            row["lr"].append(float(scheduler.get_last_lr()[0]))
            row["changed"].append(float((after - before).abs().max()))
            row["loss_finite"].append(bool(torch.isfinite(loss)))
            before = after
        row.update(skipped_steps=engine.skipped_steps, params_finite=bool(torch.isfinite(before).all()),
                   checksum=float(before.double().sum()))
        row["seconds"] = time.time() - row.pop("t0")
        rows.append(row)
        del engine
        dist.barrier()
    Path(config["out_dir"], f"rank{rank}.json").write_text(json.dumps(rows))


@pytest.mark.slow
def test_nan_step_is_skipped_on_every_rank_in_every_zero_stage(ray_session, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "VOLVLP_INJECT_NAN": INJECT}}
    TorchTrainer(
        _skip_loop, train_loop_config={"out_dir": str(tmp_path)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="bad_steps", storage_path=str(tmp_path / "ray_results"), worker_runtime_env=env),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["stage"], r["cache"]) for r in ranks[0]] == CASES
    for r, rows in enumerate(ranks):
        for row in rows:
            what = f"rank {r} ZeRO-{row['stage']}{' grad-cache' if row['cache'] else ''}"
            steps = range(1, STEPS + 1)
            assert row["applied"] == [s not in BAD for s in steps], (what, row["applied"])
            # this rank's own loss is NaN only where it was injected; both ranks skip both steps
            own = 4 if r == 0 else 5
            assert row["loss_finite"] == [s != own for s in steps], (what, row["loss_finite"])
            changed, lr = row["changed"], row["lr"]  # after each step
            assert changed[2] > 0 and changed[5] > 0, (what, "an applied step changes the weights", changed)
            assert changed[3] == changed[4] == 0.0, (what, "a skipped step changed the weights", changed)
            assert lr[2] > 0 and lr[3] == lr[4] == lr[2] and lr[5] != lr[2], (what, "LR advanced on a skip", lr)
            assert row["skipped_steps"] == 2 and row["params_finite"], (what, row)
    print("seconds per case:", [(r["stage"], r["cache"], round(r["seconds"], 1)) for r in ranks[0]])
    for a, b in zip(*ranks):
        assert a["checksum"] == b["checksum"] and a["lr"] == b["lr"], ("ranks disagree", a, b)


def _failing_loop(config: dict) -> None:
    """Attempt 1 ends in a rollback, later ones in an ordinary error."""
    from volvlp_ray.train.badsteps import RollbackError

    attempts = Path(config["dir"], "attempts")
    n = len(attempts.read_text()) + 1 if attempts.exists() else 1
    attempts.write_text("x" * n)
    if n == 1:
        raise RollbackError(f"attempt {n}")
    raise ValueError(f"attempt {n}: an ordinary bug")


@pytest.mark.slow
def test_rollbacks_do_not_use_up_the_worker_failure_budget(ray_session, tmp_path):
    """``FailureBudget(max_failures=1)`` under a Ray Train limit of 10: a rollback is retried without being
    counted, then one ordinary failure is retried and the second stops the run (Ray Train alone would go on)."""
    from ray import cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from volvlp_ray.train.badsteps import FailureBudget

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _failing_loop, train_loop_config={"dir": str(tmp_path)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="budget", storage_path=str(tmp_path / "ray_results"),
                             failure_config=FailureConfig(max_failures=10), callbacks=[FailureBudget(1)]),
    )
    with pytest.raises(Exception) as info:
        trainer.fit()
    assert len((tmp_path / "attempts").read_text()) == 3
    assert "worker failure 2 with train.max_failures=1" in str(info.value), str(info.value)
    assert "attempt 3: an ordinary bug" in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------------------
# the real job: skip, roll back, stop


def _job(pretrain_job, ws: Path, run_name: str, inject: str, *extra: str) -> tuple[int, str]:
    """The job (``run_pretraining``, in this process on the session's Ray) with NaN injected; (exit code as the
    script would give it, output with the error's traceback as the script would print it)."""
    import traceback

    run = pretrain_job(f"workspace={ws}", f"run_name={run_name}", "train.checkpoint_every=3", "train.log_every=1",
                       "train.max_bad_steps=2", "train.max_rollbacks=1", "eval.at_end=false", *extra,
                       env={"VOLVLP_INJECT_NAN": inject})
    if run.error is None:
        return 0, run.output
    return 1, run.output + "".join(traceback.format_exception(run.error))


def _mlflow_run(ws: Path, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`volvlp.run_name` = '{run_name}'")
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, copy_tiny_workspace) -> Path:
    return copy_tiny_workspace(tmp_path_factory.mktemp("bad-steps"))


@pytest.mark.slow
def test_job_skips_isolated_bad_steps_and_rolls_back_a_run_of_them(workspace, pretrain_job):
    # rank 1's loss at step 2 (isolated: skipped); every rank's at 5 and 6 (train.max_bad_steps=2 in a row:
    # rollback to the checkpoint of step 3, the replay leaves out the batches of 5 and 6)
    code, out = _job(pretrain_job, workspace, "rb", "1:2,5,6", "train.steps=8")
    assert code == 0, out[-6000:]
    for line in ("[train] warning: step 2: non-finite loss/gradients on some rank; update skipped (1 consecutive)",
                 "[train] warning: step 6: non-finite loss/gradients on some rank; update skipped (2 consecutive)",
                 "steps 5, 6; train.max_bad_steps=2): rolling back to the latest checkpoint (step 3), rollback 1 of "
                 "train.max_rollbacks=1",
                 "[train] resumed from step 3 ", "[train] replaying after 1 rollback(s)",
                 "[train] step 5: not trained", "[train] step 6: not trained", "[train] step 8/8"):
        assert line in out, (line, out[-6000:])
    assert "step 4: non-finite" not in out and "step 7: non-finite" not in out
    record = json.loads((workspace / "ray_results" / "rb" / "bad_steps.json").read_text())
    assert [(r["bad_steps"], r["checkpoint_step"]) for r in record["rollbacks"]] == [([5, 6], 3)]

    client, run = _mlflow_run(workspace, "rb")
    assert run.info.status == "FINISHED"
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
               for k in ("train/loss", "train/skipped_steps", "train/skipped_steps_window")}
    # a skipped step's loss is NaN (not logged); every other step once, the rolled-back ones not twice
    assert [s for s, _ in history["train/loss"]] == [1, 3, 4, 7, 8], history["train/loss"]
    # the total: step 2; 5 (before the rollback); after it from the checkpoint's 1, the replayed 5 and 6
    assert history["train/skipped_steps"] == [(s, float(v)) for s, v in enumerate([0, 1, 1, 1, 2, 3, 3, 3], 1)]
    assert [v for _, v in history["train/skipped_steps_window"]] == [0, 1, 0, 0, 1, 1, 0, 0]


@pytest.mark.slow
def test_job_stops_when_the_rollbacks_are_used_up(workspace, pretrain_job):
    # steps 2, 3 bad on every rank: rollback 1, to step 0 (no checkpoint yet: it would have been step 3's); the
    # replay leaves out 2 and 3; then 5, 6 bad: train.max_rollbacks=1 is used up, the run stops, not retried
    code, out = _job(pretrain_job, workspace, "stop", "2,3,5,6", "train.steps=6")
    assert code != 0, out[-6000:]
    assert "rolling back to step 0 (no checkpoint yet), rollback 1 of train.max_rollbacks=1" in out, out[-6000:]
    message = ("non-finite loss/gradients in 2 consecutive steps (steps 5, 6) after 1 rollback(s) "
               "(train.max_bad_steps=2, train.max_rollbacks=1); steps rolled back before: 2, 3")
    assert f"[train] error: {message}" in out, out[-6000:]
    assert out.count(message) >= 2, "the driver's error names the cause too"
    assert "NonFiniteTrainingError" in out
    assert out.count("[train] replaying after 1 rollback(s)") == 1
    assert "stopped for it before" not in out, "Ray Train retried the final error"
    _, run = _mlflow_run(workspace, "stop")
    assert run.info.status == "FAILED"
    record = json.loads((workspace / "ray_results" / "stop" / "bad_steps.json").read_text())
    assert [(r["bad_steps"], r.get("stopped", False)) for r in record["rollbacks"]] == [([2, 3], False),
                                                                                      ([5, 6], True)]
