"""Zero-shot multi-abnormality classification (CT-CLIP protocol) and its metrics.

Protocol: for each label a positive and a negative prompt ("{label} is present." /
"{label} is not present.") are embedded; a volume's score for the label is the softmax over the
pair of its (scaled) similarities, taken at the positive prompt.  Per label: AUROC, the
threshold closest to the ROC top-left corner, and at that threshold weighted F1, accuracy and
precision; macro means over labels; percentile bootstrap confidence intervals.

Notes on comparability with CT-CLIP's released scripts (``bootstrap_values.py``, ``eval.py``):

* F1 there is sklearn's ``average="weighted"`` (= ``f1_weighted`` here).  Precision there is
  sklearn's *binary* precision of the positive class (= ``precision_positive`` here); the paper
  text says weighted, so both are reported (``precision_weighted`` too).
* CT-CLIP picks the threshold on a grid ``np.linspace(0, 1, 100)`` with ``score > t`` (last best
  wins): ``threshold_mode="grid"``.  The default ``"roc"`` uses every distinct score (exact ROC
  points) with ``score >= t`` and, among equally close points, the highest threshold.
* Thresholds are chosen once on the full set and kept fixed inside the bootstrap, as CT-CLIP does.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy.special import expit

from volvlp_ray.eval.retrieval import l2_normalize, to_numpy

__all__ = [
    "DEFAULT_PROMPTS",
    "THRESHOLD_METRICS",
    "build_prompts",
    "zero_shot_scores",
    "auroc",
    "bootstrap_auroc_weights",
    "select_thresholds",
    "classification_metrics",
    "flatten_metrics",
]

log = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[str, str] = ("{label} is present.", "{label} is not present.")
THRESHOLD_METRICS: tuple[str, ...] = (
    "f1_weighted",
    "accuracy",
    "precision_weighted",
    "precision_positive",
    "sensitivity",
    "specificity",
)
_BOOT_BLOCK = 200  # bootstrap resamples processed together: memory ~ BLOCK x N floats


def build_prompts(
    label_names: Sequence[str], templates: Sequence[str] = DEFAULT_PROMPTS
) -> tuple[list[str], list[str]]:
    """Positive and negative prompt per label: ``(["X is present.", …], ["X is not present.", …])``.

    ``templates`` is a ``(positive, negative)`` pair of format strings with a ``{label}`` field,
    e.g. CT-CLIP's released inference script uses ``("{label}.", "not {label}.")``.
    """
    if len(templates) != 2 or not all("{label}" in t for t in templates):
        raise ValueError(f"templates must be a (positive, negative) pair containing '{{label}}', got {templates!r}")
    pos, neg = templates
    return [pos.format(label=n) for n in label_names], [neg.format(label=n) for n in label_names]


def zero_shot_scores(
    image_emb: Any,
    pos_text_emb: Any,
    neg_text_emb: Any,
    logit_scale: float = 1.0,
    normalize: bool = True,
) -> np.ndarray:
    """p(present) per volume and label: softmax over (present, not present) of scaled similarities.

    Args:
        image_emb: ``(N, E)`` volume embeddings.
        pos_text_emb: ``(L, E)`` embeddings of the positive prompts.
        neg_text_emb: ``(L, E)`` embeddings of the negative prompts.
        logit_scale: temperature, already exponentiated (open_clip convention).
        normalize: L2-normalise all embeddings first (cosine similarity).

    Returns:
        ``(N, L)`` scores in ``[0, 1]``.
    """
    img, pos, neg = to_numpy(image_emb), to_numpy(pos_text_emb), to_numpy(neg_text_emb)
    if img.ndim != 2 or pos.ndim != 2 or pos.shape != neg.shape or pos.shape[1] != img.shape[1]:
        raise ValueError(f"expected image (N, E), texts (L, E); got {img.shape}, {pos.shape}, {neg.shape}")
    if normalize:
        img, pos, neg = l2_normalize(img), l2_normalize(pos), l2_normalize(neg)
    # softmax([a, b])[0] == sigmoid(a - b)
    return expit(float(logit_scale) * (img @ pos.T - img @ neg.T))


def bootstrap_auroc_weights(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one label under per-case multiplicities (a bootstrap resample is a weight vector).

    Mann-Whitney form with ties counted 1/2 (identical to ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: ``(N,)``; y: ``(N,)`` binary; weights: ``(B, N)`` non-negative case weights.

    Returns:
        ``(B,)`` AUROC per weight vector; NaN where one class has zero weight.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], y[order].astype(bool)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of equal scores, ascending
    wp = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)  # (B, G) positive weight per group
    wn = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    num = np.sum(wp * (neg_below + 0.5 * wn), axis=1)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def auroc(scores: Any, y: Any) -> float:
    """AUROC of ``(N,)`` scores against ``(N,)`` binary labels; NaN if only one class is present."""
    s, t = to_numpy(scores).ravel(), to_numpy(y).ravel()
    return float(bootstrap_auroc_weights(s, t, np.ones((1, len(s))))[0])


def select_thresholds(
    scores: np.ndarray, labels: np.ndarray, mode: Literal["roc", "grid"] = "roc", grid_size: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Per label, the threshold whose ROC point is closest to (FPR 0, TPR 1).

    Args:
        scores, labels: ``(N, L)``; every label must have both classes.
        mode: ``"roc"`` – exact ROC points, predict ``score >= t``, ties → highest threshold;
            ``"grid"`` – CT-CLIP's ``linspace(0, 1, grid_size)``, predict ``score > t``, ties → last.

    Returns:
        thresholds ``(L,)`` and the binary predictions ``(N, L)`` they give.
    """
    n, n_labels = scores.shape
    thresholds = np.empty(n_labels)
    preds = np.empty((n, n_labels), dtype=bool)
    for j in range(n_labels):
        s, y = scores[:, j], labels[:, j].astype(bool)
        n_pos, n_neg = y.sum(), (~y).sum()
        if mode == "roc":
            order = np.argsort(-s, kind="stable")
            s_desc, y_desc = s[order], y[order]
            last = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
            tpr = np.cumsum(y_desc)[last] / n_pos
            fpr = np.cumsum(~y_desc)[last] / n_neg
            best = int(np.argmin((1 - tpr) ** 2 + fpr**2))  # first = highest threshold
            thresholds[j] = s_desc[last[best]]
            preds[:, j] = s >= thresholds[j]
        elif mode == "grid":
            grid = np.linspace(0.0, 1.0, grid_size)
            above = s[None, :] > grid[:, None]  # (G, N)
            tpr = (above & y).sum(1) / n_pos
            fpr = (above & ~y).sum(1) / n_neg
            dist = (1 - tpr) ** 2 + fpr**2
            best = int(np.flatnonzero(dist <= dist.min())[-1])
            thresholds[j] = grid[best]
            preds[:, j] = above[best]
        else:
            raise ValueError(f"threshold mode must be 'roc' or 'grid', got {mode!r}")
    return thresholds, preds


def _threshold_metrics(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from (weighted) confusion counts of any broadcastable shape; sklearn's zero_division=0."""

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)

    n_pos, n_neg = tp + fn, tn + fp
    total = n_pos + n_neg
    prec_pos, prec_neg = div(tp, tp + fp), div(tn, tn + fn)
    f1_pos, f1_neg = div(2 * tp, 2 * tp + fp + fn), div(2 * tn, 2 * tn + fn + fp)
    return {
        "f1_weighted": div(n_pos * f1_pos + n_neg * f1_neg, total),
        "accuracy": div(tp + tn, total),
        "precision_weighted": div(n_pos * prec_pos + n_neg * prec_neg, total),
        "precision_positive": prec_pos,
        "sensitivity": np.where(n_pos > 0, div(tp, n_pos), np.nan),
        "specificity": np.where(n_neg > 0, div(tn, n_neg), np.nan),
    }


def _all_metrics(
    scores: np.ndarray, labels: np.ndarray, preds: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric, ``(B, L)``, for case weights ``(B, N)`` (a row of ones = the point estimate)."""
    y = labels.astype(bool)
    out = {"auroc": np.stack([bootstrap_auroc_weights(scores[:, j], y[:, j], weights) for j in range(y.shape[1])], 1)}
    tp, fp = weights @ (y & preds), weights @ (~y & preds)
    fn, tn = weights @ (y & ~preds), weights @ (~y & ~preds)
    out.update(_threshold_metrics(tp, fp, fn, tn))
    return out


def classification_metrics(
    scores: Any,
    labels: Any,
    label_names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    threshold_mode: Literal["roc", "grid"] = "roc",
) -> dict[str, Any]:
    """Per-label and macro-mean AUROC / F1 / accuracy / precision with bootstrap CIs.

    Args:
        scores: ``(N, L)`` per-case scores (higher = more likely present), e.g. :func:`zero_shot_scores`.
        labels: ``(N, L)`` binary ground truth.
        label_names: ``L`` names.
        n_bootstrap: resamples of the cases (with replacement); 0 disables CIs (they are NaN).
        seed: RNG seed for the resamples (the same resamples serve every label, so the CI of the
            mean reflects their correlation).
        ci: two-sided percentile interval coverage.
        threshold_mode: see :func:`select_thresholds`.

    A label whose ground truth has a single class has no AUROC or ROC threshold: it is skipped
    (NaN metrics, listed in ``skipped``, logged) and left out of the means.  Within a resample a
    label that happens to lose a class gets NaN AUROC there and is left out of that resample's
    mean (``n_bootstrap_degenerate`` counts such resamples).

    Returns:
        ``{"per_label": {name: {metric, metric_ci_low, metric_ci_high, threshold, n_pos, n_neg}},
        "mean": {metric, metric_ci_low, metric_ci_high}, "skipped": [names], "n_cases",
        "n_labels", "n_labels_evaluated", "n_bootstrap", "n_bootstrap_degenerate", "ci"}``
        with metrics ``auroc`` and :data:`THRESHOLD_METRICS`.  Use :func:`flatten_metrics` to log it.
    """
    s, lab = to_numpy(scores), to_numpy(labels)
    names = [str(n) for n in label_names]
    if s.ndim != 2 or s.shape != lab.shape or s.shape[1] != len(names):
        raise ValueError(f"scores {s.shape}, labels {lab.shape} and {len(names)} label_names disagree")
    if len(set(names)) != len(names):
        raise ValueError("label_names must be unique")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    if not np.all((lab == 0) | (lab == 1)):
        raise ValueError("labels must be binary (0/1)")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n, n_labels = s.shape
    n_pos = lab.sum(0)
    ok = (n_pos > 0) & (n_pos < n)
    skipped = [names[j] for j in np.flatnonzero(~ok)]
    if skipped:
        log.warning("classification_metrics: %d label(s) with a single class skipped: %s", len(skipped), skipped)

    metric_names = ("auroc", *THRESHOLD_METRICS)
    point = {m: np.full(n_labels, np.nan) for m in metric_names}
    thresholds = np.full(n_labels, np.nan)
    lo = {m: np.full(n_labels, np.nan) for m in metric_names}
    hi = {m: np.full(n_labels, np.nan) for m in metric_names}
    mean_point = {m: math.nan for m in metric_names}
    mean_lo, mean_hi = dict(mean_point), dict(mean_point)
    n_degenerate = 0

    if ok.any():
        s_ok, lab_ok = s[:, ok], lab[:, ok]
        thr, preds = select_thresholds(s_ok, lab_ok, mode=threshold_mode)
        thresholds[ok] = thr
        for m, v in _all_metrics(s_ok, lab_ok, preds, np.ones((1, n))).items():
            point[m][ok] = v[0]
            mean_point[m] = float(np.mean(v[0]))
        if n_bootstrap > 0:
            rng = np.random.default_rng(seed)
            boot = {m: [] for m in metric_names}
            for start in range(0, n_bootstrap, _BOOT_BLOCK):
                b = min(_BOOT_BLOCK, n_bootstrap - start)
                idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
                weights = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
                for m, v in _all_metrics(s_ok, lab_ok, preds, weights).items():
                    boot[m].append(v)
            q = (100 * (1 - ci) / 2, 100 * (1 + ci) / 2)
            for m in metric_names:
                samples = np.concatenate(boot[m], axis=0)  # (B, L_ok)
                if m == "auroc":
                    n_degenerate = int(np.isnan(samples).any(1).sum())
                per = np.nanpercentile(samples, q, axis=0)
                lo[m][ok], hi[m][ok] = per[0], per[1]
                means = np.nanmean(samples, axis=1)
                mean_lo[m], mean_hi[m] = (float(x) for x in np.nanpercentile(means, q))

    per_label: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        entry: dict[str, float] = {}
        for m in metric_names:
            entry[m] = float(point[m][j])
            entry[f"{m}_ci_low"] = float(lo[m][j])
            entry[f"{m}_ci_high"] = float(hi[m][j])
        entry["threshold"] = float(thresholds[j])
        entry["n_pos"] = float(n_pos[j])
        entry["n_neg"] = float(n - n_pos[j])
        per_label[name] = entry
    mean = {}
    for m in metric_names:
        mean[m], mean[f"{m}_ci_low"], mean[f"{m}_ci_high"] = mean_point[m], mean_lo[m], mean_hi[m]
    return {
        "per_label": per_label,
        "mean": mean,
        "skipped": skipped,
        "n_cases": n,
        "n_labels": n_labels,
        "n_labels_evaluated": int(ok.sum()),
        "n_bootstrap": int(n_bootstrap),
        "n_bootstrap_degenerate": n_degenerate,
        "ci": float(ci),
    }


_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def flatten_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a nested metrics dict into ``{"prefix/a/b": float}`` that ``mlflow.log_metrics`` accepts.

    Keys are joined with ``/``; characters MLflow refuses (``@``, parentheses, …) become ``_``.
    Non-numeric leaves (lists of names, arrays) and non-finite values (NaN of skipped labels)
    are left out – the skips are still visible through the ``n_*`` counts.
    """
    out: dict[str, float] = {}
    for key, value in result.items():
        name = _BAD_KEY_CHARS.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out
