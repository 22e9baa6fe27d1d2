"""``train_loop_per_worker``: the whole training loop, one function, run by every Ray Train worker.

Per step: a padded batch from this worker's streaming split -> dual encoder (DeepSpeed engine) -> global
loss (the loss gathers features from all workers), plus ``loss.pair_weight`` times the local negation-pair loss
(true vs negated statements from each sample's text, see ``volvlp_ray.data.negation``) -> backward/step. Rank 0 logs step metrics to MLflow.
Every ``train.checkpoint_every`` steps and at the end, every rank saves its DeepSpeed shard, RNG states and
data position, and all report the checkpoint through ``ray.train.report``; the final checkpoint also holds
the consolidated export (``export/``, loadable with ``VLP.from_pretrained``).

Resuming (after a worker failure, or when the driver is started again with the same run name): model,
optimizer, LR schedule and step come from DeepSpeed's state (loaded with ``weights_only=True``), each rank's
RNG from ``worker_state/``, and the data position from ``progress.json``: the epoch's stream is replayed in
the same order (see ``volvlp_ray.data.pipeline.TrainDatasetFactory``) and the batches already trained on are
skipped. Step metrics already in MLflow are not logged again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from volvlp_ray.config import Config, config_from_dict, dump_yaml

__all__ = ["build_loss_from_config", "train_loop_per_worker"]

log = logging.getLogger(__name__)
CKPT_TAG = "ckpt"
PROGRESS_FILE = "progress.json"


def build_loss_from_config(cfg: Config):
    from volvlp_ray.losses import build_loss

    exchange = "ring" if cfg.loss.ring else "gather"
    if cfg.loss.kind == "clip":
        return build_loss("clip")
    if cfg.loss.kind == "sigmoid":
        return build_loss("sigmoid", exchange=exchange)
    return build_loss(
        "swca", alpha=cfg.loss.alpha, form=cfg.loss.form, spatial_weight=cfg.loss.spatial_weight,
        knowledge_weight=cfg.loss.knowledge_weight, intra_weight=cfg.loss.intra_weight,
        spatial_sigma_mm=cfg.loss.spatial_sigma_mm, exchange=exchange if cfg.loss.form == "sigmoid" else "gather",
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    from volvlp_ray.data.bucketing import bucket_by_depth, rebatch
    from volvlp_ray.data.pipeline import collate, normalise_tensor
    from volvlp_ray.models import build_model
    from volvlp_ray.tracking import MetricLogger
    from volvlp_ray.train.checkpoint import load_worker_state, use_safe_loading
    from volvlp_ray.train.deepspeed import deepspeed_config, param_groups

    cfg: Config = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
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
        from volvlp_ray.losses import negation_pair_loss

        pairs = StatementBank(tokenizer)

    micro = cfg.train.grad_cache_micro_batch
    n_micro = 1
    ds_cfg = deepspeed_config(cfg, use_gpu)
    if micro and micro < cfg.train.batch_size:
        n_micro = -(-cfg.train.batch_size // micro)
        ds_cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=n_micro)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_cfg,
        dist_init_required=False,
    )
    use_safe_loading(engine)
    dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32

    step, start_epoch, skip_batches = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_path, client_state = engine.load_checkpoint(d, tag=CKPT_TAG)
            if load_path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state under tag {CKPT_TAG!r}")
            worker_state = load_worker_state(d, rank)  # restores this rank's RNG streams
        step = int(client_state["step"])
        start_epoch, skip_batches = int(client_state.get("epoch", 0)), int(client_state.get("batch_in_epoch", 0))
        if worker_state is None and rank == 0:
            print("[train] warning: the checkpoint has no RNG state for this rank (different world size?); "
                  "RNG streams start fresh", flush=True)
        if rank == 0:
            print(f"[train] resumed from step {step} (epoch {start_epoch}, {skip_batches} batches into it) "
                  f"from {checkpoint.path}", flush=True)

    validator = None
    if cfg.eval.every > 0:
        from volvlp_ray.eval.validation import Validator

        # every rank holds the subset and runs it: under ZeRO-3 a forward pass is collective, and every rank
        # then reports the same numbers to Ray Train (Tune's schedulers read them)
        validator = Validator(cfg, loop_config["tokenizer_dir"])
        if rank == 0:
            print(f"[train] validation every {cfg.eval.every} steps on {len(validator)} held-out volumes", flush=True)

    logger = None
    if rank == 0:
        logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"])
        logger.skip_logged_steps("train/loss")  # after a resume: steps already in MLflow are not logged twice
    shard = ray.train.get_dataset_shard("train")
    hu_window = tuple(cfg.data.hu_window)
    patch_z = cfg.model.patch[0]
    grad_cache = None
    if n_micro > 1:
        from volvlp_ray.losses import GradCache

        def backward(surrogate: torch.Tensor, is_last: bool) -> None:
            engine.backward(surrogate * n_micro)  # undo DeepSpeed's 1/gradient_accumulation_steps scaling
            engine.step()  # applies the update at the accumulation boundary (the last micro-batch) only

        grad_cache = GradCache(
            lambda im: engine.module.encode_image(im["volume"], im["depths"]),
            lambda tx: engine.module.encode_text(tx["input_ids"], tx["attention_mask"]),
            loss_fn, micro, backward_fn=backward,
        )

    t_last, samples_since, wait_time, truncated = time.perf_counter(), 0, 0.0, 0
    pair_loss_sum, pair_valid_sum, steps_since = 0.0, 0.0, 0
    done = step >= cfg.train.steps
    if done:
        # a finished run started again (a driver rerun, a resumed sweep trial): nothing to train; report the
        # final state once more so that whoever waits on this run (Tune) gets its metrics
        if rank == 0:
            print(f"[train] the run already reached step {step}; nothing to train", flush=True)
        val = validator.run(engine.module) if validator is not None else {}
        ray.train.report({"step": step, "epoch": start_epoch, **val})
    for epoch in itertools.count(start_epoch):
        if done:
            break
        t_wait = time.perf_counter()
        pool = cfg.data.bucket_pool
        # exact sizes (rebatch): every worker gets as many rows per epoch (Ray Train's equal split), so every
        # worker takes as many steps; a short batch mid-stream would leave one waiting in a collective
        batches = rebatch(shard.iter_batches(
            batch_size=cfg.train.batch_size * pool, batch_format="numpy", drop_last=pool == 1,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch + 1000 * rank, prefetch_batches=2 if pool == 1 else 1,
        ), cfg.train.batch_size * pool, drop_last=pool == 1)
        if pool > 1:  # depth bucketing (see volvlp_ray.data.bucketing); as many batches as drop_last gives
            batches = bucket_by_depth(batches, cfg.train.batch_size, np.random.default_rng([cfg.seed, epoch, rank, 5]))
        batch_in_epoch = 0
        for np_batch in batches:
            batch_in_epoch += 1
            if epoch == start_epoch and batch_in_epoch <= skip_batches:
                if batch_in_epoch == 1 and rank == 0:
                    print(f"[train] skipping the {skip_batches} batches of epoch {epoch} trained on before the "
                          "checkpoint", flush=True)
                t_wait = time.perf_counter()
                continue
            wait_time += time.perf_counter() - t_wait
            b = {k: v.to(device, non_blocking=True) for k, v in collate(np_batch, patch_z, hu_window, hu=True).items()}
            if b["volume"].dtype == torch.int16:  # int16 HU -> [-1, 1], on the device (data.normalise_in=device)
                b["volume"] = normalise_tensor(b["volume"], hu_window, dtype)
            else:  # normalised by the loader
                b["volume"] = b["volume"].to(dtype)
            meta = {k: b[k] for k in loss_fn.meta_keys}
            if grad_cache is None:
                pair_inputs = {}
                if pairs is not None:
                    # drawn from (seed, rank, step): a resumed run draws the same statements at the same step
                    drawn = pairs.sample(np.stack(list(np_batch["findings"])), cfg.loss.negation_pairs,
                                         np.random.default_rng([cfg.seed, rank, step, 11]))
                    pair_inputs = {k: torch.from_numpy(v).to(device) for k, v in drawn.items()}
                out = engine(b["volume"], b["depths"], b["input_ids"], b["attention_mask"],
                             *((pair_inputs["pair_ids"], pair_inputs["pair_mask"]) if pair_inputs else ()))
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                               **meta)
                if pair_inputs:
                    pair_loss = negation_pair_loss(out["image_features"], out["pair_features"],
                                                   pair_inputs["pair_valid"], out["logit_scale"])
                    pair_loss_sum += pair_loss.detach()  # a tensor: no device sync per step
                    pair_valid_sum += float(drawn["pair_valid"].mean())
                    loss = loss + cfg.loss.pair_weight * pair_loss
                engine.backward(loss)
                engine.step()
                loss = loss.detach()
            else:
                m = engine.module
                loss = grad_cache.step(
                    {"volume": b["volume"], "depths": b["depths"]},
                    {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
                    m.logit_scale.exp().squeeze(0), m.logit_bias.squeeze(0), **meta,
                )
            step += 1
            steps_since += 1
            samples_since += b["volume"].shape[0] * world
            truncated += int(b["text_truncated"].sum())

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                global_loss = loss.float().clone()
                if dist.is_initialized():
                    dist.all_reduce(global_loss)
                    global_loss /= world
                now = time.perf_counter()
                m = engine.module
                metrics = {
                    "train/loss": global_loss.item(),
                    "train/lr": float(scheduler.get_last_lr()[0]) if scheduler else cfg.train.lr,
                    "train/logit_scale": float(m.logit_scale.detach().float().exp()),
                    "train/logit_bias": float(m.logit_bias.detach().float()),
                    "train/samples_per_s": samples_since / max(now - t_last, 1e-9),
                    "train/data_wait_fraction": wait_time / max(now - t_last, 1e-9),
                    "train/text_truncated_fraction": truncated * world / max(samples_since, 1),
                    "train/epoch": float(epoch),
                }
                if pairs is not None and grad_cache is None:
                    # rank 0's mean over the steps since the last log (the loss above includes it, weighted)
                    metrics["train/pair_loss"] = float(pair_loss_sum) / max(steps_since, 1)
                    metrics["train/pair_coverage"] = pair_valid_sum / max(steps_since, 1)
                if logger:
                    logger.log(metrics, step)
                    pair_txt = f" (pair {metrics['train/pair_loss']:.3f})" if "train/pair_loss" in metrics else ""
                    print(f"[train] step {step}/{cfg.train.steps} loss {metrics['train/loss']:.4f}{pair_txt} "
                          f"lr {metrics['train/lr']:.2e} scale {metrics['train/logit_scale']:.1f} "
                          f"{metrics['train/samples_per_s']:.1f} samples/s", flush=True)
                t_last, samples_since, wait_time, truncated = now, 0, 0.0, 0
                pair_loss_sum, pair_valid_sum, steps_since = 0.0, 0.0, 0

            final = step >= cfg.train.steps
            val: dict[str, float] = {}
            # validation also at checkpoints, so that every report to Ray Train (and Tune) carries the metrics
            if validator is not None and (step % cfg.eval.every == 0 or step % cfg.train.checkpoint_every == 0
                                          or final):
                val = validator.run(engine.module)
                if logger:
                    logger.log(val, step)
                    print(f"[val] step {step}: t2v MRR {val['val/t2v/mrr']:.3f}, zero-shot mean AUROC "
                          f"{val['val/zeroshot/mean/auroc']:.3f} ({val['val/seconds']:.1f}s)", flush=True)
            if step % cfg.train.checkpoint_every == 0 or final:
                _save_and_report(engine, cfg, step, float(loss), rank, final, tokenizer,
                                 epoch=epoch, batch_in_epoch=batch_in_epoch, extra=val)
            elif val:
                ray.train.report({"step": step, "loss": float(loss), "epoch": epoch, **val})
            if final:
                done = True
                break
            t_wait = time.perf_counter()


def _save_and_report(engine, cfg: Config, step: int, loss: float, rank: int, final: bool, tokenizer, *,
                     epoch: int, batch_in_epoch: int, extra: dict[str, float] | None = None) -> None:
    """Every rank writes its DeepSpeed shard and its RNG/data state to a local folder; ``ray.train.report``
    uploads them into one checkpoint directory in storage, registered once every rank's upload is done."""
    import ray.train
    from ray.train import Checkpoint

    from volvlp_ray.train.checkpoint import save_worker_state

    progress = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
    with tempfile.TemporaryDirectory(prefix="volvlp-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=progress)
        save_worker_state(tmp, rank, **progress)
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
