"""Elastic resume (``volvlp_ray/train/elastic.py``): a run checkpointed with N workers resumes with M != N.

- the data position, without Ray: an epoch interrupted on N ranks (threads, the collectives training uses) and
  continued on M from the files a checkpoint holds: every row of the epoch's supply (its stream plus the carry it
  started with) is trained once or carried into the next epoch, none twice, none lost; and a stream that started
  from such a resize replays exactly on the same number of workers (resume from any step);
- model and optimizer, in-process with Ray Train: ZeRO 0/1/2/3 state written by 2 workers, loaded by 1, written
  again, loaded by 2: consolidated fp32 weights and Adam moments equal to those saved, LR schedule and step kept;
- the job (slow): 2 workers -> driver killed after a mid-epoch checkpoint -> the same run name with 1 worker ->
  killed again mid-epoch -> 2 workers to the end: each attempt starts at its checkpoint's step, the logged LR
  follows the schedule of an uninterrupted run, and the interrupted epoch's samples are trained once.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from volvlp_ray.data.sampler import EqualTokenSampler, ThreadComm, equal_token_steps
from volvlp_ray.train.elastic import EpochStart, drop_keys, resized_epoch_start, save_data_position

B, PZ = 4, 4
DATA = [{"key": f"s{i}", "depth": int(d)} for i, d in enumerate(np.random.default_rng(3).integers(17, 61, 120))]


def _stream(epoch: int, rank: int, world: int) -> list[dict]:
    """The epoch's rows of ``rank`` (each epoch the whole data set in a new order, split over the ranks)."""
    order = np.random.default_rng([epoch, 9]).permutation(len(DATA))
    return [DATA[i] for i in order][rank::world]


def _run(world: int, epoch: int, starts: list[EpochStart], stop: int | None = None):
    """``stop`` (or all) steps of ``epoch`` on ``world`` ranks from ``starts``: (plans per rank, pools after)."""
    samplers = [EqualTokenSampler(B, PZ, "report", pool_rows=2 * B, max_pool=4 * B, seed=0, rank=r)
                for r in range(world)]
    comm = ThreadComm(world)
    plans: list[list] = [[] for _ in range(world)]

    def run(r: int) -> None:
        st = starts[r]
        rows = drop_keys(iter(_stream(epoch, r, world)), st.excluded)
        gen = equal_token_steps(samplers[r], rows, comm.for_rank(r), epoch, list(st), first_step=st.base)
        plans[r] = list(itertools.islice(gen, stop))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len({len(p) for p in plans}) == 1, "every rank takes as many steps"
    return plans, [list(s.pool) for s in samplers]


def _keys(plans) -> list[str]:
    return [str(r["key"]) for p in plans for plan in p for r in plan.rows]


@pytest.mark.parametrize("worlds", [(2, 1), (1, 3), (2, 3, 1)], ids=lambda w: "->".join(map(str, w)))
def test_an_epoch_resized_mid_way_trains_each_row_of_its_supply_once(tmp_path, worlds):
    first = worlds[0]
    _, pools = _run(first, 0, [EpochStart() for _ in range(first)])  # epoch 0 leaves rows for epoch 1's pools
    carry_in = [str(r["key"]) for p in pools for r in p]
    assert carry_in, "the set-up should carry rows into the epoch"
    supply = Counter(d["key"] for d in DATA) + Counter(carry_in)

    starts = [EpochStart(p) for p in pools]
    trained: list[str] = []
    base = 0
    for i, (world, new_world) in enumerate(zip(worlds, worlds[1:])):  # an attempt, then its checkpoint
        plans, _ = _run(world, 1, starts, stop=3)  # a checkpoint after 3 steps
        assert len(plans[0]) == 3
        ckpt = tmp_path / f"attempt{i}"
        for r in range(world):
            save_data_position(ckpt, r, starts[r], starts[r].trained + _keys([plans[r]]))
        trained += _keys(plans)
        base += 3
        starts = [resized_epoch_start(ckpt, r, new_world, world, base=base) for r in range(new_world)]
        assert all(s.base == base and not s.trained for s in starts)
    plans, left = _run(worlds[-1], 1, starts)  # the last attempt ends the epoch
    assert plans[0], "the epoch goes on after the resize"
    trained += _keys(plans)
    left_keys = [str(r["key"]) for p in left for r in p]
    # every row of the supply: trained once, or carried into the next epoch; nothing twice, nothing lost
    assert Counter(trained) + Counter(left_keys) == supply
    assert max(Counter(trained).values()) <= max(supply.values())


def test_a_stream_started_by_a_resize_replays_exactly_on_the_same_workers():
    """A checkpoint of the run that continued an epoch on another number of workers, resumed on that number: the
    stream (same exclusions, same carry, batch numbers from the resize's base) continues exactly, from any step."""
    from test_sampler import _Shard

    from volvlp_ray.config import load_config
    from volvlp_ray.train.loop import TrainStream
    from volvlp_ray.train.producer import BatchProducer

    cfg = load_config(None, ["train.batch_size=4", "train.steps=16", "loss.negation_pairs=0", "data.shuffle_buffer=0",
                             "data.pool_batches=2", "data.max_pool_batches=4", "model.patch=[4,16,16]"])
    shard = _Shard(23)
    excluded = [f"e0_{i}" for i in (0, 3, 4, 9, 17)]
    carry = [dict(r) for r in _rows_of_shard(shard, 1)[:3]]  # rows the resized epoch's pool starts with

    def batches(stream, record=None):
        out = []
        for epoch, n, step, b, start in BatchProducer(stream, lambda item: item, depth=2):
            time.sleep(0.002)
            out.append((epoch, n, step, tuple(b["key"])))
            if record is not None:
                record.append((epoch, n, start, list(b["key"])))
        return out

    record: list = []
    ref = batches(TrainStream(cfg, shard, None, None, 0, 1, first_step=5, epoch=0, skip=0,
                              start=EpochStart(carry, excluded=excluded, base=7)), record)
    first_epoch = [r for r in ref if r[0] == 0]
    assert first_epoch and first_epoch[0][1] == 8, "batch numbers continue from the resize's base"
    assert not set(excluded) & {k for r in first_epoch for k in r[3]}, "trained keys are left out of the stream"
    assert len({r[0] for r in ref}) >= 2
    trained: list[str] = []
    for k in range(1, len(ref)):
        epoch, n, start, keys = record[k - 1]  # a checkpoint after this step
        trained = (trained if k > 1 and record[k - 2][0] == epoch else []) + [str(x) for x in keys]
        resumed = batches(TrainStream(
            cfg, shard, None, None, 0, 1, first_step=5 + k, epoch=epoch, skip=n - start.base,
            start=EpochStart(list(start), excluded=start.excluded, base=start.base, trained=trained)))
        assert resumed == ref[k:], k


def _rows_of_shard(shard, epoch: int) -> list[dict]:
    from volvlp_ray.data.sampler import rows_of

    return [r for b in shard.iter_batches(batch_size=8, local_shuffle_seed=epoch) for r in rows_of(b)]


# -- model and optimizer: ZeRO 0-3 state, 2 workers -> 1 -> 2, in-process with Ray Train ------------------------

CORPUS = [
    "No pleural effusion. Mild cardiomegaly is present.",
    "A lung nodule in the right upper lobe; emphysema in both lungs.",
    "Coronary artery wall calcification. Hiatal hernia.",
    "Bronchiectasis and peribronchial thickening in the lower lobes.",
] * 3
STAGES = (0, 1, 2, 3)


def _consolidated(engine, stage: int, moments: bool = True) -> dict:
    """Every trainable parameter's fp32 master weight and Adam moments, whole (gathered from the partitions;
    collective). Rank-independent, so comparable across numbers of workers."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if moments and hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO-1/2 link the moments after the first group's step
        opt._hp_optimizer_states_linked = False  # only (DeepSpeed 0.19): link them all again
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if not moments:
            out[name] = [p.detach().float().clone() if stage == 0 else safe_get_full_fp32_param(p).float().clone()]
        elif stage == 0:
            state = opt.state[p]
            out[name] = [p.detach().float().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
        else:
            out[name] = [safe_get_full_fp32_param(p).float().clone()] + [
                safe_get_full_optimizer_state(p, k).float().clone() for k in ("exp_avg", "exp_avg_sq")]
    return out


def _elastic_loop(config: dict) -> None:
    """Ray Train worker: per ZeRO stage, load the previous phase's checkpoint (written by another number of
    workers) as the training loop does, record what was loaded, train 3 steps, save, record what was saved."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from volvlp_ray.config import Config
    from volvlp_ray.losses import build_loss
    from volvlp_ray.models import build_model, build_tokenizer
    from volvlp_ray.train.checkpoint import use_safe_loading
    from volvlp_ray.train.deepspeed import deepspeed_config, param_groups
    from volvlp_ray.train.elastic import checkpoint_world_size, load_resized

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokenizer = build_tokenizer(CORPUS, 200)
    loss_fn = build_loss("sigmoid")
    records = {}
    for stage in STAGES:
        cfg = Config()
        cfg.model.patch = [4, 16, 16]
        cfg.train.zero_stage, cfg.train.batch_size, cfg.train.steps, cfg.train.warmup_steps = stage, 2, 12, 2
        src = config["load_from"] and os.path.join(config["load_from"], f"zero{stage}")
        saved_world = checkpoint_world_size(Checkpoint.from_directory(src)) if src else world
        torch.manual_seed(0)
        model = build_model(cfg.model, tokenizer)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, 0.05), dist_init_required=False,
            config=deepspeed_config(cfg, False, load_universal=saved_world != world and stage > 0))
        use_safe_loading(engine)
        rec = {"saved_world": saved_world}
        if src:
            if saved_world == world:
                _, client = engine.load_checkpoint(src, tag="ckpt")
            else:
                _, client = load_resized(engine, src, "ckpt", stage, node_rank=ctx.get_node_rank(),
                                         local_rank=ctx.get_local_rank(), rank=rank)
            rec.update(loaded=_consolidated(engine, stage), client_step=client["step"],
                       loaded_lr=[g["lr"] for g in engine.optimizer.param_groups],
                       loaded_sched=scheduler.last_batch_iteration, loaded_global_steps=engine.global_steps)
        else:
            rec["initial"] = _consolidated(engine, stage, moments=False)
        g = torch.Generator().manual_seed(100 * config["phase"] + 10 * stage + rank)  # each worker its own batch
        enc = tokenizer(CORPUS[rank * 2:rank * 2 + 2], padding=True, return_tensors="pt")
        for _ in range(3):  # WarmupCosineLR: the first step has lr 0 (moments only), the next ones update
            out = engine(torch.randn(2, 1, 8, 32, 32, generator=g), None, enc["input_ids"], enc["attention_mask"])
            engine.backward(loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                                    out["logit_bias"]))
            engine.step()
        step = engine.global_steps
        dst = os.path.join(config["save_to"], f"zero{stage}")
        engine.save_checkpoint(dst, tag="ckpt", client_state={"step": step, "world_size": world})
        if rank == 0:
            Path(dst, "progress.json").write_text(json.dumps({"step": step, "world_size": world}))
        rec.update(saved=_consolidated(engine, stage), saved_lr=[g["lr"] for g in engine.optimizer.param_groups],
                   saved_sched=scheduler.last_batch_iteration, saved_step=step)
        records[stage] = rec
        del engine
        dist.barrier()
    if rank == 0:
        torch.save(records, os.path.join(config["save_to"], "records.pt"))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three Ray Train runs (measured 3-13 min on the loaded 2-core machine)
def test_zero_state_is_repartitioned_for_another_number_of_workers(ray_session, tmp_path):
    import sys

    import torch
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    phases = [2, 1, 2]  # workers per phase: 2 -> 1 -> 2
    for i, world in enumerate(phases):
        TorchTrainer(
            _elastic_loop,
            train_loop_config={"phase": i, "load_from": str(tmp_path / f"p{i - 1}") if i else None,
                               "save_to": str(tmp_path / f"p{i}")},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"elastic_p{i}", storage_path=str(tmp_path / "ray_results"),
                                 worker_runtime_env=env),
        ).fit()
    rec = [torch.load(tmp_path / f"p{i}" / "records.pt", weights_only=False) for i in range(len(phases))]
    for stage in STAGES:
        for i in (1, 2):
            before, after = rec[i - 1][stage], rec[i][stage]
            assert after["saved_world"] == phases[i - 1] != phases[i]
            assert after["client_step"] == before["saved_step"] == after["loaded_global_steps"] == 3 * i
            assert after["loaded_sched"] == before["saved_sched"] and after["loaded_lr"] == before["saved_lr"]
            assert before["saved"].keys() == after["loaded"].keys() and len(after["loaded"]) > 50
            for name, (w, m, v) in before["saved"].items():
                lw, lm, lv = after["loaded"][name]
                # the re-partitioned state is the saved state, bitwise: weights, first and second moments
                assert torch.equal(lw, w) and torch.equal(lm, m) and torch.equal(lv, v), (stage, i, name)
        first = rec[0][stage]
        trained = [n for n, (w, m, _) in first["saved"].items() if not torch.equal(w, first["initial"][n][0])
                   and bool(m.abs().sum() > 0)]
        assert len(trained) > 50, "the compared weights are trained ones (and the moments not zero)"


# -- the job: 2 workers -> killed -> 1 worker -> killed -> 2 workers, one run name -------------------------------

ROOT = Path(__file__).parents[1]
JOB_STEPS, EVERY = 12, 3
JOB_ARGS = ["train.batch_size=2", f"train.steps={JOB_STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
            "train.warmup_steps=4", "eval.at_end=false"]
RESUMED = re.compile(r"\[train\] resumed from step (\d+) \(epoch (\d+), (\d+) batches into it\)")


def _registered_step(ws: Path) -> int:
    """The step of the run's latest checkpoint that Ray Train has registered (0: none yet)."""
    try:
        snap = json.loads((ws / "ray_results" / "elastic" / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _killed_job(ws: Path, workers: int, trace: Path, kill_at: int) -> tuple[int, str, int]:
    """``jobs/pretrain.py`` on the tiny data with ``workers`` workers; the driver and all it started are
    SIGKILLed as soon as Ray Train has registered the checkpoint of step ``kill_at`` (or a later one).
    Returns (exit code, output, the latest registered checkpoint's step after the kill)."""
    import signal
    import subprocess
    import sys

    from clusterutil import kill_tree

    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"workspace={ws}", "run_name=elastic", f"scaling.num_workers={workers}", *JOB_ARGS]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VOLVLP_STEP_TRACE": str(trace)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    timer = threading.Timer(900, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    done = threading.Event()

    def killer() -> None:  # the checkpoint counts once registered (the controller lags the workers' reports)
        while not done.wait(0.1):
            if _registered_step(ws) >= kill_at:
                kill_tree(proc.pid)
                return

    threading.Thread(target=killer, daemon=True).start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        done.set()
        timer.cancel()
    return proc.returncode, out, _registered_step(ws)


def _trace(d: Path, through: int) -> list[dict]:
    """An attempt's step records (every rank) up to step ``through`` (later ones were lost with the kill)."""
    recs = [json.loads(line) for p in sorted(d.glob("rank_*.jsonl")) for line in p.read_text().splitlines()]
    return [r for r in recs if r["step"] <= through]


def _schedule_lrs() -> list[float]:
    """The LR an uninterrupted run logs at steps 1..JOB_STEPS: DeepSpeed's scheduler of ``deepspeed_config``."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from volvlp_ray.config import load_config
    from volvlp_ray.train.deepspeed import deepspeed_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", JOB_ARGS)
    ds = deepspeed_config(cfg, False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = WarmupCosineLR(opt, **ds["scheduler"]["params"])
    out = []
    for _ in range(JOB_STEPS):
        opt.step()
        sched.step()
        out.append(float(sched.get_last_lr()[0]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_job_resumes_on_another_number_of_workers(copy_tiny_workspace, tmp_path, pretrain_job):
    from mlflow.tracking import MlflowClient

    from volvlp_ray.config import load_config
    from volvlp_ray.data.pipeline import shard_files

    ws = copy_tiny_workspace(tmp_path / "ws")
    # A: 2 workers, killed once its checkpoint of step 3 is registered; B: 1 worker from it, killed at its checkpoint
    # of step 6; C: 2 workers from that one, to the end (nothing of it is killed: in this process, on the session's
    # Ray, conftest's pretrain_job)
    code, out_a, ckpt_a = _killed_job(ws, 2, tmp_path / "trace-a", kill_at=EVERY)
    assert code != 0 and ckpt_a == EVERY, out_a[-4000:]
    code, out_b, ckpt_b = _killed_job(ws, 1, tmp_path / "trace-b", kill_at=2 * EVERY)
    assert code != 0 and ckpt_b == 2 * EVERY, out_b[-4000:]
    out_c = pretrain_job(f"workspace={ws}", "run_name=elastic", "scaling.num_workers=2", *JOB_ARGS,
                         env={"VOLVLP_STEP_TRACE": str(tmp_path / "trace-c")}).ok().output
    assert f"[train] step {JOB_STEPS}/{JOB_STEPS}" in out_c

    resumed = []
    for out, old, new in ((out_b, 2, 1), (out_c, 1, 2)):
        m = RESUMED.search(out)
        assert m, out[-4000:]
        resumed.append(tuple(int(x) for x in m.groups()))
        assert f"[train] elastic resume: the checkpoint was written by {old} workers, this run has {new}" in out
        assert "checkpoint converted to DeepSpeed's universal checkpoint" in out  # ZeRO-2, the default
        assert f"continues on {new} workers (checkpoint of {old})" in out
    (r_b, epoch_b, _), (r_c, epoch_c, _) = resumed
    assert (r_b, r_c) == (ckpt_a, ckpt_b), "each attempt starts at its checkpoint's step"
    recs_b = _trace(tmp_path / "trace-b", r_c)
    recs_c = _trace(tmp_path / "trace-c", JOB_STEPS)
    assert min(r["step"] for r in recs_b) == r_b + 1 and min(r["step"] for r in recs_c) == r_c + 1
    # both checkpoints fell inside an epoch: the new number of workers went on with it
    assert any(r["epoch"] == epoch_b for r in recs_b) and any(r["epoch"] == epoch_c for r in recs_c)

    # the LR schedule continues: every step logged once, at the LR of an uninterrupted run
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'elastic'")
    lrs = {}
    for m in client.get_metric_history(run.info.run_id, "train/lr"):
        assert m.step not in lrs, f"step {m.step} logged twice"
        lrs[m.step] = m.value
    assert sorted(lrs) == list(range(1, JOB_STEPS + 1))
    np.testing.assert_allclose([lrs[s] for s in range(1, JOB_STEPS + 1)], _schedule_lrs(), rtol=1e-6)

    # the data: per epoch, what was trained (kept steps of all attempts) plus what was carried out of it is the
    # epoch's supply (the whole split plus what was carried in): no sample twice, none skipped
    recs = _trace(tmp_path / "trace-a", r_b) + recs_b + recs_c
    steps = Counter(r["step"] for r in recs)
    assert sorted(steps) == list(range(1, JOB_STEPS + 1))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={ws}"])
    split: Counter = Counter()  # the training split's keys, from its shards
    for path in shard_files(cfg, "train"):
        with tarfile.open(path) as tar:
            split.update(m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".volume.npy"))
    assert len(split) == cfg.data.num_volumes and max(split.values()) == 1
    carried: dict[int, Counter] = {}  # epoch -> the keys its pools started with (all ranks)
    for r in recs:
        if "carry" in r:
            carried.setdefault(r["epoch"], Counter()).update(r["carry"])
    ended = sorted({r["epoch"] for r in recs})[:-1]  # the epochs that ended within the run
    assert epoch_b in ended and epoch_c in ended, "the resized epochs are among the checked ones"
    for epoch in ended:
        trained = Counter(k for r in recs if r["epoch"] == epoch for k in r["keys"])
        assert trained + carried[epoch + 1] == split + carried.get(epoch, Counter()), epoch
