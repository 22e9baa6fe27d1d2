"""Soft-weighted contrastive alignment (SWCA) of SCALE-VLP.

Binary positives are replaced by soft targets ``A = alpha * I + (1 - alpha) * W`` where ``W`` mixes a
spatial affinity (chunks of the same study, Gaussian kernel on the distance of their z-centres), a
knowledge affinity (Tanimoto/Jaccard of the reports' abnormality or concept vectors) and, optionally, an
intra-modal feature similarity (detached); see ``affinity.soft_targets``. ``A`` is symmetric in the two
samples of a pair and ``A_ii = 1``.

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

from .affinity import check_meta, soft_targets
from .clip import gather_pair_features
from .gather import EXCHANGES, EqualBatchCheck, gather_meta, global_index, pairwise_sum
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
        weights = {"spatial_weight": spatial_weight, "knowledge_weight": knowledge_weight, "intra_weight": intra_weight}
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"SWCALoss: {name} must be >= 0, got {value}")
        if spatial_sigma_mm <= 0:
            raise ValueError(f"SWCALoss: spatial_sigma_mm must be > 0, got {spatial_sigma_mm}")
        self.alpha, self.form, self.exchange, self.group = float(alpha), form, exchange, group
        soft = alpha < 1.0
        self.spatial_weight = float(spatial_weight) if soft else 0.0
        self.knowledge_weight = float(knowledge_weight) if soft else 0.0
        self.intra_weight = float(intra_weight) if soft else 0.0
        self.spatial_sigma_mm = float(spatial_sigma_mm)
        self.needs_bias: bool = form == "sigmoid"
        keys: tuple[str, ...] = ()
        if self.spatial_weight > 0:
            keys += ("study_id", "z_center_mm")
        if self.knowledge_weight > 0:
            keys += ("labels",)
        self.meta_keys: tuple[str, ...] = keys

    @property
    def needs_meta(self) -> bool:
        return bool(self.meta_keys)

    def targets(self, rows: Mapping[str, Tensor], cols: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Soft targets ``(n, m)`` for a block of pairs (see ``affinity.soft_targets``)."""
        return soft_targets(
            rows,
            cols,
            alpha=self.alpha,
            spatial_weight=self.spatial_weight,
            knowledge_weight=self.knowledge_weight,
            intra_weight=self.intra_weight,
            spatial_sigma_mm=self.spatial_sigma_mm,
            dtype=dtype,
        )

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
        return -(a * F.logsigmoid(logits) + (1.0 - a) * F.logsigmoid(-logits)).sum()

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
        if self.form == "sigmoid":
            cols = dict(rows)
            if self.intra_weight > 0:  # rows also need their own text, columns their own image
                rows["text"] = text_features.detach()
                cols["image"] = image_features.detach()
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
        a = self.targets(rows, cols, logits_per_image.dtype)
        p = a / a.sum(dim=1, keepdim=True)
        loss_i2t = -(p * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
        loss_t2i = -(p * F.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
        return 0.5 * (loss_i2t + loss_t2i)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, form={self.form!r}, spatial_weight={self.spatial_weight}, "
            f"knowledge_weight={self.knowledge_weight}, intra_weight={self.intra_weight}, "
            f"spatial_sigma_mm={self.spatial_sigma_mm}, exchange={self.exchange!r}"
        )
