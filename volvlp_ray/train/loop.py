"""``train_loop_per_worker``: the whole training loop, one function, run by every Ray Train worker.

Per step: a padded batch from this worker's streaming split -> dual encoder (DeepSpeed engine) -> global
loss (the loss gathers features from all workers), plus ``loss.pair_weight`` times the local negation-pair loss
(true vs negated statements from each sample's text, see ``volvlp_ray.data.negation``) -> backward/step. Rank 0 logs step metrics to MLflow.
A step with non-finite loss/gradients on any rank is skipped by every rank alike (counted, logged); too many in a
row roll the run back to its latest checkpoint, too many rollbacks stop it (``volvlp_ray.train.badsteps``).
Every ``train.checkpoint_every`` steps and at the end, every rank saves its DeepSpeed shard, RNG states and
data position, and all report the checkpoint through ``ray.train.report``; the final checkpoint also holds
the consolidated export (``export/``, loadable with ``VLP.from_pretrained``).

Resuming (after a worker failure, or when the driver is started again with the same run name): model,
optimizer, LR schedule and step come from DeepSpeed's state (loaded with ``weights_only=True``), each rank's
RNG from ``worker_state/``, and the data position from ``progress.json``: the epoch's stream is replayed in
the same order (see ``volvlp_ray.data.pipeline.TrainDatasetFactory``) and the batches already trained on are
skipped. Step metrics already in MLflow are not logged again. On another number of workers (elastic resume,
``volvlp_ray.train.elastic``): ZeRO state re-partitioned through DeepSpeed's universal checkpoint, and the
interrupted epoch goes on without the samples already trained in it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from volvlp_ray.config import Config, config_from_dict, dump_yaml, same_study_mode

__all__ = ["build_loss_from_config", "train_loop_per_worker"]

log = logging.getLogger(__name__)
CKPT_TAG = "ckpt"
PROGRESS_FILE = "progress.json"


def build_loss_from_config(cfg: Config):
    from volvlp_ray.losses import build_loss

    exchange = "ring" if cfg.loss.ring else "gather"
    same = {"same_study": same_study_mode(cfg), "spatial_sigma_mm": cfg.loss.spatial_sigma_mm}
    if cfg.loss.kind == "clip":
        return build_loss("clip", **same)
    if cfg.loss.kind == "sigmoid":
        return build_loss("sigmoid", exchange=exchange, **same)
    return build_loss(
        "swca", alpha=cfg.loss.alpha, form=cfg.loss.form, spatial_weight=cfg.loss.spatial_weight,
        knowledge_weight=cfg.loss.knowledge_weight, intra_weight=cfg.loss.intra_weight, norm=cfg.loss.soft_norm,
        exchange=exchange if cfg.loss.form == "sigmoid" else "gather", **same,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class ReadyBatch:
    """What one training step consumes, made by the background producer: tensors already on the device, and
    what the host knows about them (no step reads anything back from the device)."""

    epoch: int
    batch_in_epoch: int
    step: int  # the global step it is trained at (before the increment)
    tensors: dict[str, torch.Tensor]
    depths: torch.Tensor | None  # host (B,) valid slices, only when some sample is padded (a mask is needed)
    samples: int
    vision_tokens: int  # patch tokens this rank's vision tower processes
    truncated: int
    pair_valid: float
    carry: list  # data.sampler=equal: its epoch's start (train.elastic.EpochStart: the rows it started with, ...)
    keys: list[str]  # the batch's sample keys (a checkpoint records those trained in the epoch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Setup; a producer of ready batches (background thread); per batch ``train_step``; around it the periodic
    work: logging, validation, checkpoints."""
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    from volvlp_ray.models import build_model
    from volvlp_ray.tracking import MetricLogger, unsent_metrics_path
    from volvlp_ray.train.badsteps import BadSteps
    from volvlp_ray.train.checkpoint import load_worker_state, use_safe_loading
    from volvlp_ray.train.deepspeed import deepspeed_config, param_groups
    from volvlp_ray.train.elastic import TrainedKeys
    from volvlp_ray.train.producer import BatchProducer, adopt

    from volvlp_ray import console

    cfg: Config = config_from_dict(loop_config["config"])
    if loop_config.get("console") is not None:  # the driver's relay: this worker's lines reach its console
        console.attach(loop_config["console"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # before DeepSpeed and the producer thread, which sets it for itself
    else:
        device = torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, cfg.scaling.cpus_per_worker))
    _seed_everything(cfg.seed)  # identical initial weights on every rank

    tokenizer = AutoTokenizer.from_pretrained(loop_config["tokenizer_dir"])
    model = build_model(cfg.model, tokenizer)
    if cfg.model.compile:
        from volvlp_ray.train.deepspeed import compile_blocks

        compile_blocks(model)
    loss_fn = build_loss_from_config(cfg)
    pairs = None
    if cfg.loss.negation_pairs:
        from volvlp_ray.data.negation import StatementBank

        pairs = StatementBank(tokenizer)

    # a checkpoint written by another number of workers (elastic resume, see train/elastic.py): under ZeRO 1-3 the
    # engine is built to load DeepSpeed's universal checkpoint, decided before it is built
    checkpoint = ray.train.get_checkpoint()
    saved_world = world
    if checkpoint:
        from volvlp_ray.train.elastic import check_resizable, checkpoint_world_size

        saved_world = checkpoint_world_size(checkpoint) or world
        if saved_world != world:
            check_resizable(cfg, saved_world, world)
    micro = cfg.train.grad_cache_micro_batch
    n_micro = 1
    ds_cfg = deepspeed_config(cfg, use_gpu, load_universal=saved_world != world and cfg.train.zero_stage > 0)
    if micro and micro < cfg.train.batch_size:
        n_micro = -(-cfg.train.batch_size // micro)
        ds_cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=n_micro)
    collective_timeouts(cfg.train.timeout_s)  # DeepSpeed's process groups, made in initialize, get train.timeout_s
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_cfg,
        dist_init_required=False,
    )
    use_safe_loading(engine)
    dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32

    step, start_epoch, skip_batches, epoch_start = 0, 0, 0, None
    if checkpoint:
        from volvlp_ray.train.elastic import load_resized, resume_data_position

        with checkpoint.as_directory() as d:
            if saved_world == world:
                load_path, client_state = engine.load_checkpoint(d, tag=CKPT_TAG)
            else:  # model and optimizer state re-partitioned for this number of workers
                if rank == 0:
                    console.info(f"[train] elastic resume: the checkpoint was written by {saved_world} workers, "
                                 f"this run has {world}")
                load_path, client_state = load_resized(engine, d, CKPT_TAG, cfg.train.zero_stage, rank=rank,
                                                       node_rank=ctx.get_node_rank(), local_rank=ctx.get_local_rank())
            if load_path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state under tag {CKPT_TAG!r}")
            worker_state = load_worker_state(d, rank)  # restores this rank's RNG streams
            # the interrupted epoch's start (carry, and on another number of workers the samples left out) and the
            # batches of it to skip
            epoch_start, skip_batches = resume_data_position(d, cfg, rank, world, saved_world, client_state)
        step = int(client_state["step"])
        start_epoch = int(client_state.get("epoch", 0))
        if worker_state is None and rank == 0:
            console.warn("[train] warning: the checkpoint has no RNG state for this rank (different world size?); "
                         "RNG streams start fresh")
        if rank == 0:
            console.info(f"[train] resumed from step {step} (epoch {start_epoch}, "
                         f"{int(client_state.get('batch_in_epoch', 0))} batches into it) from {checkpoint.path}")
    # non-finite loss/gradients: skipped steps, rollbacks (the steps recorded before one), the final stop
    bad = BadSteps(cfg, rank, loop_config.get("run_dir"), step)

    validator = None
    if cfg.eval.every > 0:
        from volvlp_ray.eval.validation import Validator

        # every rank embeds its share of the subset's batches, streamed from the shards, and gets everyone's
        # embeddings: every rank reports the same numbers to Ray Train (Tune's schedulers read them); under ZeRO-3 a
        # forward pass is collective, so every rank makes as many as the busiest one
        validator = Validator(cfg, loop_config["tokenizer_dir"], rank=rank, world=world,
                              collective_forward=cfg.train.zero_stage == 3, timeout_s=cfg.train.timeout_s)
        if rank == 0:
            console.info(f"[train] validation every {cfg.eval.every} steps on {len(validator)} held-out volumes")

    logger = None
    if rank == 0:
        # a background sender: a slow or restarting tracking server never holds rank 0 (and so every rank); what
        # it cannot deliver by the end is written to this file (`python -m volvlp_ray.tracking replay FILE`);
        # outage and recovery lines go to rank 0's stdout; retries at most every 10 s (a refused connection is cheap)
        unsent = unsent_metrics_path(cfg, loop_config["run_id"])
        logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"], fallback_path=unsent, console=True,
                              backoff_max_s=10.0)
        logger.skip_logged_steps("train/loss")  # after a resume: steps already in MLflow are not logged twice
        if bad.rollbacks:  # steps before a rollback were logged (a NaN loss is not, so train/loss cannot tell)
            logger.skip_through = max(logger.skip_through, bad.logged_through)

    if step >= cfg.train.steps:
        # a finished run started again (a driver rerun, a resumed sweep trial): nothing to train; report the
        # final state once more so that whoever waits on this run (Tune) gets its metrics
        if rank == 0:
            console.info(f"[train] the run already reached step {step}; nothing to train")
        val = validator.run(engine.module) if validator is not None else {}
        ray.train.report({"step": step, "epoch": start_epoch, **val})
        _close(logger)
        return

    stream = TrainStream(cfg, ray.train.get_dataset_shard("train"), tokenizer, pairs, rank, world,
                         first_step=step, epoch=start_epoch, skip=skip_batches, start=epoch_start)
    # on a GPU the producer's batches are already on the device: one ready ahead (plus the one being made and the
    # one in the step: 3 batches of device memory); on the CPU two ahead
    batches = BatchProducer(stream, _Prepare(cfg, device, use_gpu, pairs, rank), depth=1 if use_gpu else 2,
                            name=f"training batches (rank {rank})", timeout_s=cfg.train.timeout_s)
    train_step = _train_step_fn(cfg, engine, loss_fn, dtype, n_micro, micro, rank)
    trace = _StepTrace(rank, loss_fn)  # test-only: VOLVLP_STEP_TRACE
    window = _Window(batches)
    trained = TrainedKeys()  # the keys trained in the current epoch (a resume on another number of workers skips them)
    try:
        for b in batches:
            replayed = bad.is_replayed_bad_step(step + 1)
            if replayed:  # recorded as bad before a rollback: the batch is consumed, not trained on
                adopt(b.tensors)
                loss, pair_loss = torch.full((), float("nan"), device=device), None
                engine.skipped_steps += 1  # counted (and checkpointed) with DeepSpeed's own skipped steps
            else:
                loss, pair_loss = train_step(adopt(b.tensors), b.depths, step + 1)
            step += 1
            # DeepSpeed skipped the update (non-finite global gradient norm): a host bool, the same on every rank
            skipped = replayed or not engine.was_step_applied()
            window.add(b, world, pair_loss, skipped, trained=not replayed)
            trained.add(b.epoch, b.carry, b.keys)
            trace.write(step, b, engine.module)
            bad.after_step(step, skipped, replayed)  # past train.max_bad_steps in a row: raises (rollback / stop)
            final = step >= cfg.train.steps

            if step % cfg.train.log_every == 0 or final:
                metrics = window.metrics(loss, world, scheduler, engine.module, cfg, b.epoch, engine.skipped_steps)
                if logger:
                    logger.log(metrics, step)
                    fields = {"loss": round(metrics["train/loss"], 4), "lr": f"{metrics['train/lr']:.2e}",
                              "samples/s": round(metrics["train/samples_per_s"], 1)}
                    if "train/pair_loss" in metrics:
                        fields["pair"] = round(metrics["train/pair_loss"], 3)
                    relayed = console.step(step, cfg.train.steps, **fields)  # the driver's training bar
                    if not relayed or console.is_verbose():  # else a line here (Ray forwards it with --verbose)
                        pair_txt = f" (pair {metrics['train/pair_loss']:.3f})" if "train/pair_loss" in metrics else ""
                        print(f"[train] step {step}/{cfg.train.steps} loss {metrics['train/loss']:.4f}{pair_txt} "
                              f"lr {metrics['train/lr']:.2e} scale {metrics['train/logit_scale']:.1f} "
                              f"{metrics['train/samples_per_s']:.1f} samples/s", flush=True)
            val: dict[str, float] = {}
            # validation also at checkpoints, so that every report to Ray Train (and Tune) carries the metrics
            if validator is not None and (step % cfg.eval.every == 0 or step % cfg.train.checkpoint_every == 0
                                          or final):
                val = validator.run(engine.module)
                if logger:
                    logger.log(val, step)
                    console.info(f"[val] step {step}: t2v MRR {val['val/t2v/mrr']:.3f}, zero-shot mean AUROC "
                                 f"{val['val/zeroshot/mean/auroc']:.3f} ({val['val/seconds']:.1f}s)")
            if step % cfg.train.checkpoint_every == 0 or final:
                _save_and_report(engine, cfg, step, float(loss), rank, final, tokenizer, epoch=b.epoch,
                                 batch_in_epoch=b.batch_in_epoch, carry=b.carry, trained=trained.keys, world=world,
                                 extra=val)
                bad.checkpointed(step)
            elif val:
                ray.train.report({"step": step, "loss": float(loss), "epoch": b.epoch, **val})
            if final:
                break
    finally:
        batches.close()
        _close(logger)


def _close(logger) -> None:
    if logger is not None and hasattr(logger, "close"):
        logger.close()


def _train_step_fn(cfg: Config, engine, loss_fn, dtype: torch.dtype, n_micro: int, micro: int, rank: int = 0):
    """``train_step(tensors, depths, step) -> (loss, pair_loss)``: forward, global loss, backward, optimizer step
    of global step ``step`` (1-based). Nothing in it reads a value back from the device (the loss stays a tensor).

    A non-finite loss on any rank makes the step's global gradient norm non-finite on every rank, and DeepSpeed
    then skips the update (``engine.was_step_applied()`` is False, the LR schedule does not advance), in every
    ZeRO stage and with grad-cache: see ``volvlp_ray.train.badsteps``. ``VOLVLP_INJECT_NAN`` (test-only) makes
    this rank's loss NaN at the steps it names."""
    from volvlp_ray.data.pipeline import normalise_tensor
    from volvlp_ray.losses import negation_pair_loss
    from volvlp_ray.train.badsteps import NanInjection, finite_or_nan, skip_non_finite_plain_steps

    hu_window = tuple(cfg.data.hu_window)
    inject = NanInjection.from_env(rank)
    skip_non_finite_plain_steps(engine)  # ZeRO-0 fp32: DeepSpeed's plain optimizer would apply a NaN update

    def volume_of(t: dict[str, torch.Tensor]) -> torch.Tensor:
        if t["volume"].dtype == torch.int16:  # int16 HU -> [-1, 1], on the device (data.normalise_in=device)
            return normalise_tensor(t["volume"], hu_window, dtype)
        return t["volume"].to(dtype)  # normalised by the loader

    if n_micro > 1:
        from volvlp_ray.losses import GradCache

        def backward(surrogate: torch.Tensor, is_last: bool) -> None:
            engine.backward(surrogate * n_micro)  # undo DeepSpeed's 1/gradient_accumulation_steps scaling
            engine.step()  # applies the update at the accumulation boundary (the last micro-batch) only

        at = {"step": 0}

        def checked_loss(*args, **kwargs) -> torch.Tensor:  # non-finite -> non-finite feature gradients
            return finite_or_nan(loss_fn(*args, **kwargs), inject.fires(at["step"]))

        grad_cache = GradCache(
            lambda im: engine.module.encode_image(im["volume"], im.get("depths")),
            lambda tx: engine.module.encode_text(tx["input_ids"], tx["attention_mask"]),
            checked_loss, micro, backward_fn=backward,
        )

        def cached_step(t: dict[str, torch.Tensor], depths: torch.Tensor | None, step: int = 0):
            at["step"] = step
            m = engine.module
            image = {"volume": volume_of(t), **({"depths": depths} if depths is not None else {})}
            loss = grad_cache.step(image, {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]},
                                   m.logit_scale.exp().squeeze(0), m.logit_bias.squeeze(0),
                                   **{k: t[k] for k in loss_fn.meta_keys})
            return loss, None

        return cached_step

    def train_step(t: dict[str, torch.Tensor], depths: torch.Tensor | None, step: int = 0):
        pair = "pair_ids" in t
        out = engine(volume_of(t), depths, t["input_ids"], t["attention_mask"],
                     *((t["pair_ids"], t["pair_mask"]) if pair else ()))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                       **{k: t[k] for k in loss_fn.meta_keys})
        pair_loss = None
        if pair:
            pair_loss = negation_pair_loss(out["image_features"], out["pair_features"], t["pair_valid"],
                                           out["logit_scale"])
            loss = loss + cfg.loss.pair_weight * pair_loss
        loss = finite_or_nan(loss, inject.fires(step))
        engine.backward(loss)
        engine.step()
        return loss.detach(), None if pair_loss is None else pair_loss.detach()

    return train_step


class TrainStream:
    """This rank's training batches, host side, in the producer thread: Ray Data's stream of rows -> the batches
    of ``data.sampler`` -> numpy batches, positioned at (``epoch``, ``skip``) for a resumed run and ending after
    the batches that ``train.steps`` needs (every rank makes the same number of agreements). ``start``: the
    resumed epoch's ``EpochStart`` (``train/elastic.py``; a plain ``carry`` list is one): its pools' first rows, the
    keys its stream leaves out (trained before a resume on another number of workers) and the number of its batches
    trained before this stream began (``batch_in_epoch`` continues from it; ``skip`` counts from it too).

    ``data.sampler=equal`` (``data/sampler.py``): every rank's batch in a step has the same z-length (agreed over a
    gloo group of its own, so the agreement never interleaves with the step's collectives in the main thread),
    cut at batch time. ``bucket``: per-rank depth bucketing (padding to each batch's deepest sample)."""

    def __init__(self, cfg: Config, shard, tokenizer, pairs, rank: int, world: int, *, first_step: int, epoch: int,
                 skip: int, carry: list | None = None, start: list | None = None):
        from volvlp_ray.data.pipeline import StepBatcher
        from volvlp_ray.train.elastic import EpochStart

        self.cfg, self.shard, self.pairs, self.rank, self.world = cfg, shard, pairs, rank, world
        self.first_step, self.epoch, self.skip = first_step, epoch, skip
        start = start if start is not None else carry
        self.start = start if isinstance(start, EpochStart) else EpochStart(start or [])
        self.batcher = StepBatcher(cfg, tokenizer)
        # the current epoch's start (an EpochStart: its carry, ...), handed along with each of its batches
        self._carry: list = EpochStart()
        self.sampler = None
        self.comm = None
        if cfg.data.sampler == "equal":
            from volvlp_ray.data.sampler import LocalComm

            # a gloo group of its own, created here in the main thread by every rank in the same order (a
            # collective): the producer thread's agreements never interleave with the step's collectives
            self.comm = GlooComm(dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.train.timeout_s)),
                                 rank, world) if world > 1 else LocalComm()

    def _epoch_batches(self, epoch: int):
        from volvlp_ray.data.bucketing import rebatch

        cfg, rank = self.cfg, self.rank
        b = cfg.train.batch_size
        equal = cfg.data.sampler == "equal"
        pool = 1 if equal else cfg.data.bucket_pool
        # exact sizes (rebatch): every worker gets as many rows per epoch (Ray Train's equal split), so every
        # worker takes as many steps; a short batch mid-stream would leave one waiting in a collective
        batches = rebatch(self.shard.iter_batches(
            batch_size=b * pool, batch_format="numpy", drop_last=pool == 1 and not equal,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch + 1000 * rank, prefetch_batches=2 if pool == 1 else 1,
        ), b * pool, drop_last=pool == 1 and not equal)
        if equal:
            from volvlp_ray.data.sampler import EqualTokenSampler, equal_token_steps, rows_of
            from volvlp_ray.train.elastic import EpochStart, drop_keys

            pz = cfg.model.patch[0]
            if self.sampler is None:
                self.sampler = EqualTokenSampler(
                    b, pz, cfg.data.text_mode, (cfg.data.chunk_depth[0] // pz, cfg.data.chunk_depth[1] // pz),
                    pool_rows=cfg.data.pool_batches * b, max_pool=cfg.data.max_pool_batches * b, seed=cfg.seed,
                    rank=rank, chunks_per_row=cfg.data.chunks_per_volume, overlap=cfg.data.chunk_overlap)
                start = self.start
            else:
                start = EpochStart(self.sampler.pool)  # what the last epoch left
            self._carry = start  # travels with each batch: the producer runs ahead of the checkpointing loop
            rows = (r for batch in batches for r in rows_of(batch))
            if start.excluded:  # trained before a resume on another number of workers
                rows = drop_keys(rows, start.excluded)
            for plan in equal_token_steps(self.sampler, rows, self.comm, epoch, list(start), first_step=start.base):
                yield plan
        else:
            from volvlp_ray.data.bucketing import bucket_by_depth

            if pool > 1:  # depth bucketing (see volvlp_ray.data.bucketing); as many batches as drop_last gives
                batches = bucket_by_depth(batches, b, np.random.default_rng([cfg.seed, epoch, rank, 5]))
            yield from batches

    def __iter__(self):
        needed = self.cfg.train.steps - self.first_step
        produced, empty_epochs = 0, 0
        for epoch in itertools.count(self.epoch):
            n = 0
            base = self.start.base if epoch == self.epoch else 0
            for n, item in enumerate(self._epoch_batches(epoch), 1):
                if epoch == self.epoch and n <= self.skip:
                    continue  # trained on before the checkpoint: the sampler's state advances, no voxels read
                batch = self.batcher(item) if self.cfg.data.sampler == "equal" else item
                yield epoch, base + n, self.first_step + produced, batch, self._carry
                produced += 1
                if produced >= needed:
                    return
            empty_epochs = empty_epochs + 1 if n == 0 else 0
            if empty_epochs >= 3:
                raise RuntimeError(
                    f"three epochs in a row gave no batch of {self.cfg.train.batch_size} rows per worker: the "
                    "training split is too small for train.batch_size x scaling.num_workers")


def collective_timeouts(seconds: int) -> None:
    """Process groups created from now on without a timeout of their own (DeepSpeed's copy of the world group, on
    which ZeRO gathers and reduces) time out after ``seconds`` (``train.timeout_s``) instead of torch's default
    (30 min for gloo, 10 for NCCL): a rank left waiting for a peer raises instead of hanging."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


class GlooComm:
    """``data.sampler``'s ``Comm`` over a gloo process group: host tensors, no device involved."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

    def all_gather(self, v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v))
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts).numpy()

    def exchange(self, rows: list) -> list[list]:
        out: list = [None] * self.world
        dist.all_gather_object(out, rows, group=self.group)
        return out


class _Prepare:
    """In the producer thread: a numpy batch -> ``ReadyBatch`` (voxels read into a reused, on a GPU pinned,
    buffer; negation pairs drawn; tensors copied to the device on a side stream)."""

    def __init__(self, cfg: Config, device: torch.device, use_gpu: bool, pairs, rank: int):
        self.cfg, self.device, self.pin, self.pairs, self.rank = cfg, device, use_gpu, pairs, rank
        self.stream = torch.cuda.Stream(device) if use_gpu else None
        self._device_set = False
        self.grid_yx = (cfg.data.in_plane_size // cfg.model.patch[1]) * (cfg.data.in_plane_size // cfg.model.patch[2])

    def __call__(self, item) -> ReadyBatch:
        from volvlp_ray.data.pipeline import collate
        from volvlp_ray.train.producer import to_device

        epoch, n, step, np_batch, carry = item
        # a volume's K chunks (data.chunks_per_volume) are K consecutive rows: it was trained once
        keys = [str(k) for k in np_batch["key"]][::self.cfg.data.chunks_per_volume] if "key" in np_batch else []
        if self.stream is not None and not self._device_set:  # the CUDA device is per thread
            torch.cuda.set_device(self.device)
            self._device_set = True
        cfg = self.cfg
        pz = cfg.model.patch[0]
        t = collate(np_batch, pz, tuple(cfg.data.hu_window), hu=True, pin=self.pin)
        depths = t.pop("depths")
        d = t["volume"].shape[2]
        padded = bool((depths < d).any())  # decided on the host: a mask only when some sample is padded
        b = t["volume"].shape[0]
        pair_valid = 0.0
        if "findings" in t and self.pairs is not None:
            # drawn from (seed, rank, step): a resumed run draws the same statements at the same step
            drawn = self.pairs.sample(t.pop("findings").numpy(), cfg.loss.negation_pairs,
                                      np.random.default_rng([cfg.seed, self.rank, step, 11]))
            t.update({k: torch.from_numpy(v) for k, v in drawn.items()})
            pair_valid = float(drawn["pair_valid"].mean())
        else:
            t.pop("findings", None)
        truncated = int(t.pop("text_truncated").sum())
        t = to_device(t, self.device, self.stream)
        return ReadyBatch(epoch=epoch, batch_in_epoch=n, step=step, tensors=t, depths=depths if padded else None,
                          samples=b, vision_tokens=b * (d // pz) * self.grid_yx, truncated=truncated,
                          pair_valid=pair_valid, carry=carry, keys=keys)


class _Window:
    """Host-side counters between two log steps (nothing is read from the device except the logged loss)."""

    def __init__(self, batches):
        self.batches = batches
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.samples, self.truncated, self.steps, self.skipped = now, 0, 0, 0, 0
        self.wait0 = self.batches.wait_seconds
        self.pair_losses: list[torch.Tensor] = []
        self.pair_valid = 0.0

    def add(self, b: ReadyBatch, world: int, pair_loss: torch.Tensor | None, skipped: bool = False,
            trained: bool = True) -> None:
        if trained:  # not a batch left out on a replay: it took no time
            self.samples += b.samples * world
            self.truncated += b.truncated
        self.steps += 1
        self.skipped += int(skipped)
        self.pair_valid += b.pair_valid
        if pair_loss is not None and not skipped:
            self.pair_losses.append(pair_loss)

    def metrics(self, loss: torch.Tensor, world: int, scheduler, module, cfg: Config, epoch: int,
                skipped_total: int = 0) -> dict[str, float]:
        """The logged metrics (one all-reduce of the loss and one read-back: periodic work, not every step).
        ``train/loss`` is that of the last step (NaN, and so not logged, when that step was skipped);
        ``train/skipped_steps``: steps whose update was skipped (non-finite loss/gradients, or replayed after a
        rollback) in the run so far, ``skipped_total``; ``train/skipped_steps_window``: since the last log step."""
        global_loss = loss.float().clone()
        if dist.is_initialized():
            dist.all_reduce(global_loss)
            global_loss /= world
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        metrics = {
            "train/loss": global_loss.item(),
            "train/lr": float(scheduler.get_last_lr()[0]) if scheduler else cfg.train.lr,
            "train/logit_scale": float(module.logit_scale.detach().float().exp()),
            "train/logit_bias": float(module.logit_bias.detach().float()),
            "train/samples_per_s": self.samples / elapsed,
            "train/data_wait_fraction": (self.batches.wait_seconds - self.wait0) / elapsed,
            "train/text_truncated_fraction": self.truncated * world / max(self.samples, 1),
            "train/epoch": float(epoch),
            "train/skipped_steps": float(skipped_total),
            "train/skipped_steps_window": float(self.skipped),
        }
        if self.pair_losses:
            # rank 0's mean over the steps since the last log (the loss above includes it, weighted)
            metrics["train/pair_loss"] = float(torch.stack(self.pair_losses).float().mean())
            metrics["train/pair_coverage"] = self.pair_valid / max(self.steps, 1)
        self.reset(now)
        return metrics


class _StepTrace:
    """Test-only: with ``VOLVLP_STEP_TRACE=DIR`` each rank appends one JSON line per step to
    ``DIR/rank_{rank}.jsonl``: the volume's shape, the vision tokens, whether a padding mask was built, how
    many attention calls received a mask (the model's own counter) and the loss module (``repr``: its kind and
    exchange), the batch's sample keys and, on an epoch's first batch, those of the rows its pool started with
    (``carry``). With ``VOLVLP_STEP_TRACE_BATCHES=N`` as well, the tensors of the first N steps' batches (as the
    step consumed them: int16 HU volume, ``depths``, tokens, metadata) go to ``DIR/batch_rank{rank}_step{step}.pt``,
    so that a test can recompute a step from the same inputs."""

    def __init__(self, rank: int, loss_fn=None):
        d = os.environ.get("VOLVLP_STEP_TRACE")
        self.path = os.path.join(d, f"rank_{rank}.jsonl") if d else None
        self.dir, self.rank = d, rank
        self.loss = repr(loss_fn) if loss_fn is not None else None
        self.batches = int(os.environ.get("VOLVLP_STEP_TRACE_BATCHES", "0") or 0) if d else 0
        if d:
            os.makedirs(d, exist_ok=True)

    def write(self, step: int, b: ReadyBatch, module) -> None:
        if self.path is None:
            return
        vision = getattr(module, "vision", None)
        rec = {"step": step, "rank": self.rank, "shape": list(b.tensors["volume"].shape),
               "vision_tokens": b.vision_tokens, "mask_built": b.depths is not None,
               "masked_attention_calls": int(getattr(vision, "masked_attention_calls", -1)),
               "epoch": b.epoch, "batch_in_epoch": b.batch_in_epoch, "loss": self.loss, "keys": b.keys}
        if b.batch_in_epoch == 1:  # an epoch's first batch: the keys of the rows its pool started with
            rec["carry"] = [str(r["key"]) for r in b.carry]
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if step <= self.batches:
            tensors = {k: v.detach().cpu().clone() for k, v in b.tensors.items()}
            if b.depths is not None:
                tensors["depths"] = b.depths.clone()
            torch.save(tensors, os.path.join(self.dir, f"batch_rank{self.rank}_step{step}.pt"))


def _save_and_report(engine, cfg: Config, step: int, loss: float, rank: int, final: bool, tokenizer, *,
                     epoch: int, batch_in_epoch: int, carry: list | None = None, trained: list[str] | None = None,
                     world: int = 1, extra: dict[str, float] | None = None) -> None:
    """Every rank writes its DeepSpeed shard and its RNG/data state to a local folder; ``ray.train.report``
    uploads them into one checkpoint directory in storage, registered once every rank's upload is done.
    ``world_size`` (and with ``data.sampler=equal`` each rank's epoch start and trained keys, see
    ``train/elastic.py``) let a run resume on another number of workers."""
    import ray.train
    from ray.train import Checkpoint

    from volvlp_ray.train.checkpoint import save_worker_state

    position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
    progress = {**position, "world_size": world, "epoch_base": int(getattr(carry, "base", 0))}
    with tempfile.TemporaryDirectory(prefix="volvlp-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=progress)
        save_worker_state(tmp, rank, **position)
        if cfg.data.sampler == "equal":  # the epoch's start and what was trained in it: replayed / left out on resume
            from volvlp_ray.train.elastic import save_data_position

            save_data_position(tmp, rank, carry if carry is not None else [], trained or [])
        if final:
            _export(engine, cfg, rank, tokenizer, os.path.join(tmp, "export"))
        if rank == 0:
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))
            with open(os.path.join(tmp, PROGRESS_FILE), "w") as f:
                json.dump(progress, f)
        ray.train.report({"step": step, "loss": loss, "epoch": epoch, **(extra or {})},
                         checkpoint=Checkpoint.from_directory(tmp))


def _export(engine, cfg: Config, rank: int, tokenizer, path: str) -> None:
    """Consolidated weights (gathered under ZeRO-3) -> ``VLP.save_pretrained`` on rank 0."""
    import deepspeed

    from volvlp_ray.config import config_to_dict

    model = engine.module
    params = list(model.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.train.zero_stage == 3 else None
    if ctx:
        ctx.__enter__()
    try:
        if rank == 0:
            model.save_pretrained(path, tokenizer=tokenizer, config=config_to_dict(cfg))
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
