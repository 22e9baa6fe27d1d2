"""Evaluate a model on a shard split: embeddings -> retrieval, zero-shot, linear probe metrics (+ plots).

    model = VLP.from_pretrained(export_dir)
    result = evaluate_model(model, cfg, split="valid")
    result["metrics"]  # flat {name: float}, MLflow-ready; result["plots"]: PNG paths; result["report"]: for JSON

Embeddings are whole-volume (``eval.volume_mode``: one pass, or sliding z-chunks pooled) and whole-report.
The model runs in this process. The shards (any filesystem Ray Data reads) are read by Ray Data tasks, or, for a
split small enough (``eval.reader``, ``eval.direct_max_volumes``), by this process itself without Ray Data's
start-up: the same rows, cut into batches in sorted-key order rather than shard order (see ``eval.validation``),
so the embeddings equal the Ray Data read's up to float rounding from padding (tested to 1e-5).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from volvlp_ray import console
from volvlp_ray.config import Config

__all__ = ["embed_split", "evaluate_embeddings", "evaluate_model", "label_names_of", "prompt_embeddings",
           "reads_directly"]

log = logging.getLogger(__name__)


def label_names_of(cfg: Config, split: str) -> list[str]:
    """The label names of a split, in the order of each sample's ``labels`` (from its manifest)."""
    from volvlp_ray.data.ctrate import LABELS
    from volvlp_ray.data.shards import read_manifest

    return [str(n) for n in read_manifest(f"{cfg.shards_path}/{split}").get("labels", LABELS)]


def split_size(cfg: Config, split: str) -> int:
    from volvlp_ray.data.shards import read_manifest

    return int(read_manifest(f"{cfg.shards_path}/{split}")["num_samples"])


def split_dataset(cfg: Config, split: str, tokenizer_dir: str, max_volumes: int = 0):
    """Ray Dataset of eval rows (whole volume, whole report) of ``split``; with ``max_volumes`` > 0 the first
    ``max_volumes`` rows in shard order (a fixed subset: order is preserved for this read)."""
    from volvlp_ray.data.pipeline import build_dataset

    ds = build_dataset(cfg, split, tokenizer_dir, training=False)
    if max_volumes > 0:
        ds.context.execution_options.preserve_order = True  # this dataset's own context copy
        ds = ds.limit(max_volumes)
    return ds


def ensure_ray() -> None:
    """Ray for a Ray Data read: the one this process is connected to, else the cluster at ``$RAY_ADDRESS``, else a
    local instance (only a read that needs Ray starts one)."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**console.ray_init_kwargs())
            console.info(f"[ray] joined cluster at {os.environ['RAY_ADDRESS']}")
        else:
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                     **console.ray_init_kwargs())
            console.info("[ray] started a local instance")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def reads_directly(cfg: Config, n: int) -> bool:
    """Whether a split of ``n`` volumes is read in this process (``eval.reader``) rather than with Ray Data."""
    e = cfg.eval
    return e.reader == "direct" or (e.reader == "auto" and 2 <= n <= e.direct_max_volumes)


def _embed_directly(model, cfg: Config, split: str, tokenizer_dir: str, n: int,
                    progress: str | None) -> dict[str, np.ndarray]:
    """:func:`embed_split` read in this process (``eval.validation.Validator``'s reader: the shards' headers and
    reports once, then one batch of voxels at a time), without Ray Data."""
    from volvlp_ray.eval.validation import Validator

    t0 = time.time()
    v = Validator(cfg, tokenizer_dir, max_volumes=n, split=split)
    vol, txt, _, _ = v.embed(model)
    if progress:
        console.info(f"[eval] {progress}: embedded {len(v)}/{n} volumes ({time.time() - t0:.0f}s, read directly)")
    return {"volume": vol.astype(np.float32), "text": txt.astype(np.float32), "labels": v.labels,
            "keys": np.asarray(v.keys)}


def _model_inputs(model) -> tuple[torch.device, torch.dtype, int]:
    return model.device, model.vision.patch_embed.weight.dtype, int(model.vision.patch[0])


@torch.no_grad()
def embed_split(
    model,
    cfg: Config,
    split: str,
    tokenizer_dir: str,
    max_volumes: int = 0,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Volume and report embeddings of a split, sorted by sample key.

    Args:
        model: a VLP; put in eval mode (left so).
        max_volumes: > 0: only the first ``max_volumes`` samples in shard order.
        progress: a name to print progress lines under (``[eval] <name>: 96/128 volumes``), or None.

    Returns:
        ``volume`` ``(N, E)``, ``text`` ``(N, E)`` (float32, L2-normalised), ``labels`` ``(N, L)``, ``keys`` ``(N,)``.
    """
    from volvlp_ray.data.pipeline import collate
    from volvlp_ray.eval.embed import encode_volumes

    model.eval()
    device, dtype, patch_z = _model_inputs(model)
    total = split_size(cfg, split)
    total = min(total, max_volumes) if max_volumes > 0 else total
    if reads_directly(cfg, total):
        return _embed_directly(model, cfg, split, tokenizer_dir, total, progress)
    ensure_ray()
    ds = split_dataset(cfg, split, tokenizer_dir, max_volumes)
    e = cfg.eval
    vols, texts, labels, keys = [], [], [], []
    bar = console.progress(total=total, desc=f"[eval] {progress}: embedded", unit="volumes", plain_lines=4,
                           disabled=not progress)
    with bar:
        for batch in ds.iter_batches(batch_size=e.batch_size, batch_format="numpy"):
            b = collate(batch, patch_z, tuple(cfg.data.hu_window))
            vols.append(encode_volumes(model, b["volume"].to(device, dtype), b["depths"].to(device), e.volume_mode,
                                       e.chunk_depth, e.chunk_stride, e.chunk_pool, e.batch_size).float().cpu())
            texts.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
            labels.append(b["labels"].numpy())
            keys.extend(str(k) for k in batch["key"])
            bar.update(len(batch["key"]))
    if not keys:
        raise ValueError(f"split {split!r} under {cfg.shards_path} gave no usable samples")
    order = np.argsort(keys, kind="stable")  # deterministic order regardless of block scheduling
    return {
        "volume": torch.cat(vols).numpy()[order],
        "text": torch.cat(texts).numpy()[order],
        "labels": np.concatenate(labels)[order],
        "keys": np.asarray(keys)[order],
    }


@torch.no_grad()
def prompt_embeddings(model, label_names: Sequence[str], templates: Sequence[str], max_length: int,
                      tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """``(L, E)`` embeddings of the positive and the negative prompt of every label (model in its current mode).

    ``tokenizer``: defaults to ``model.tokenizer``."""
    from volvlp_ray.eval.zeroshot import build_prompts

    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise ValueError("zero-shot prompts need a tokenizer: pass tokenizer= or attach model.tokenizer")
    pos, neg = build_prompts(label_names, tuple(templates))
    enc = tok(pos + neg, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = model.device
    emb = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu().numpy()
    return emb[: len(pos)], emb[len(pos):]


def _color_labels(labels: np.ndarray, names: Sequence[str], n: int = 2) -> tuple[str, ...]:
    """The ``n`` labels whose prevalence is closest to 1/2 (the most informative colourings)."""
    prev = labels.mean(0)
    ok = [j for j in np.argsort(np.abs(prev - 0.5), kind="stable") if 0 < prev[j] < 1]
    return tuple(names[j] for j in ok[:n])


def _drop_arrays(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}


def evaluate_embeddings(
    emb: dict[str, np.ndarray],
    pos_emb: np.ndarray,
    neg_emb: np.ndarray,
    logit_scale: float,
    label_names: Sequence[str],
    cfg: Config,
    n_bootstrap: int | None = None,
    train_emb: dict[str, np.ndarray] | None = None,
    plots_dir: str | None = None,
    prefix: str = "eval/",
) -> dict[str, Any]:
    """All metrics of embedded volumes/reports: retrieval both ways, volume->volume label-Jaccard@K, zero-shot
    (CT-CLIP protocol, bootstrap CIs) and, given ``train_emb``, a linear probe fitted on it.

    Args:
        emb: :func:`embed_split` of the evaluated split (``N`` cases); train_emb: of the probe's training split.
        pos_emb, neg_emb: :func:`prompt_embeddings`; logit_scale: the model's exponentiated scale.
        n_bootstrap: resamples for CIs (default ``cfg.eval.n_bootstrap``).

    Returns:
        ``metrics`` (flat, keys under ``prefix``), ``report`` (nested, JSON-ready: ``retrieval``, ``v2v``,
        ``zeroshot``, ``probe``, ``ks_capped``…), ``zeroshot``, ``retrieval``, ``plots`` (PNG paths).
    """
    from volvlp_ray.eval.probe import linear_probe
    from volvlp_ray.eval.retrieval import bidirectional_retrieval, label_jaccard_at_k
    from volvlp_ray.eval.zeroshot import classification_metrics, flatten_metrics, zero_shot_scores

    names = list(label_names)
    n = len(emb["keys"])
    ks = tuple(cfg.eval.ks)
    n_boot = cfg.eval.n_bootstrap if n_bootstrap is None else n_bootstrap
    metrics: dict[str, float] = {f"{prefix}n": float(n)}
    retrieval = bidirectional_retrieval(emb["text"], emb["volume"], ks=ks)
    metrics.update({f"{prefix}{k}": float(v) for k, v in retrieval.items()})
    if n >= 2:
        v2v = label_jaccard_at_k(emb["volume"], emb["labels"], ks=ks)
        metrics.update({f"{prefix}v2v/{k}": float(v) for k, v in v2v.items()})
    else:
        v2v = {"skipped": "volume->volume retrieval needs at least 2 volumes"}

    scores = zero_shot_scores(emb["volume"], pos_emb, neg_emb, logit_scale=logit_scale)
    zs = classification_metrics(scores, emb["labels"], names, n_bootstrap=n_boot, seed=cfg.seed)
    metrics.update(flatten_metrics(zs, f"{prefix}zeroshot/"))

    probe: dict[str, Any] | None = None
    if train_emb is not None:
        probe = linear_probe(train_emb["volume"], train_emb["labels"], emb["volume"], emb["labels"], names,
                             n_bootstrap=n_boot, seed=cfg.seed)
        probe = _drop_arrays(probe)
        probe["n_train"] = len(train_emb["keys"])
        metrics.update(flatten_metrics(probe, f"{prefix}probe/"))

    plots: list[str] = []
    if plots_dir:
        from volvlp_ray.eval.plots import save_all_plots

        classification = {"zeroshot": zs, **({"probe": probe} if probe and probe["n_labels_evaluated"] else {})}
        plots = save_all_plots(
            plots_dir, retrieval=retrieval, classification=classification, text_emb=emb["text"],
            volume_emb=emb["volume"], labels=emb["labels"], label_names=names,
            color_by=_color_labels(emb["labels"], names),
        )
    report = {
        "n": n,
        "label_names": names,
        "ks": list(ks),
        "ks_capped": [k for k in ks if k >= n],
        "ks_capped_note": "Recall@K and Jaccard@K with K >= N are computed at K = N (recall and its random "
                          "baseline are then 1): not informative at this N",
        "n_bootstrap": n_boot,
        "logit_scale": logit_scale,
        "retrieval": retrieval,
        "v2v": v2v,
        "zeroshot": zs,
        "probe": probe if probe is not None else {"skipped": "no training split embeddings given"},
    }
    return {"metrics": metrics, "report": report, "zeroshot": zs, "retrieval": retrieval, "probe": probe,
            "plots": plots}


def evaluate_model(model, cfg: Config, split: str = "valid", tokenizer_dir: str | None = None,
                   plots_dir: str | None = None, n_bootstrap: int | None = None,
                   train_emb: dict[str, np.ndarray] | None = None, prefix: str = "eval/",
                   progress: str | None = None, labels: Sequence[str] | None = None,
                   train_label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Embed ``split`` and compute every metric (see :func:`evaluate_embeddings`); adds ``embeddings`` and
    ``{prefix}seconds`` to the result.

    ``labels``: the model's labels (those it was trained with); the split's labels outside them are left out
    (listed in the report's ``labels_not_shared``): an external set is evaluated over the labels it shares with
    the model. ``train_label_names``: the label names of ``train_emb``'s columns, when they may differ from the
    split's (a probe fitted on the run's training split, scored on an external set)."""
    t0 = time.time()
    if tokenizer_dir is None:
        tokenizer_dir = tempfile.mkdtemp(prefix="volvlp-tok-")
        model.tokenizer.save_pretrained(tokenizer_dir)
    emb = embed_split(model, cfg, split, tokenizer_dir, progress=progress)
    names = label_names_of(cfg, split)
    if emb["labels"].shape[1] != len(names):
        raise ValueError(f"samples of {cfg.shards_path}/{split} have {emb['labels'].shape[1]} labels, its manifest "
                         f"names {len(names)}")
    dropped: list[str] = []
    if labels is not None:
        keep = [j for j, n in enumerate(names) if n in set(labels)]
        dropped = [n for n in names if n not in set(labels)]
        if not keep:
            raise ValueError(f"{cfg.shards_path}/{split} shares no label with the model (its labels: {names}; the "
                             f"model's: {list(labels)})")
        if dropped:
            console.info(f"[eval] {len(dropped)} label(s) of {split} not among the model's, left out: {dropped}")
        emb = {**emb, "labels": emb["labels"][:, keep]}
        names = [names[j] for j in keep]
    if train_emb is not None and train_label_names is not None and list(train_label_names) != names:
        missing = [n for n in names if n not in list(train_label_names)]
        if missing:
            raise ValueError(f"the probe's training split lacks the label(s) {missing}")
        idx = [list(train_label_names).index(n) for n in names]
        train_emb = {**train_emb, "labels": train_emb["labels"][:, idx]}
    pos_emb, neg_emb = prompt_embeddings(model, names, cfg.eval.prompts, cfg.data.max_text_length)
    scale = float(model.logit_scale.detach().float().exp())
    res = evaluate_embeddings(emb, pos_emb, neg_emb, scale, names, cfg, n_bootstrap=n_bootstrap,
                              train_emb=train_emb, plots_dir=plots_dir, prefix=prefix)
    res["metrics"][f"{prefix}seconds"] = time.time() - t0
    res["report"]["labels_not_shared"] = dropped
    res["embeddings"] = emb
    if not math.isfinite(res["metrics"].get(f"{prefix}zeroshot/mean/auroc", math.nan)):
        log.warning("zero-shot AUROC undefined on %s: no label has both classes among %d volumes", split,
                    len(emb["keys"]))
    return res
