"""Organ classification of z-chunks (SigVLP): which organs a chunk of a scan shows, zero-shot and by linear probe.

    chunks = embed_organ_chunks(model, cfg, "valid", tokenizer_dir)             # chunk embeddings + targets
    prompts = organ_prompt_embeddings(model, ORGAN_GROUPS, cfg.eval.organ_prompt, 64)
    result = organ_classification(chunks, prompts, train=train_chunks, n_bootstrap=1000)
    result["zeroshot"]["per_organ"]["heart"]["ap"], result["probe"]["mean"]["ap"]

Every evaluated volume is cut into z-chunks of ``eval.organ_chunk_depth`` slices every ``eval.organ_chunk_stride``
slices (``eval.embed.chunk_starts``: the last chunk ends at the last slice). A chunk's target for an organ group
(``ORGAN_GROUPS``: the groups of the organ-wise text) comes from the organ z-extents stored with the volume (its
segmentation or the organ-extents CSV): the organ is **present** when the overlap of the chunk's z-range and the
organ's extent is at least ``eval.organ_min_overlap`` times the shorter of the two (so a chunk that merely grazes
an organ's end does not count, and a small organ wholly inside the chunk does), **absent** when there is less
overlap, and **unknown** (-1, left out of that organ's figures) when the volume has no extent for that group.

- **Zero-shot**: a chunk's score for an organ is the cosine similarity of its embedding with the organ prompt's
  (``eval.organ_prompt`` with ``{organ}`` = ``ORGAN_PROMPT_NAMES``); only the ranking of chunks per organ matters
  to average precision.
- **Linear probe**: a logistic regression per organ (``eval.probe.linear_probe``'s fitting: L2-normalised,
  standardised features) fitted on the chunks of the training split, scored on the evaluated split's chunks.

Average precision (``sklearn.metrics.average_precision_score``) per organ, with a bootstrap CI that resamples
**volumes** (all of a volume's chunks go in or out together: chunks of one scan are not independent), and the
mean over the organs that have both classes among the evaluated chunks (others are listed under ``skipped``;
AP with every chunk positive is 1 whatever the scores). The random baseline of AP is the organ's prevalence,
reported beside it. ``plot_organ_radar`` draws AP per organ on a polar chart (SigVLP's Fig. 1).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from volvlp_ray import console
from volvlp_ray.config import Config
from volvlp_ray.data.organs import ORGAN_KEYWORDS

__all__ = ["ORGAN_GROUPS", "ORGAN_PROMPT_NAMES", "average_precision_with_ci", "chunk_targets",
           "embed_organ_chunks", "organ_classification", "organ_prompt_embeddings", "plot_organ_radar"]

ORGAN_GROUPS: tuple[str, ...] = tuple(ORGAN_KEYWORDS)
"""The organ groups of the organ-wise text, in a fixed order (``data.organs.ORGAN_KEYWORDS``)."""

ORGAN_PROMPT_NAMES: dict[str, str] = {
    "airways": "trachea and bronchi",
    "heart": "heart",
    "aorta": "aorta",
    "mediastinum": "mediastinum",
    "esophagus": "esophagus",
    "pleura": "pleura",
    "lung": "lungs",
    "bones": "bones",
}
"""How each group is named in its zero-shot prompt (words of the reports' own vocabulary)."""


def chunk_targets(extents: Mapping[str, Sequence[float]], z_range_mm: tuple[float, float],
                  min_overlap: float, groups: Sequence[str] = ORGAN_GROUPS) -> np.ndarray:
    """``(G,)`` int8 per group: 1 present, 0 absent, -1 unknown (no extent for the group), for a chunk spanning
    ``z_range_mm`` (RAS mm). Present: overlap >= ``min_overlap`` x the shorter of chunk and organ extent."""
    z0, z1 = float(min(z_range_mm)), float(max(z_range_mm))
    out = np.full(len(groups), -1, dtype=np.int8)
    for j, g in enumerate(groups):
        ext = extents.get(g)
        if ext is None:
            continue
        a, b = float(min(ext)), float(max(ext))
        overlap = min(z1, b) - max(z0, a)
        shorter = min(z1 - z0, b - a)
        out[j] = int(overlap > 0 and overlap >= min_overlap * shorter)
    return out


@torch.no_grad()
def embed_organ_chunks(model, cfg: Config, split: str, tokenizer_dir: str, max_volumes: int = 0,
                       progress: str | None = None) -> dict[str, np.ndarray]:
    """The z-chunks of a split's volumes (the first ``max_volumes`` usable ones in shard order; 0 = all), read in
    this process one batch of volumes at a time (volumes by reference: nothing but the batch is held), embedded
    with the model in eval mode.

    Returns ``emb`` ``(C, E)`` float32 L2-normalised, ``targets`` ``(C, G)`` int8 (``chunk_targets``),
    ``volume`` ``(C,)`` the index of the chunk's volume in ``keys``, ``z_range_mm`` ``(C, 2)``, ``keys`` ``(V,)``
    the keys of the volumes that have organ extents (volumes without any are skipped: ``n_without_extents``).
    """
    from volvlp_ray.data.reader import read_volumes
    from volvlp_ray.data.shards import VolumeRef
    from volvlp_ray.data.transforms import normalise
    from volvlp_ray.eval.embed import chunk_starts
    from volvlp_ray.eval.run import split_size
    from volvlp_ray.eval.validation import read_subset

    e = cfg.eval
    pz = int(model.vision.patch[0])
    cd = max(pz, e.organ_chunk_depth // pz * pz)
    total = split_size(cfg, split)
    n = min(total, max_volumes) if max_volumes > 0 else total
    t0 = time.time()
    rows = read_subset(cfg, split, tokenizer_dir, n)
    with_extents = [r for r in rows if json.loads(str(r["organs_json"]))]
    skipped = len(rows) - len(with_extents)
    with_extents.sort(key=lambda r: str(r["key"]))
    device, dtype = model.device, model.vision.patch_embed.weight.dtype
    model.eval()
    embs, targets, vol_index, ranges = [], [], [], []
    bar = console.progress(total=len(with_extents), desc=f"[eval] {progress}: organ chunks", unit="volumes",
                           plain_lines=4, disabled=not progress)
    with bar:
        for b0 in range(0, len(with_extents), e.batch_size):
            part = with_extents[b0:b0 + e.batch_size]
            pieces: dict[int, list[np.ndarray]] = {}  # chunk length -> chunks (int16 HU), encoded together
            order: list[tuple[int, int]] = []  # (length, index) of this batch's chunks, in volume order
            for i, r in enumerate(part):
                ref = VolumeRef(str(r["volume_location"]), int(r["volume_offset"]), tuple(r["volume_shape"]))
                vol = np.empty(ref.shape, dtype=np.int16)
                read_volumes([ref], vol[None])
                depth = ref.shape[0]
                extents = json.loads(str(r["organs_json"]))
                z0, sz = float(r["z_origin_mm"]), float(r["z_spacing_mm"])
                c = min(cd, depth // pz * pz)  # a volume shallower than the chunk is one chunk of its whole patches
                for s in chunk_starts(depth, c, e.organ_chunk_stride):
                    pieces.setdefault(c, []).append(vol[s:s + c])
                    z_range = (z0 + (s - 0.5) * sz, z0 + (s + c - 0.5) * sz)
                    order.append((c, len(pieces[c]) - 1))
                    ranges.append(z_range)
                    targets.append(chunk_targets(extents, z_range, e.organ_min_overlap))
                    vol_index.append(b0 + i)
            done: dict[int, torch.Tensor] = {}
            for c, chunks in pieces.items():
                feats = []
                for c0 in range(0, len(chunks), e.batch_size):
                    hu = np.stack(chunks[c0:c0 + e.batch_size])[:, None]
                    x = torch.from_numpy(normalise(hu, tuple(cfg.data.hu_window))).to(device, dtype)
                    feats.append(model.encode_image(x, None).float().cpu())
                done[c] = torch.cat(feats)
            embs.extend(done[c][k] for c, k in order)
            bar.update(len(part))
    if progress:
        console.info(f"[eval] {progress}: {len(ranges)} organ chunks of {cd} slices from {len(with_extents)} "
                     f"volumes ({time.time() - t0:.0f}s)" + (f"; {skipped} volumes without organ extents skipped"
                                                            if skipped else ""))
    emb = torch.stack(embs).numpy() if embs else np.zeros((0, 0), np.float32)
    return {"emb": emb.astype(np.float32), "targets": np.asarray(targets, dtype=np.int8).reshape(-1, len(ORGAN_GROUPS)),
            "volume": np.asarray(vol_index, dtype=np.int64), "z_range_mm": np.asarray(ranges, dtype=np.float64),
            "keys": np.asarray([str(r["key"]) for r in with_extents]), "n_without_extents": skipped,
            "chunk_depth": cd}


@torch.no_grad()
def organ_prompt_embeddings(model, groups: Sequence[str], template: str, max_length: int,
                            tokenizer=None) -> np.ndarray:
    """``(G, E)`` embeddings of each group's prompt (``template`` with ``{organ}``)."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    texts = [template.format(organ=ORGAN_PROMPT_NAMES.get(g, g)) for g in groups]
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return model.encode_text(enc["input_ids"].to(model.device),
                             enc["attention_mask"].to(model.device)).float().cpu().numpy()


def average_precision_with_ci(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, n_bootstrap: int,
                              seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """AP of ``scores`` against binary ``y`` (``sklearn.metrics.average_precision_score``), its prevalence, and a
    percentile bootstrap CI resampling the ``groups`` (volumes) with replacement; NaN when ``y`` has one class.
    Resamples with one class only are dropped (``n_bootstrap_used``)."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(y).astype(int)
    out = {"ap": math.nan, "ap_ci_low": math.nan, "ap_ci_high": math.nan, "prevalence": float(y.mean()) if len(y)
           else math.nan, "n_pos": float(y.sum()), "n_neg": float(len(y) - y.sum()), "n_bootstrap_used": 0.0}
    if len(np.unique(y)) < 2:
        return out
    out["ap"] = float(average_precision_score(y, scores))
    if n_bootstrap > 0:
        uniq, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
        rng = np.random.default_rng(seed)
        vals = []
        for _ in range(n_bootstrap):
            idx = np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])
            if 0 < y[idx].sum() < len(idx):
                vals.append(average_precision_score(y[idx], scores[idx]))
        if vals:
            a = (1 - ci) / 2
            out["ap_ci_low"], out["ap_ci_high"] = (float(v) for v in np.quantile(vals, [a, 1 - a]))
        out["n_bootstrap_used"] = float(len(vals))
    return out


def _per_organ(scores: np.ndarray, chunks: Mapping[str, np.ndarray], groups: Sequence[str], n_bootstrap: int,
               seed: int) -> dict[str, Any]:
    per, skipped = {}, []
    for j, g in enumerate(groups):
        known = chunks["targets"][:, j] >= 0
        if not np.isfinite(scores[known, j]).all():
            per[g] = {"skipped": "not fitted (one class among the training chunks)"}
            skipped.append(g)
            continue
        res = average_precision_with_ci(scores[known, j], chunks["targets"][known, j], chunks["volume"][known],
                                        n_bootstrap, seed=seed + j)
        res["n_unknown"] = float((~known).sum())
        per[g] = res
        if not math.isfinite(res["ap"]):
            skipped.append(g)
    evaluated = [g for g in groups if g not in skipped]
    mean = {"ap": float(np.mean([per[g]["ap"] for g in evaluated])) if evaluated else math.nan,
            "prevalence": float(np.mean([per[g]["prevalence"] for g in evaluated])) if evaluated else math.nan}
    return {"per_organ": per, "mean": mean, "evaluated": evaluated, "skipped": skipped}


def organ_classification(chunks: Mapping[str, np.ndarray], prompt_emb: np.ndarray | None,
                         train: Mapping[str, np.ndarray] | None = None, groups: Sequence[str] = ORGAN_GROUPS,
                         n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Zero-shot (given ``prompt_emb``) and linear-probe (given ``train`` chunks) organ classification of
    ``chunks`` (``embed_organ_chunks``): AP per organ with volume-bootstrap CIs, the mean AP, prevalences."""
    from volvlp_ray.eval.retrieval import l2_normalize

    n_chunks = len(chunks["targets"])
    out: dict[str, Any] = {"groups": list(groups), "n_chunks": n_chunks, "n_volumes": len(chunks["keys"]),
                           "n_bootstrap": n_bootstrap,
                           "prevalence": {g: float((chunks["targets"][:, j] == 1).sum() /
                                                   max(1, (chunks["targets"][:, j] >= 0).sum()))
                                          for j, g in enumerate(groups)}}
    if n_chunks == 0:
        out["skipped"] = "no chunk with organ extents (the shards hold no organ z-extents)"
        return out
    if prompt_emb is not None:
        scores = l2_normalize(chunks["emb"]) @ l2_normalize(np.asarray(prompt_emb, dtype=np.float32)).T
        out["zeroshot"] = _per_organ(scores, chunks, groups, n_bootstrap, seed)
    if train is not None and len(train["targets"]):
        out["probe"] = _per_organ(_probe_scores(train, chunks["emb"], groups), chunks, groups, n_bootstrap, seed)
        out["probe"]["n_train_chunks"] = len(train["targets"])
    elif train is not None:
        out["probe"] = {"skipped": "the training split has no chunk with organ extents"}
    return out


def _probe_scores(train: Mapping[str, np.ndarray], test_emb: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Per organ, a logistic regression on the training chunks with a known target (NaN column when one class)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from volvlp_ray.eval.retrieval import l2_normalize

    x_tr, x_te = l2_normalize(train["emb"]), l2_normalize(test_emb)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    scores = np.full((len(x_te), len(groups)), np.nan)
    for j in range(len(groups)):
        known = train["targets"][:, j] >= 0
        y = train["targets"][known, j].astype(int)
        if len(np.unique(y)) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=1.0, max_iter=1000).fit(x_tr[known], y)
        scores[:, j] = clf.predict_proba(x_te)[:, 1]
    return scores


def flatten_organ_metrics(result: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{prefix}organ/{zeroshot|probe}/{organ}/ap`` (and ``_ci_low``/``_ci_high``/``prevalence``),
    ``.../mean/ap``, ``{prefix}organ/n_chunks``: finite values only (MLflow-ready)."""
    out = {f"{prefix}organ/n_chunks": float(result.get("n_chunks", 0))}
    for kind in ("zeroshot", "probe"):
        res = result.get(kind)
        if not res or "per_organ" not in res:
            continue
        for g, m in res["per_organ"].items():
            for k in ("ap", "ap_ci_low", "ap_ci_high", "prevalence"):
                v = m.get(k, math.nan)
                if isinstance(v, float) and math.isfinite(v):
                    out[f"{prefix}organ/{kind}/{g}/{k}"] = v
        if math.isfinite(res["mean"]["ap"]):
            out[f"{prefix}organ/{kind}/mean/ap"] = res["mean"]["ap"]
    return out


def plot_organ_radar(result: Mapping[str, Any], title: str = "Organ classification: AP per organ"):
    """A polar chart of AP per organ for zero-shot and the probe, with each organ's prevalence (the AP of a
    random ranking) as a dashed line (SigVLP's Fig. 1). Returns the matplotlib Figure, or None with nothing to
    draw."""
    from volvlp_ray.eval.plots import _figure

    series = {k: result[k] for k in ("zeroshot", "probe") if isinstance(result.get(k), dict) and result[k].get("evaluated")}
    if not series:
        return None
    organs = [g for g in result["groups"] if any(g in s["evaluated"] for s in series.values())]
    if len(organs) < 3:
        return None
    angles = np.linspace(0, 2 * np.pi, len(organs), endpoint=False)
    closed = np.r_[angles, angles[:1]]
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot(111, projection="polar")
    for kind, res in series.items():
        vals = [res["per_organ"][g].get("ap", math.nan) if g in res["evaluated"] else 0.0 for g in organs]
        ax.plot(closed, np.r_[vals, vals[:1]], marker="o", label=f"{kind} (mean AP {res['mean']['ap']:.2f})")
        ax.fill(closed, np.r_[vals, vals[:1]], alpha=0.1)
    prev = [result["prevalence"][g] for g in organs]
    ax.plot(closed, np.r_[prev, prev[:1]], linestyle="--", color="grey", label="random (prevalence)")
    ax.set_xticks(angles)
    ax.set_xticklabels(organs)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right", bbox_to_anchor=(1.15, -0.12), fontsize=8)
    return fig
