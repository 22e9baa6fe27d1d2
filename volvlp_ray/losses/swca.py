"""Soft-weighted contrastive alignment (SWCA) of SCALE-VLP.

Binary positives are replaced by soft targets ``A = alpha * I + (1 - alpha) * W`` where ``W`` mixes a
spatial affinity (chunks of the same study, Gaussian kernel on the distance of their z-centres), a
knowledge affinity (Tanimoto/Jaccard of the reports' abnormality or concept vectors) and, optionally, an
intra-modal feature similarity (detached); see ``affinity.soft_targets``.

Targets that mean the same at every batch size (``norm="row"``, the default): in SCALE-VLP's formula every
off-diagonal pair adds ``(1 - alpha) * W_ij`` to a row, so the share of the true pair falls as the global batch
grows (softmax form, issue #18: ~14 % at 128, ~2 % at 1,024 with the knowledge term). With ``norm="row"`` each
row's off-diagonal ``W`` is divided by its sum over the global columns (``row_sums``, a no-gradient pass over the columns with the
loss's own exchange), so the related samples share ``1 - alpha`` and the true pair keeps ``alpha`` (softmax) or a
target of 1 (sigmoid) at any world size. ``norm="none"`` keeps SCALE-VLP's ``A_ii = 1`` and unnormalised ``W``.

Two forms, with open_clip's distributed conventions (rows local, columns global, gathers carry
gradients; the metadata ``W`` needs is gathered / exchanged along with the features):

- ``form="sigmoid"``: binary cross-entropy with soft targets over all global pairs of the rank's rows,
  divided by the local batch. ``A = I`` gives exactly ``SigmoidLoss``.
- ``form="softmax"``: cross-entropy against the row-normalised targets ``A / A.sum(1)``, image->text and
  text->image, averaged. ``A = I`` gives exactly ``ClipLoss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .affinity import (
    SAME_STUDY,
    SOFT_NORMS,
    affinity_sum,
    check_meta,
    same_study_pairs,
    soft_targets,
)
from .clip import gather_pair_features, soft_cross_entropy
from .gather import (
    EXCHANGES,
    EqualBatchCheck,
    all_gather_no_grad,
    column_sum,
    gather_meta,
    global_index,
    pairwise_sum,
)
from .sigmoid import at_least_float32, check_features

__all__ = ["SWCALoss", "FORMS"]

FORMS: tuple[str, ...] = ("sigmoid", "softmax")


class SWCALoss(nn.Module):
    """SCALE-VLP soft-weighted contrastive loss.

    Args:
        alpha: weight of the identity in the targets, ``0 <= alpha <= 1``; 1 is the hard loss.
        form: ``"sigmoid"`` (soft BCE over pairs, SigLIP-like) or ``"softmax"`` (soft InfoNCE, CLIP-like).
        spatial_weight: weight of the spatial term (needs meta ``study_id``, ``z_center_mm``).
        knowledge_weight: weight of the knowledge term (needs meta ``labels``).
        intra_weight: weight of the intra-modal feature-similarity term (needs nothing extra).
        spatial_sigma_mm: standard deviation (mm) of the spatial Gaussian kernel.
        exchange: ``"gather"`` or ``"ring"`` (sigmoid form only; see ``SigmoidLoss``).
        group: process group (default: the world).
        norm: ``"row"`` (each row's off-diagonal affinities share ``1 - alpha`` of target mass whatever the global
            batch; see ``affinity.soft_targets``) or ``"none"`` (SCALE-VLP's ``alpha * I + (1 - alpha) * W``).
        same_study: pairs of different samples of one study: ``"soft"`` (their W, whose spatial term is the kernel on
            their z-centres: SWCA's own rule), ``"negative"`` (W = 0) or ``"ignore"`` (left out of the loss; needs
            meta ``study_id`` even with alpha = 1).

    The weighted terms are divided by the sum of the weights, so ``W`` is in ``[0, 1]``; all weights 0
    means ``W = I``. A term is *used* when ``alpha < 1`` and its weight is > 0; its meta is then required
    (``meta_keys``), otherwise it may be omitted.

    Call: ``loss(image_features (B, E), text_features (B, E), logit_scale (), logit_bias () | None,
    study_id=(B,), z_center_mm=(B,), labels=(B, L))`` returns a 0-dim tensor (float32, float64 for
    float64 inputs). The softmax form ignores ``logit_bias`` (a constant shift does not change a softmax).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        form: str = "sigmoid",
        spatial_weight: float = 1.0,
        knowledge_weight: float = 1.0,
        intra_weight: float = 0.0,
        spatial_sigma_mm: float = 50.0,
        exchange: str = "gather",
        group: dist.ProcessGroup | None = None,
        norm: str = "row",
        same_study: str = "soft",
    ) -> None:
        super().__init__()
        self._batch_check = EqualBatchCheck()  # one all-gather on the first call, then host-side
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SWCALoss: alpha must be in [0, 1], got {alpha}")
        if form not in FORMS:
            raise ValueError(f"SWCALoss: form must be one of {list(FORMS)}, got {form!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"SWCALoss: exchange must be one of {list(EXCHANGES)}, got {exchange!r}")
        if form == "softmax" and exchange == "ring":
            raise ValueError("SWCALoss: exchange='ring' is implemented for form='sigmoid' only")
        if norm not in SOFT_NORMS:
            raise ValueError(f"SWCALoss: norm must be one of {list(SOFT_NORMS)}, got {norm!r}")
        weights = {"spatial_weight": spatial_weight, "knowledge_weight": knowledge_weight, "intra_weight": intra_weight}
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"SWCALoss: {name} must be >= 0, got {value}")
        if spatial_sigma_mm <= 0:
            raise ValueError(f"SWCALoss: spatial_sigma_mm must be > 0, got {spatial_sigma_mm}")
        self.alpha, self.form, self.exchange, self.group = float(alpha), form, exchange, group
        self.norm, self.same_study = norm, same_study
        soft = alpha < 1.0
        self.spatial_weight = float(spatial_weight) if soft else 0.0
        self.knowledge_weight = float(knowledge_weight) if soft else 0.0
        self.intra_weight = float(intra_weight) if soft else 0.0
        self.spatial_sigma_mm = float(spatial_sigma_mm)
        self.needs_bias: bool = form == "sigmoid"
        self.soft = self.spatial_weight + self.knowledge_weight + self.intra_weight > 0
        keys: tuple[str, ...] = ()
        if self.spatial_weight > 0:
            keys += ("study_id", "z_center_mm")
        if self.knowledge_weight > 0:
            keys += ("labels",)
        if same_study not in SAME_STUDY:
            raise ValueError(f"SWCALoss: same_study must be one of {list(SAME_STUDY)}, got {same_study!r}")
        # pairs of one study: "soft" keeps their W (SWCA's own rule); "negative" zeroes it (the study is needed only
        # when there is a W); "ignore" leaves them out of the loss, whatever alpha
        if "study_id" not in keys and (same_study == "ignore" or (same_study == "negative" and self.soft)):
            keys += ("study_id",)
        self.meta_keys: tuple[str, ...] = keys

    @property
    def needs_meta(self) -> bool:
        return bool(self.meta_keys)

    def _terms(self) -> dict:
        return {"spatial_weight": self.spatial_weight, "knowledge_weight": self.knowledge_weight,
                "intra_weight": self.intra_weight, "spatial_sigma_mm": self.spatial_sigma_mm,
                "same_study": self.same_study}

    def targets(self, rows: Mapping[str, Tensor], cols: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Soft targets ``(n, m)`` for a block of pairs (see ``affinity.soft_targets``); with ``norm="row"``
        ``rows`` carries ``row_sum`` (``row_sums``)."""
        return soft_targets(rows, cols, alpha=self.alpha, norm=self.norm, form=self.form, dtype=dtype,
                            **self._terms())

    def row_sums(self, rows: Mapping[str, Tensor], cols: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Each row's sum of off-diagonal affinities over all global columns ``(n,)`` (``norm="row"``); ``cols``
        is this rank's share, exchanged as the loss exchanges its columns."""

        def block(r: Mapping[str, Tensor], c: Mapping[str, Tensor]) -> Tensor:
            return affinity_sum(r, c, dtype=dtype, **self._terms())

        exchange = self.exchange if self.form == "sigmoid" else "gather"
        return column_sum(block, rows, cols, exchange, self.group)

    @torch.no_grad()
    def target_rows(self, image_features: Tensor, text_features: Tensor, **meta: Tensor) -> Tensor:
        """This rank's rows of the targets against all global columns, ``(B, world * B)``, columns in global
        sample order: the distributions the softmax form trains each row towards (row-normalised), or the sigmoid
        form's per-pair BCE targets. No gradient; every rank must call it (it gathers). For inspection and tests:
        e.g. the true pair's share ``target_rows(...)[i, rank * B + i]``."""
        batch = image_features.shape[0]
        check_meta(meta, self.meta_keys, batch, "SWCALoss")
        rows = {"index": global_index(batch, image_features.device, self.group)}
        rows.update({k: meta[k].detach() for k in self.meta_keys})
        cols = gather_meta(rows, self.group)
        dtype = at_least_float32(image_features[:0]).dtype
        if self.intra_weight > 0:
            rows.update(image=image_features.detach(), text=text_features.detach())
            cols.update(image=all_gather_no_grad(image_features.detach(), self.group),
                        text=all_gather_no_grad(text_features.detach(), self.group))
        if self.norm == "row" and self.soft:
            rows["row_sum"] = affinity_sum(rows, cols, dtype=dtype, **self._terms()).sum(dim=1)
        a = self.targets(rows, cols, dtype)
        return a / a.sum(dim=1, keepdim=True) if self.form == "softmax" else a

    def _pair_loss(
        self,
        x: Tensor,
        y: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        rows: Mapping[str, Tensor],
        cols: Mapping[str, Tensor],
    ) -> Tensor:
        """Soft BCE summed over the block ``x (n, E)`` x ``y (m, E)``."""
        logits = at_least_float32(scale * (x @ y.T))
        if bias is not None:
            logits = logits + bias
        if self.intra_weight > 0:
            rows, cols = {**rows, "image": x.detach()}, {**cols, "text": y.detach()}
        a = self.targets(rows, cols, logits.dtype)
        # a * softplus(-l) + (1 - a) * softplus(l); for a in {0, 1} this is SigmoidLoss term by term
        terms = -(a * F.logsigmoid(logits) + (1.0 - a) * F.logsigmoid(-logits))
        if self.same_study == "ignore":
            terms = torch.where(same_study_pairs(rows, cols), torch.zeros_like(terms), terms)
        return terms.sum()

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        **meta: Tensor,
    ) -> Tensor:
        check_features(image_features, text_features, logit_scale, "SWCALoss")
        batch = image_features.shape[0]
        check_meta(meta, self.meta_keys, batch, "SWCALoss")
        self._batch_check(batch, image_features.device, self.group)
        rows = {"index": global_index(batch, image_features.device, self.group)}
        rows.update({k: meta[k].detach() for k in self.meta_keys})
        dtype = at_least_float32(image_features[:0]).dtype
        row_norm = self.norm == "row" and self.soft
        if self.form == "sigmoid":
            cols = dict(rows)
            if self.intra_weight > 0:  # rows also need their own text, columns their own image
                rows["text"] = text_features.detach()
                cols["image"] = image_features.detach()
            if row_norm:
                rows["row_sum"] = self.row_sums(
                    {**rows, "image": image_features.detach()} if self.intra_weight > 0 else rows,
                    {**cols, "text": text_features.detach()} if self.intra_weight > 0 else cols, dtype)
            total = pairwise_sum(
                self._pair_loss,
                image_features,
                text_features,
                logit_scale,
                logit_bias,
                rows,
                cols,
                self.exchange,
                self.group,
            )
            return total / batch
        all_image, all_text = gather_pair_features(image_features, text_features, self.group)
        cols = gather_meta(rows, self.group)
        if self.intra_weight > 0:
            rows.update(image=image_features.detach(), text=text_features.detach())
            cols.update(image=all_image.detach(), text=all_text.detach())
        logits_per_image = at_least_float32(logit_scale * image_features @ all_text.T)
        logits_per_text = at_least_float32(logit_scale * text_features @ all_image.T)
        if row_norm:  # every column is here already
            rows["row_sum"] = affinity_sum(rows, cols, dtype=logits_per_image.dtype, **self._terms()).sum(dim=1)
        a = self.targets(rows, cols, logits_per_image.dtype)
        exclude = same_study_pairs(rows, cols) if self.same_study == "ignore" else None
        p = a / a.sum(dim=1, keepdim=True)
        loss_i2t = soft_cross_entropy(logits_per_image, p, exclude)
        loss_t2i = soft_cross_entropy(logits_per_text, p, exclude)
        return 0.5 * (loss_i2t + loss_t2i)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, form={self.form!r}, spatial_weight={self.spatial_weight}, "
            f"knowledge_weight={self.knowledge_weight}, intra_weight={self.intra_weight}, "
            f"spatial_sigma_mm={self.spatial_sigma_mm}, exchange={self.exchange!r}, norm={self.norm!r}, "
            f"same_study={self.same_study!r}"
        )
