"""Validation during pre-training: cheap held-out metrics on a small fixed subset, every ``eval.every`` steps.

    validator = Validator(cfg, tokenizer_dir)              # once: reads eval.val_volumes volumes into memory
    metrics = validator.run(engine.module)                 # {"val/t2v/recall_at_10": …, "val/zeroshot/mean/auroc": …}

The subset is the first ``eval.val_volumes`` samples of the held-out split in shard order (read once through the
project's Ray Data pipeline, then kept as padded CPU tensors), so successive validations are comparable.
``run`` embeds them with the model in eval mode and no gradients (volumes as ``eval.volume_mode`` says),
computes retrieval both ways (Recall@K for the ``eval.ks`` below the subset size, MRR, median rank) and
zero-shot mean AUROC / weighted F1 (CT-CLIP prompts ``eval.prompts``, no bootstrap), and restores the model's
previous train/eval mode.  Every rank may call it (required under ZeRO-3, where a forward pass is collective);
all ranks get the same numbers.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from volvlp_ray.config import Config

__all__ = ["Validator"]


class Validator:
    """A fixed held-out subset in memory and the cheap metrics of a model on it.

    Args:
        cfg: the run's config (data options, ``eval.*``).
        tokenizer_dir: the tokenizer the run trains with (reports and prompts are tokenised with it).
        max_volumes: subset size; default ``cfg.eval.val_volumes``.
        split: the held-out split (default ``"valid"``).
    """

    def __init__(self, cfg: Config, tokenizer_dir: str, max_volumes: int | None = None, split: str = "valid"):
        from transformers import AutoTokenizer

        from volvlp_ray.data.pipeline import collate
        from volvlp_ray.eval.run import label_names_of, split_dataset
        from volvlp_ray.eval.zeroshot import build_prompts

        n = cfg.eval.val_volumes if max_volumes is None else int(max_volumes)
        if n < 2:
            raise ValueError(f"validation needs at least 2 volumes (retrieval ranks among them), got {n}")
        self.cfg = cfg
        self.split = split
        t0 = time.time()
        rows = split_dataset(cfg, split, tokenizer_dir, max_volumes=n).take_all()
        if len(rows) < 2:
            raise ValueError(f"validation: split {split!r} under {cfg.shards_path} gave {len(rows)} usable sample(s)")
        rows.sort(key=lambda r: str(r["key"]))
        self.keys = [str(r["key"]) for r in rows]
        self.label_names = label_names_of(cfg, split)
        bs = cfg.eval.batch_size
        self._batches: list[dict[str, torch.Tensor]] = []
        for i in range(0, len(rows), bs):
            part = rows[i : i + bs]
            batch = {k: np.array([r[k] for r in part] if k != "volume" else _objects([r[k] for r in part]))
                     for k in ("volume", "input_ids", "attention_mask", "labels", "study_id", "z_center_mm")}
            b = collate(batch, cfg.model.patch[0], tuple(cfg.data.hu_window))
            self._batches.append({k: b[k] for k in ("volume", "depths", "input_ids", "attention_mask", "labels")})
        self.labels = torch.cat([b["labels"] for b in self._batches]).numpy()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        pos, neg = build_prompts(self.label_names, tuple(cfg.eval.prompts))
        enc = tok(pos + neg, padding=True, truncation=True, max_length=cfg.data.max_text_length, return_tensors="pt")
        self._prompts = (enc["input_ids"], enc["attention_mask"])
        self.load_seconds = time.time() - t0

    def __len__(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def embed(self, model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Volume ``(N, E)``, report ``(N, E)``, positive and negative prompt ``(L, E)`` embeddings (model mode as is)."""
        from volvlp_ray.eval.embed import encode_volumes

        device, dtype = model.device, model.vision.patch_embed.weight.dtype
        e = self.cfg.eval
        vols, texts = [], []
        for b in self._batches:
            vols.append(encode_volumes(model, b["volume"].to(device, dtype), b["depths"].to(device), e.volume_mode,
                                       e.chunk_depth, e.chunk_stride, e.chunk_pool, e.batch_size).float().cpu())
            texts.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
        ids, mask = self._prompts
        p = model.encode_text(ids.to(device), mask.to(device)).float().cpu().numpy()
        n_labels = len(self.label_names)
        return torch.cat(vols).numpy(), torch.cat(texts).numpy(), p[:n_labels], p[n_labels:]

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
            scale = float(model.logit_scale.detach().float().exp())
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


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of arrays of different shapes (what Ray Data hands ``collate`` for volumes)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


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
