"""Validation during pre-training: cheap held-out metrics on a small fixed subset, every ``eval.every`` steps.

    validator = Validator(cfg, tokenizer_dir, rank=rank, world=world)   # once: where the subset's volumes lie
    metrics = validator.run(engine.module)    # {"val/t2v/recall_at_10": …, "val/zeroshot/mean/auroc": …}

The subset is the first ``eval.val_volumes`` usable samples of the held-out split in shard order, sorted by key
and cut into batches of ``eval.batch_size``, so successive validations are comparable. It is read in this
process, without Ray Data tasks (a run whose training workers hold every CPU could never schedule them): the
shards' tar headers, reports and metadata once, the voxels by reference (``data.reader``'s ``refs``). Nothing of
the volumes is kept: ``run`` reads one batch at a time from the shards as int16 and normalises it on the model's
device (the same values the Ray Data path gives, bitwise).

With ``world`` > 1 the batches are dealt out (batch ``j`` to rank ``j % world``): each rank embeds its part and
the embeddings are all-gathered over a gloo group of the validator's own, so every rank computes the same
numbers, equal to a one-rank run's (a batch is embedded as the same padded batch wherever it runs). With
``collective_forward`` (ZeRO-3, where a forward pass is a collective) every rank makes as many vision and
text passes as the busiest one, padding with passes on a one-patch dummy input whose output is dropped.

``run`` embeds with the model in eval mode and no gradients (volumes as ``eval.volume_mode`` says), computes
retrieval both ways (Recall@K for the ``eval.ks`` below the subset size, MRR, median rank) and zero-shot mean
AUROC / weighted F1 (CT-CLIP prompts ``eval.prompts``, no bootstrap), and restores the model's previous
train/eval mode. Every rank must call it (the all-gather is a collective).

Memory per rank: one batch of int16 voxels on the host and its normalised copy on the model's device (one volume's
float32 at a time while normalising; plus the activations of its forward pass), the subset's tokens and its
``(N, E)`` embeddings; see the README (Evaluation) for the figures at ``configs/ctrate_vitb.yaml``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from volvlp_ray.config import Config

__all__ = ["Validator", "read_subset"]


def read_subset(cfg: Config, split: str, tokenizer_dir: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` usable evaluation rows of ``split`` in shard order (what ``eval.run.split_dataset`` gives
    with ``max_volumes=n``: whole volume, whole report, bad samples skipped and logged), read in this process,
    volumes by reference (``volume_location``/``volume_offset``/``volume_shape``): no voxel is read here."""
    from volvlp_ray.data.pipeline import _ToRow, shard_files
    from volvlp_ray.data.reader import iter_samples, open_shard
    from volvlp_ray.data.shards import CORE_MEMBERS, LABELMAP_MEMBER

    to_row = _ToRow(cfg, tokenizer_dir, training=False)
    rows: list[dict[str, Any]] = []
    for location in shard_files(cfg, split):
        with open_shard(location) as stream:
            for sample in iter_samples(stream, location, suffixes=list(CORE_MEMBERS),
                                       refs=("volume.npy", LABELMAP_MEMBER)):
                rows += to_row(sample)
                if len(rows) >= n:
                    return rows[:n]
    return rows


class _Counted:
    """The model, counting its ``encode_image`` calls (a ZeRO-3 rank must make as many as every other rank)."""

    def __init__(self, model):
        self._model, self.calls = model, 0

    def encode_image(self, *args, **kwargs):
        self.calls += 1
        return self._model.encode_image(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class Validator:
    """A fixed held-out subset (where its volumes lie, its tokens and labels) and the cheap metrics of a model on it.

    Args:
        cfg: the run's config (data options, ``eval.*``).
        tokenizer_dir: the tokenizer the run trains with (reports and prompts are tokenised with it).
        max_volumes: subset size; default ``cfg.eval.val_volumes``.
        split: the held-out split (default ``"valid"``).
        rank, world: this process's rank and the number of ranks sharing the work (``torch.distributed`` must be
            initialised when ``world`` > 1; every rank constructs its validator at the same point, since that
            creates a process group).
        collective_forward: the model's forward passes are collectives (DeepSpeed ZeRO-3): pad every rank to the
            same number of passes.
        timeout_s: the timeout of the validator's gloo group (``train.timeout_s``).
    """

    def __init__(self, cfg: Config, tokenizer_dir: str, max_volumes: int | None = None, split: str = "valid", *,
                 rank: int = 0, world: int = 1, collective_forward: bool = False, timeout_s: float | None = None):
        from transformers import AutoTokenizer

        from volvlp_ray.eval.run import label_names_of
        from volvlp_ray.eval.zeroshot import build_prompts

        n = cfg.eval.val_volumes if max_volumes is None else int(max_volumes)
        if n < 2:
            raise ValueError(f"validation needs at least 2 volumes (retrieval ranks among them), got {n}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.cfg, self.split, self.rank, self.world = cfg, split, rank, world
        self.collective_forward = collective_forward and world > 1
        t0 = time.time()
        rows = read_subset(cfg, split, tokenizer_dir, n)
        if len(rows) < 2:
            raise ValueError(f"validation: split {split!r} under {cfg.shards_path} gave {len(rows)} usable sample(s)")
        rows.sort(key=lambda r: str(r["key"]))
        self.keys = [str(r["key"]) for r in rows]
        self.label_names = label_names_of(cfg, split)
        self.labels = np.stack([np.asarray(r["labels"], dtype=np.float32) for r in rows])
        bs = cfg.eval.batch_size
        self._batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
        self._mine = list(range(rank, len(self._batches), world))
        self._in_plane = tuple(int(x) for x in rows[0]["volume_shape"][1:])
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        pos, neg = build_prompts(self.label_names, tuple(cfg.eval.prompts))
        enc = tok(pos + neg, padding=True, truncation=True, max_length=cfg.data.max_text_length, return_tensors="pt")
        self._prompts = (enc["input_ids"], enc["attention_mask"])
        self.group = None
        if world > 1:
            import torch.distributed as dist

            kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
            self.group = dist.new_group(backend="gloo", **kwargs)
        self.load_seconds = time.time() - t0

    def __len__(self) -> int:
        return len(self.keys)

    def _volumes(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's volumes read from the shards: int16 HU ``(B, 1, D, H, W)`` padded at the end of z with air
        to a multiple of the z patch (as ``pipeline.collate`` pads), and the true depths ``(B,)``."""
        from volvlp_ray.data.reader import read_volumes
        from volvlp_ray.data.shards import VolumeRef

        refs = [VolumeRef(str(r["volume_location"]), int(r["volume_offset"]), tuple(r["volume_shape"])) for r in rows]
        depths = np.asarray([ref.shape[0] for ref in refs], dtype=np.int64)
        pz = self.cfg.model.patch[0]
        d_max = int(-(-depths.max() // pz) * pz)
        hu_air = int(np.clip(np.floor(self.cfg.data.hu_window[0]), -32768, 32767))
        out = np.full((len(refs), d_max, *refs[0].shape[1:]), hu_air, dtype=np.int16)
        read_volumes(refs, out)
        return torch.from_numpy(out).unsqueeze(1), torch.from_numpy(depths)

    def vision_passes(self, rank: int) -> int:
        """The ``encode_image`` calls ``rank``'s batches take (``eval.embed.encode_volumes``: one per batch in
        "whole" mode; in "sliding" mode one per ``eval.batch_size`` z-chunks)."""
        from volvlp_ray.eval.embed import chunk_starts

        e, pz = self.cfg.eval, self.cfg.model.patch[0]
        total = 0
        for j in range(rank, len(self._batches), self.world):
            if e.volume_mode == "whole":
                total += 1
                continue
            cd = max(pz, e.chunk_depth // pz * pz)
            chunks = sum(len(chunk_starts(int(r["volume_shape"][0]), cd, e.chunk_stride)) for r in self._batches[j])
            total += -(-chunks // e.batch_size)
        return total

    @torch.no_grad()
    def embed(self, model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Volume ``(N, E)``, report ``(N, E)``, positive and negative prompt ``(L, E)`` embeddings (model mode as
        is); every rank gets all of them."""
        from volvlp_ray.data.pipeline import normalise_tensor
        from volvlp_ray.eval.embed import encode_volumes

        device, dtype = model.device, model.vision.patch_embed.weight.dtype
        e = self.cfg.eval
        hu_window = tuple(self.cfg.data.hu_window)
        counted = _Counted(model)
        vols: dict[int, np.ndarray] = {}
        for j in self._mine:  # one batch of voxels at a time
            hu, depths = self._volumes(self._batches[j])
            volume = torch.empty(hu.shape, dtype=dtype, device=device)
            for i in range(len(hu)):  # normalised on the device volume by volume: one volume's float32 at a time
                volume[i] = normalise_tensor(hu[i].to(device), hu_window, dtype)
            del hu
            vols[j] = encode_volumes(counted, volume, depths.to(device), e.volume_mode, e.chunk_depth,
                                     e.chunk_stride, e.chunk_pool, e.batch_size).float().cpu().numpy()
            del volume
        if self.collective_forward:
            # as many vision passes as the busiest rank (known from the depths: asking the others would be a
            # collective of its own, which a rank still in a pass could not join)
            mine, most = self.vision_passes(self.rank), max(self.vision_passes(r) for r in range(self.world))
            if counted.calls != mine:
                raise RuntimeError(f"validation made {counted.calls} vision passes on rank {self.rank}, planned {mine}: "
                                   "the other ranks would wait for the missing ones (eval.embed changed?)")
            pz = self.cfg.model.patch[0]
            dummy = torch.full((1, 1, pz, *self._in_plane), -1.0, dtype=dtype, device=device)
            for _ in range(most - mine):
                model.encode_image(dummy, torch.tensor([pz], device=device))
        ids, mask = self._prompts
        texts: dict[int, np.ndarray] = {}
        for j in self._mine:
            batch = self._batches[j]
            b_ids = torch.as_tensor(np.stack([r["input_ids"] for r in batch]), dtype=torch.long)
            b_mask = torch.as_tensor(np.stack([r["attention_mask"] for r in batch]), dtype=torch.long)
            texts[j] = model.encode_text(b_ids.to(device), b_mask.to(device)).float().cpu().numpy()
        if self.collective_forward:
            for _ in range(-(-len(self._batches) // self.world) - len(self._mine)):
                model.encode_text(ids[:1].to(device), mask[:1].to(device))
        p = model.encode_text(ids.to(device), mask.to(device)).float().cpu().numpy()
        if self.world > 1:
            import torch.distributed as dist

            parts: list = [None] * self.world
            dist.all_gather_object(parts, (vols, texts), group=self.group)
            for v, t in parts:
                vols.update(v)
                texts.update(t)
        order = range(len(self._batches))
        n_labels = len(self.label_names)
        return (np.concatenate([vols[j] for j in order]), np.concatenate([texts[j] for j in order]),
                p[:n_labels], p[n_labels:])

    def run(self, model, prefix: str = "val/") -> dict[str, float]:
        """Cheap metrics of ``model`` (a VLP, e.g. ``engine.module``) on the subset; restores its train/eval mode.

        Returns ``{prefix}t2v/recall_at_K`` and ``{prefix}v2t/…`` (K in ``eval.ks`` below the subset size),
        ``…/mrr``, ``…/median_rank``, ``{prefix}zeroshot/mean/auroc``, ``{prefix}zeroshot/mean/f1_weighted``,
        ``{prefix}zeroshot/n_labels_evaluated``, ``{prefix}n`` and ``{prefix}seconds``.
        """
        from volvlp_ray.eval.retrieval import retrieval_metrics
        from volvlp_ray.eval.zeroshot import zero_shot_scores

        t0 = time.time()
        was_training = model.training
        model.eval()
        try:
            vol, txt, pos, neg = self.embed(model)
            scale = _logit_scale(model)
        finally:
            model.train(was_training)
        n = len(self.keys)
        ks = tuple(k for k in self.cfg.eval.ks if k < n) or (1,)
        out: dict[str, float] = {f"{prefix}n": float(n)}
        for d, (q, t) in (("t2v", (txt, vol)), ("v2t", (vol, txt))):
            m = retrieval_metrics(q, t, ks=ks)
            out.update({f"{prefix}{d}/recall_at_{k}": m[f"recall_at_{k}"] for k in ks})
            out[f"{prefix}{d}/mrr"] = m["mrr"]
            out[f"{prefix}{d}/median_rank"] = m["median_rank"]
        scores = zero_shot_scores(vol, pos, neg, logit_scale=scale)
        zs = _quiet_classification(scores, self.labels, self.label_names)
        out[f"{prefix}zeroshot/mean/auroc"] = zs["mean"]["auroc"]
        out[f"{prefix}zeroshot/mean/f1_weighted"] = zs["mean"]["f1_weighted"]
        out[f"{prefix}zeroshot/n_labels_evaluated"] = float(zs["n_labels_evaluated"])
        out[f"{prefix}seconds"] = time.time() - t0
        return out


def _logit_scale(model) -> float:
    """``exp(model.logit_scale)``; under ZeRO-3 a partitioned parameter, gathered first when no forward pass has made
    it available (a collective: every rank calls ``run`` at the same point, and their parameters' states agree)."""
    p = model.logit_scale
    status = getattr(p, "ds_status", None)
    if status is not None and status.name != "AVAILABLE":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return float(p.detach().float().exp())
    return float(p.detach().float().exp())


def _quiet_classification(scores: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """:func:`classification_metrics` without bootstrap and without the per-call warning about single-class
    labels (in a small subset some labels always have one class; ``n_labels_evaluated`` says how many count)."""
    import logging

    from volvlp_ray.eval.zeroshot import classification_metrics

    logger = logging.getLogger("volvlp_ray.eval.zeroshot")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return classification_metrics(scores, labels, names, n_bootstrap=0)
    finally:
        logger.setLevel(level)
