"""Linear probe: one logistic regression per label on frozen embeddings, scored on a test split."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from volvlp_ray.eval.retrieval import l2_normalize, to_numpy
from volvlp_ray.eval.zeroshot import THRESHOLD_METRICS, classification_metrics

__all__ = ["linear_probe"]

log = logging.getLogger(__name__)


def _split(emb: Any, labels: Any, n_labels: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = to_numpy(emb), to_numpy(labels)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or y.shape[1] != n_labels:
        raise ValueError(f"{name}: expected emb (N, E) and labels (N, {n_labels}), got {x.shape}, {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} embeddings contain NaN or inf")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} labels must be binary (0/1)")
    return x, y


def linear_probe(
    train_emb: Any,
    train_labels: Any,
    test_emb: Any,
    test_labels: Any,
    label_names: Sequence[str],
    C: float = 1.0,
    max_iter: int = 1000,
    normalize: bool = True,
    standardize: bool = True,
    class_weight: str | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Multi-label linear probe (L-BFGS logistic regression per label) with test-set metrics.

    Args:
        train_emb: ``(N_train, E)``; train_labels: ``(N_train, L)`` binary.
        test_emb: ``(N_test, E)``; test_labels: ``(N_test, L)`` binary.
        label_names: ``L`` names.
        C: inverse L2 regularisation strength; max_iter: L-BFGS iterations.
        normalize: L2-normalise embeddings first (as for retrieval); standardize: z-score the
            features with statistics of the training split.
        class_weight: passed to ``LogisticRegression`` (e.g. ``"balanced"``).
        n_bootstrap, seed, ci: bootstrap CIs on the test set (0 = none, the default, for speed).

    A label with a single class in the training split cannot be fitted: it is skipped (listed in
    ``skipped_train``, logged, NaN metrics).  Labels with a single class in the test split are
    skipped by :func:`classification_metrics` (listed in ``skipped``).

    Returns:
        :func:`classification_metrics`'s dict over all ``L`` labels (AUROC, thresholded metrics,
        means over evaluated labels) plus ``skipped_train`` and ``scores`` – the ``(N_test, L)``
        predicted probabilities (NaN columns for labels skipped in training).
    """
    names = [str(n) for n in label_names]
    x_tr, y_tr = _split(train_emb, train_labels, len(names), "train")
    x_te, y_te = _split(test_emb, test_labels, len(names), "test")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"train and test embedding widths differ: {x_tr.shape[1]} vs {x_te.shape[1]}")
    if normalize:
        x_tr, x_te = l2_normalize(x_tr), l2_normalize(x_te)
    if standardize:
        scaler = StandardScaler().fit(x_tr)
        x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)

    scores = np.full(y_te.shape, np.nan)
    skipped_idx: list[int] = []
    for j, name in enumerate(names):
        if len(np.unique(y_tr[:, j])) < 2:
            skipped_idx.append(j)
            continue
        clf = LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x_tr, y_tr[:, j].astype(int))
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.warning("linear_probe: logistic regression for %r did not converge in %d iterations", name, max_iter)
        scores[:, j] = clf.predict_proba(x_te)[:, 1]
    skipped_train = [names[j] for j in skipped_idx]
    if skipped_train:
        log.warning(
            "linear_probe: %d label(s) with a single class in train skipped: %s", len(skipped_train), skipped_train
        )

    fitted = [j for j in range(len(names)) if j not in skipped_idx]
    result = classification_metrics(
        scores[:, fitted], y_te[:, fitted], [names[j] for j in fitted],
        n_bootstrap=n_bootstrap if fitted else 0, seed=seed, ci=ci,
    )
    fitted_entries = iter(result["per_label"].values())
    per_label = {}
    for j, name in enumerate(names):  # the caller's label order, skipped labels included
        if j in skipped_idx:
            entry = {f"{m}{s}": math.nan for m in ("auroc", *THRESHOLD_METRICS) for s in ("", "_ci_low", "_ci_high")}
            entry.update(threshold=math.nan, n_pos=float(y_te[:, j].sum()), n_neg=float(len(y_te) - y_te[:, j].sum()))
            per_label[name] = entry
        else:
            per_label[name] = next(fitted_entries)
    result["per_label"] = per_label
    result["n_labels"] = len(names)
    result["skipped_train"] = skipped_train
    result["scores"] = scores
    return result
