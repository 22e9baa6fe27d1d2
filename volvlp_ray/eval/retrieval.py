"""Cross-modal and volume-to-volume retrieval metrics (CT-CLIP / CT-RATE protocols).

All functions take numpy arrays or torch tensors (any device / dtype) and return plain dicts of
Python floats whose keys are valid MLflow metric names (no ``@``: MLflow refuses it, so Recall@5
is ``recall_at_5``).

Conventions
-----------
* Similarity is the cosine similarity: both sides are L2-normalised first (``normalize=True``);
  pass ``normalize=False`` for a raw dot product.
* Query ``i``'s correct target is target ``i``.
* **Ties are pessimistic**: the rank of the correct target is the number of targets whose
  similarity is ``>=`` the correct one's (itself included).  A collapsed encoder (all embeddings
  equal) therefore gets rank ``N`` for every query, never a lucky rank 1.
* **K larger than the gallery**: ``recall_at_K`` is still reported under the requested name but
  computed at ``min(K, N)`` (so it is 1.0, and so is its random baseline); ``n_ks_capped``
  counts how many requested Ks were capped.  Nothing is silently dropped.
* Every metric comes with its chance level under a uniformly random ranking
  (``<metric>_random``): Recall@K ``min(K, N)/N``, MRR ``H_N/N``, median rank ``(N+1)/2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_KS",
    "to_numpy",
    "l2_normalize",
    "correct_ranks",
    "retrieval_metrics",
    "text_to_volume",
    "volume_to_text",
    "bidirectional_retrieval",
    "label_jaccard_at_k",
    "pairwise_jaccard",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100)
_CHUNK = 1024  # query rows per similarity block: bounds memory at CHUNK x N floats


def to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Convert a numpy array, torch tensor (any device, bf16 included) or nested list to numpy."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _embeddings(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, E), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf ({int((~np.isfinite(arr)).sum())} values)")
    return arr


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of ``(N, E)``; all-zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    return ks


def correct_ranks(query_emb: Any, target_emb: Any, normalize: bool = True) -> np.ndarray:
    """1-based rank of target ``i`` among all targets for query ``i`` (pessimistic ties).

    Args:
        query_emb: ``(N, E)``.
        target_emb: ``(N, E)``; row ``i`` is the correct match of query row ``i``.
        normalize: cosine similarity if True, raw dot product otherwise.

    Returns:
        ``(N,)`` int64 ranks in ``[1, N]``.
    """
    q = _embeddings(query_emb, "query_emb")
    t = _embeddings(target_emb, "target_emb")
    if q.shape != t.shape:
        raise ValueError(f"query_emb {q.shape} and target_emb {t.shape} must have the same shape")
    if normalize:
        q, t = l2_normalize(q), l2_normalize(t)
    n = q.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        sim = q[start:stop] @ t.T  # (c, N)
        correct = sim[np.arange(stop - start), np.arange(start, stop)]
        ranks[start:stop] = (sim >= correct[:, None]).sum(axis=1)
    return ranks


def retrieval_metrics(
    query_emb: Any,
    target_emb: Any,
    ks: Sequence[int] = DEFAULT_KS,
    normalize: bool = True,
) -> dict[str, float]:
    """Recall@K, MRR and median rank of paired retrieval, each with its random baseline.

    Args:
        query_emb: ``(N, E)`` queries (e.g. report embeddings).
        target_emb: ``(N, E)`` gallery; row ``i`` is query ``i``'s correct item.
        ks: cut-offs for Recall@K (capped at ``N``, see the module docstring).

    Returns:
        ``recall_at_K``, ``recall_at_K_random`` for each K, ``mrr``, ``mrr_random``,
        ``median_rank``, ``median_rank_random``, ``mean_rank``, ``mean_rank_random``,
        ``n`` (gallery size) and ``n_ks_capped``.
    """
    ks = _check_ks(ks)
    ranks = correct_ranks(query_emb, target_emb, normalize=normalize)
    n = len(ranks)
    out: dict[str, float] = {}
    for k in ks:
        k_eff = min(k, n)
        out[f"recall_at_{k}"] = float(np.mean(ranks <= k_eff))
        out[f"recall_at_{k}_random"] = k_eff / n
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["mrr_random"] = harmonic / n
    out["median_rank"] = float(np.median(ranks))
    out["median_rank_random"] = (n + 1) / 2
    out["mean_rank"] = float(np.mean(ranks))
    out["mean_rank_random"] = (n + 1) / 2
    out["n"] = float(n)
    out["n_ks_capped"] = float(sum(k > n for k in ks))
    return out


def text_to_volume(
    text_emb: Any, volume_emb: Any, ks: Sequence[int] = DEFAULT_KS, normalize: bool = True
) -> dict[str, float]:
    """Report → volume retrieval: :func:`retrieval_metrics` with reports as queries. ``(N, E)`` each."""
    return retrieval_metrics(text_emb, volume_emb, ks=ks, normalize=normalize)


def volume_to_text(
    volume_emb: Any, text_emb: Any, ks: Sequence[int] = DEFAULT_KS, normalize: bool = True
) -> dict[str, float]:
    """Volume → report retrieval: :func:`retrieval_metrics` with volumes as queries. ``(N, E)`` each."""
    return retrieval_metrics(volume_emb, text_emb, ks=ks, normalize=normalize)


def bidirectional_retrieval(
    text_emb: Any, volume_emb: Any, ks: Sequence[int] = DEFAULT_KS, normalize: bool = True
) -> dict[str, float]:
    """Both directions with prefixed keys: ``t2v/recall_at_5``, ``v2t/mrr``, ``t2v/recall_at_5_random``…

    Args:
        text_emb: ``(N, E)`` report embeddings.
        volume_emb: ``(N, E)`` volume embeddings; row ``i`` belongs to report ``i``.
    """
    out = {f"t2v/{k}": v for k, v in text_to_volume(text_emb, volume_emb, ks, normalize).items()}
    out.update({f"v2t/{k}": v for k, v in volume_to_text(volume_emb, text_emb, ks, normalize).items()})
    return out


def _binary_labels(labels: Any, n: int) -> np.ndarray:
    arr = to_numpy(labels)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"labels must be (N={n}, L), got shape {arr.shape}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("labels must be binary (0/1)")
    return arr


def pairwise_jaccard(a: np.ndarray, b: np.ndarray, empty_value: float = 1.0) -> np.ndarray:
    """Jaccard index of every row pair of two binary matrices ``(N, L)``, ``(M, L)`` → ``(N, M)``.

    ``|a ∧ b| / |a ∨ b|``; two all-zero rows (two scans with no abnormality) have no union and get
    ``empty_value`` (1.0 by default: the label sets are identical, both empty).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, empty_value)
    return jac


def label_jaccard_at_k(
    volume_emb: Any,
    labels: Any,
    ks: Sequence[int] = (1, 5, 10, 50),
    normalize: bool = True,
    exclude_self: bool = True,
    abnormal_gallery_only: bool = False,
    empty_jaccard: float = 1.0,
) -> dict[str, float]:
    """Volume → volume retrieval scored by label overlap (CT-CLIP's volume-to-volume protocol).

    For each query volume, the K nearest gallery volumes (cosine similarity) are retrieved and the
    Jaccard index between the query's and each neighbour's abnormality label set is averaged;
    the metric is the mean over queries.  The random baseline is the expected Jaccard between a
    query and a uniformly random gallery item (the same for every K).

    Args:
        volume_emb: ``(N, E)`` volume embeddings.
        labels: ``(N, L)`` binary multi-abnormality labels.
        ks: neighbour counts; capped at the gallery size (``n_ks_capped`` counts them).
        exclude_self: a query never retrieves itself (default).  CT-CLIP's released script keeps it.
        abnormal_gallery_only: restrict the gallery to volumes with at least one positive label,
            as CT-CLIP's released script does (queries are still all volumes); this also means the
            empty/empty Jaccard case never arises.
        empty_jaccard: Jaccard of two all-zero label vectors (default 1.0: identical, empty sets).

    Ties in similarity are broken by gallery index (stable sort), so results are deterministic.

    Returns:
        ``jaccard_at_K`` for each K, ``jaccard_random``, ``n_queries``, ``n_gallery``,
        ``n_ks_capped``.
    """
    ks = _check_ks(ks)
    emb = _embeddings(volume_emb, "volume_emb")
    n = emb.shape[0]
    lab = _binary_labels(labels, n)
    if normalize:
        emb = l2_normalize(emb)
    gallery = np.flatnonzero(lab.sum(1) > 0) if abnormal_gallery_only else np.arange(n)
    n_gallery_eff = len(gallery) - (1 if exclude_self else 0)  # per query, at most
    if n_gallery_eff < 1:
        raise ValueError(f"volume-to-volume retrieval needs a gallery of >= 2 volumes, got {len(gallery)}")
    k_max = min(max(ks), len(gallery))
    g_emb, g_lab = emb[gallery], lab[gallery]

    sums = {k: 0.0 for k in ks}
    random_sum = 0.0
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        sim = emb[start:stop] @ g_emb.T  # (c, G)
        jac = pairwise_jaccard(lab[start:stop], g_lab, empty_jaccard)  # (c, G)
        valid = np.ones_like(sim, dtype=bool)
        if exclude_self:
            rows, cols = np.nonzero(gallery[None, :] == np.arange(start, stop)[:, None])
            valid[rows, cols] = False
            sim[rows, cols] = -np.inf
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k_max]
        top_jac = np.take_along_axis(jac, order, axis=1)
        top_valid = np.take_along_axis(valid, order, axis=1)
        n_valid = valid.sum(1)  # gallery size per query (G or G - 1)
        for k in ks:
            k_eff = np.minimum(k, n_valid)  # (c,)
            in_k = np.arange(k_max)[None, :] < k_eff[:, None]
            sums[k] += float(np.sum((top_jac * (in_k & top_valid)).sum(1) / k_eff))
        random_sum += float(np.sum((jac * valid).sum(1) / n_valid))

    out = {f"jaccard_at_{k}": sums[k] / n for k in ks}
    out["jaccard_random"] = random_sum / n
    out["n_queries"] = float(n)
    out["n_gallery"] = float(len(gallery))
    out["n_ks_capped"] = float(sum(k > n_gallery_eff for k in ks))
    return out
