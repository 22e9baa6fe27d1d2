"""Pairwise affinities and soft targets for SWCA (SCALE-VLP).

All functions compare a block of *row* samples (n of them) with a block of *column* samples (m of
them) and return an ``(n, m)`` matrix with values in ``[0, 1]``. They never carry gradients: targets are
constants of the loss.

Terms (each symmetric in its two arguments):

- **spatial** ``S_ij = [study_i == study_j] * exp(-(z_i - z_j)^2 / (2 sigma^2))``: chunks of the same study
  are related by a Gaussian kernel on the distance (mm) between their z-centres; other studies give 0.
- **knowledge** ``K_ij = <l_i, l_j> / (|l_i|^2 + |l_j|^2 - <l_i, l_j>)``: the Tanimoto coefficient of the
  reports' abnormality / concept vectors, which is the Jaccard index for multi-hot vectors and stays in
  ``[0, 1]`` for soft (non-negative) ones. Two all-zero vectors (two normal reports) give 1.
- **intra** ``F_ij = (relu(<x_i, x_j>) + relu(<y_i, y_j>)) / 2``: intra-modal cosine similarity of the
  (detached, L2-normalised) image and text features.

``soft_targets`` combines them: ``W = (w_s S + w_k K + w_f F) / (w_s + w_k + w_f)`` with ``W_ii = 1``
(a sample with itself), and ``A = alpha * I + (1 - alpha) * W``. ``I`` and the diagonal are decided by the
global sample index (meta key ``"index"``), so blocks of a distributed batch are handled the same way as
a whole batch.

Meta keys understood by the losses (all per sample, first dimension B): ``study_id`` (LongTensor),
``z_center_mm`` (FloatTensor), ``labels`` (FloatTensor ``(B, L)``, multi-hot).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from volvlp_ray.data.ctrate import LABELS

__all__ = [
    "META_KEYS",
    "CT_RATE_ABNORMALITIES",
    "check_meta",
    "spatial_affinity",
    "knowledge_affinity",
    "feature_affinity",
    "soft_targets",
    "affinity_sum",
    "same_study_pairs",
    "same_study_meta",
    "SAME_STUDY",
    "SOFT_NORMS",
    "concepts_from_reports",
]

META_KEYS: tuple[str, ...] = ("study_id", "z_center_mm", "labels")
"""Per-sample metadata a loss may consume (``**meta`` of the loss call)."""

CT_RATE_ABNORMALITIES: tuple[str, ...] = LABELS
"""The 18 CT-RATE abnormality labels, in the order of the dataset's label CSV (``volvlp_ray.data.ctrate.LABELS``)."""


def check_meta(meta: Mapping[str, Tensor | None], required: Sequence[str], batch: int, owner: str) -> None:
    """Raise a clear error for unknown keys, missing required keys, or a wrong first dimension.

    Args:
        meta: the ``**meta`` keyword arguments of a loss call.
        required: keys the loss needs with its current weights.
        batch: local batch size B of the features.
        owner: name used in messages (the loss class).
    """
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise TypeError(f"{owner}: unknown meta keyword(s) {unknown}; known: {list(META_KEYS)}")
    for key in required:
        value = meta.get(key)
        if value is None:
            raise ValueError(
                f"{owner}: meta '{key}' is required by its configuration (a soft term using it has "
                f"weight > 0 and alpha < 1) but was not passed; pass {key}=... or set that weight to 0"
            )
        if not isinstance(value, Tensor) or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{owner}: meta '{key}' must be a tensor with first dimension {batch}, got {shape}")
    labels = meta.get("labels")
    if "labels" in required and labels is not None and labels.dim() != 2:
        raise ValueError(f"{owner}: meta 'labels' must be (B, L), got {tuple(labels.shape)}")


def _real(t: Tensor) -> Tensor:
    """Floating point of at least float32 precision (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def spatial_affinity(study_i: Tensor, z_i: Tensor, study_j: Tensor, z_j: Tensor, sigma_mm: float) -> Tensor:
    """Gaussian kernel on the z-distance of chunks of the same study.

    Args: ``study_i (n,)``, ``z_i (n,)``, ``study_j (m,)``, ``z_j (m,)``; ``sigma_mm > 0``.
    Returns: ``(n, m)`` float tensor in ``[0, 1]``, 0 across studies.
    """
    dz = _real(z_i)[:, None] - _real(z_j)[None, :]
    kernel = torch.exp(-0.5 * (dz / sigma_mm) ** 2)
    return kernel * (study_i[:, None] == study_j[None, :])


def knowledge_affinity(labels_i: Tensor, labels_j: Tensor) -> Tensor:
    """Tanimoto (= Jaccard for multi-hot) similarity of abnormality / concept vectors.

    Args: ``labels_i (n, L)``, ``labels_j (m, L)``, non-negative.
    Returns: ``(n, m)`` in ``[0, 1]``; two all-zero vectors give 1.
    """
    a, b = _real(labels_i), _real(labels_j)
    inter = a @ b.T
    union = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.ones_like(inter))


def feature_affinity(image_i: Tensor, text_i: Tensor, image_j: Tensor, text_j: Tensor) -> Tensor:
    """Mean of the clipped intra-modal cosine similarities (image-image and text-text), detached.

    Args: ``image_i, text_i (n, E)``, ``image_j, text_j (m, E)``, L2-normalised.
    Returns: ``(n, m)`` in ``[0, 1]``.
    """
    sim_img = _real(image_i.detach()) @ _real(image_j.detach()).T
    sim_txt = _real(text_i.detach()) @ _real(text_j.detach()).T
    return 0.5 * (sim_img.clamp(0, 1) + sim_txt.clamp(0, 1))


SAME_STUDY: tuple[str, ...] = ("negative", "ignore", "soft")
"""How a loss treats pairs of different samples of one study (``loss.same_study``)."""
SOFT_NORMS: tuple[str, ...] = ("row", "none")
"""How SWCA turns the affinities into targets (``loss.soft_norm``)."""


def same_study_pairs(rows: Mapping[str, Tensor], cols: Mapping[str, Tensor]) -> Tensor:
    """``(n, m)`` bool: the pairs of *different* samples (global ``index``) of the same study (``study_id``)."""
    return (rows["study_id"][:, None] == cols["study_id"][None, :]) & (rows["index"][:, None] != cols["index"][None, :])


def same_study_meta(same_study: str) -> tuple[str, ...]:
    """Meta keys a loss needs to treat same-study pairs as ``same_study`` says."""
    if same_study not in SAME_STUDY:
        raise ValueError(f"same_study must be one of {list(SAME_STUDY)}, got {same_study!r}")
    return {"negative": (), "ignore": ("study_id",), "soft": ("study_id", "z_center_mm")}[same_study]


def affinity_sum(
    rows: Mapping[str, Tensor],
    cols: Mapping[str, Tensor],
    *,
    spatial_weight: float = 0.0,
    knowledge_weight: float = 0.0,
    intra_weight: float = 0.0,
    spatial_sigma_mm: float = 50.0,
    same_study: str = "soft",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``W`` off the diagonal: ``(w_s S + w_k K + w_f F) / (w_s + w_k + w_f)`` for pairs of different samples, 0 for a
    sample with itself, and 0 for pairs of one study unless ``same_study == "soft"`` (then their W counts). ``(n, m)``,
    no gradient. ``soft_targets`` mixes it with the identity; with ``norm="row"`` its row sums over the global
    columns (``row_sum`` in ``rows``) normalise it."""
    total = spatial_weight + knowledge_weight + intra_weight
    with torch.no_grad():
        same = rows["index"][:, None] == cols["index"][None, :]
        w = torch.zeros(same.shape, dtype=dtype, device=same.device)
        if total <= 0.0:
            return w
        if spatial_weight > 0:
            w += spatial_weight * spatial_affinity(
                rows["study_id"], rows["z_center_mm"], cols["study_id"], cols["z_center_mm"], spatial_sigma_mm
            )
        if knowledge_weight > 0:
            w += knowledge_weight * knowledge_affinity(rows["labels"], cols["labels"])
        if intra_weight > 0:
            w += intra_weight * feature_affinity(rows["image"], rows["text"], cols["image"], cols["text"])
        w = torch.where(same, torch.zeros_like(w), w / total)
        if same_study != "soft":
            w = torch.where(same_study_pairs(rows, cols), torch.zeros_like(w), w)
        return w


def soft_targets(
    rows: Mapping[str, Tensor],
    cols: Mapping[str, Tensor],
    *,
    alpha: float,
    spatial_weight: float = 0.0,
    knowledge_weight: float = 0.0,
    intra_weight: float = 0.0,
    spatial_sigma_mm: float = 50.0,
    norm: str = "none",
    form: str = "sigmoid",
    same_study: str = "soft",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """SWCA target matrix for a block of pairs, ``(n, m)`` in ``[0, 1]``, no gradient.

    ``norm="none"``: ``A = alpha * I + (1 - alpha) * W`` with ``W_ii = 1`` (SCALE-VLP's formula; the softmax form
    divides each row by its sum, so the true pair's share falls as the batch grows). ``norm="row"``: the off-diagonal
    ``W`` of each row is divided by its sum over the global columns, ``rows["row_sum"]`` (``(n,)``, from
    ``affinity_sum``), so the related samples of a row share ``1 - alpha`` of target mass at any batch size; the true
    pair gets 1 (``form="sigmoid"``: a pair's BCE target) or ``alpha`` (``form="softmax"``: the row is a
    distribution); a row with no related sample (sum 0) keeps the identity.

    Args:
        rows, cols: per-sample tensors of the row block (n) and column block (m). Always ``"index"``
            (global sample index, LongTensor); ``study_id`` and ``z_center_mm`` when the spatial term is
            on (``study_id`` also unless ``same_study="soft"``), ``labels`` when the knowledge term is on,
            ``image`` and ``text`` (features) when the intra term is on.
        alpha: weight of the identity, in ``[0, 1]``.
        spatial_weight, knowledge_weight, intra_weight: non-negative term weights; the combination is
            divided by their sum so that ``W`` stays in ``[0, 1]``. All zero means ``W = I``.
        spatial_sigma_mm: bandwidth of the spatial kernel.
        norm: "none" or "row" (see above).
        form: "sigmoid" or "softmax" (only "row" tells them apart).
        same_study: "soft" (pairs of one study keep their W), "negative" or "ignore" (their W is 0; the loss
            leaves ignored pairs out).
        dtype: floating dtype of the result (the loss passes its logits' dtype).
    """
    same = rows["index"][:, None] == cols["index"][None, :]
    eye = same.to(dtype)
    total = spatial_weight + knowledge_weight + intra_weight
    if alpha >= 1.0 or total <= 0.0:
        return eye
    with torch.no_grad():
        w = affinity_sum(rows, cols, spatial_weight=spatial_weight, knowledge_weight=knowledge_weight,
                         intra_weight=intra_weight, spatial_sigma_mm=spatial_sigma_mm, same_study=same_study,
                         dtype=dtype)
        if norm == "row":
            row_sum = rows["row_sum"].to(dtype)[:, None]
            related = row_sum > 0
            w = torch.where(related, w / row_sum.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))
            diag = torch.where(related, torch.full_like(row_sum, alpha), torch.ones_like(row_sum)) \
                if form == "softmax" else 1.0
            return (diag * eye + (1.0 - alpha) * w).to(dtype)
        if norm != "none":
            raise ValueError(f"norm must be one of {list(SOFT_NORMS)}, got {norm!r}")
        w = torch.where(same, torch.ones_like(w), w)
        return (alpha * eye + (1.0 - alpha) * w).to(dtype)


_NEGATION = re.compile(r"\b(no|not|without|absent|absence|negative for|free of|ruled out|neither|nor)\b")


def _concept_pattern(concept: str) -> re.Pattern[str]:
    words = [re.escape(w) + "(?:s|es)?" for w in concept.lower().split()]
    return re.compile(r"\b" + r"[\s-]+".join(words) + r"\b")


def concepts_from_reports(reports: Sequence[str], concepts: Sequence[str] = CT_RATE_ABNORMALITIES) -> Tensor:
    """Multi-hot concept vectors extracted from report text (a simple knowledge prior).

    A concept is present when its words (plural forms allowed) occur in a sentence that has no negation
    cue ("no", "without", "absent", ...). Crude on purpose: labels from a classifier or an ontology
    (RadGraph, UMLS) are better inputs for ``labels=`` when available.

    Returns: ``(len(reports), len(concepts))`` float tensor of 0/1.
    """
    patterns = [_concept_pattern(c) for c in concepts]
    out = torch.zeros(len(reports), len(concepts))
    for i, report in enumerate(reports):
        for sentence in re.split(r"[.;\n]+", report.lower()):
            if not sentence.strip() or _NEGATION.search(sentence):
                continue
            for k, pattern in enumerate(patterns):
                if pattern.search(sentence):
                    out[i, k] = 1.0
    return out
