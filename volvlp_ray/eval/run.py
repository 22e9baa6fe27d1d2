"""Evaluate a model on a shard split: embeddings -> retrieval and zero-shot metrics (+ plots).

    model = VLP.from_pretrained(export_dir)
    result = evaluate_model(model, cfg, split="valid")
    result["metrics"]  # flat {name: float}, MLflow-ready; result["plots"]: PNG paths
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch

from volvlp_ray.config import Config

__all__ = ["embed_split", "evaluate_model"]

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_split(model, cfg: Config, split: str, tokenizer_dir: str) -> dict[str, np.ndarray]:
    """Whole-volume and whole-report embeddings of a split (Ray Data read, model on this process)."""
    from volvlp_ray.data.pipeline import build_dataset, collate

    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ds = build_dataset(cfg, split, tokenizer_dir, training=False)
    vols, texts, labels, keys = [], [], [], []
    for batch in ds.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
        b = collate(batch, cfg.model.patch[0], tuple(cfg.data.hu_window))
        vols.append(model.encode_image(b["volume"].to(device, dtype), b["depths"].to(device)).float().cpu())
        texts.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
        labels.append(b["labels"].numpy())
        keys.extend(str(k) for k in batch["key"])
    order = np.argsort(keys)  # deterministic order regardless of block scheduling
    return {
        "volume": torch.cat(vols).numpy()[order],
        "text": torch.cat(texts).numpy()[order],
        "labels": np.concatenate(labels)[order],
        "keys": np.asarray(keys)[order],
    }


def evaluate_model(model, cfg: Config, split: str = "valid", tokenizer_dir: str | None = None,
                   plots_dir: str | None = None) -> dict[str, Any]:
    from volvlp_ray.data.ctrate import LABELS
    from volvlp_ray.eval.retrieval import bidirectional_retrieval, label_jaccard_at_k
    from volvlp_ray.eval.zeroshot import build_prompts, classification_metrics, flatten_metrics, zero_shot_scores

    t0 = time.time()
    if tokenizer_dir is None:
        tokenizer_dir = tempfile.mkdtemp(prefix="volvlp-tok-")
        model.tokenizer.save_pretrained(tokenizer_dir)
    emb = embed_split(model, cfg, split, tokenizer_dir)
    n = len(emb["keys"])
    metrics: dict[str, float] = {"eval/n": float(n)}
    retrieval = bidirectional_retrieval(emb["text"], emb["volume"], ks=tuple(cfg.eval.ks))
    metrics.update({f"eval/{k}": float(v) for k, v in retrieval.items()})
    jac = label_jaccard_at_k(emb["volume"], emb["labels"], ks=tuple(k for k in cfg.eval.ks if k < n))
    metrics.update({f"eval/v2v/{k}": float(v) for k, v in jac.items()})

    pos, neg = build_prompts(LABELS, tuple(cfg.eval.prompts))
    with torch.no_grad():
        pos_emb = model.embed_text(pos, max_length=cfg.data.max_text_length).float().cpu().numpy()
        neg_emb = model.embed_text(neg, max_length=cfg.data.max_text_length).float().cpu().numpy()
    scale = float(model.logit_scale.detach().float().exp())
    scores = zero_shot_scores(emb["volume"], pos_emb, neg_emb, logit_scale=scale)
    zs = classification_metrics(scores, emb["labels"], list(LABELS), n_bootstrap=cfg.eval.n_bootstrap, seed=cfg.seed)
    metrics.update(flatten_metrics(zs, "eval/zeroshot/"))
    plots: list[str] = []
    if plots_dir:
        from volvlp_ray.eval.plots import save_all_plots

        plots = save_all_plots(
            plots_dir, retrieval=retrieval, classification={"zeroshot": zs}, text_emb=emb["text"],
            volume_emb=emb["volume"], labels=emb["labels"], label_names=list(LABELS),
            color_by=("Cardiomegaly", "Pleural effusion"),
        )
    metrics["eval/seconds"] = time.time() - t0
    return {"metrics": metrics, "zeroshot": zs, "retrieval": retrieval, "plots": plots, "embeddings": emb}
