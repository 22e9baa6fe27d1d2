"""Sigmoid (SigLIP-style) contrastive loss over the global batch, as used by SigVLP.

For local image rows ``i`` and all global text columns ``j``::

    L_r = -1/B * sum_{i in rank r, j} log sigmoid(z_ij * (s * <x_i, y_j> + b)),   z_ij = +1 if i == j else -1

with ``s = logit_scale`` (already exponentiated) and ``b = logit_bias``. The mean of ``L_r`` over ranks
equals the single-process loss over the global batch (sum over all pairs / global batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .affinity import check_meta, same_study_meta, same_study_pairs, spatial_affinity
from .gather import EXCHANGES, EqualBatchCheck, global_index, pairwise_sum

__all__ = ["SigmoidLoss", "sigmoid_pair_loss", "check_features", "at_least_float32"]


def at_least_float32(t: Tensor) -> Tensor:
    """Upcast half / bfloat16 logits to float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_features(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, owner: str) -> None:
    """Clear errors for mismatched feature shapes or a non-scalar ``logit_scale``."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"{owner}: image and text features must both be (B, E); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if logit_scale.dim() != 0:
        raise ValueError(f"{owner}: logit_scale must be a 0-dim tensor, got shape {tuple(logit_scale.shape)}")


def sigmoid_pair_loss(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor | None, rows: Mapping[str, Tensor], cols: Mapping[str, Tensor],
    same_study: str = "negative", spatial_sigma_mm: float = 50.0,
) -> Tensor:
    """Sum of ``-log sigmoid(z * logit)`` over the block ``x (n, E)`` x ``y (m, E)`` (0-dim).

    Positives are the pairs with equal global ``"index"``. Pairs of different samples of one study (``study_id``):
    ``same_study="negative"`` as any other pair, ``"ignore"`` no term, ``"soft"`` the binary cross-entropy with the
    spatial kernel on their z-centres as target (``-(t log s(l) + (1 - t) log s(-l))``).
    """
    logits = at_least_float32(scale * (x @ y.T))
    if bias is not None:
        logits = logits + bias
    positive = rows["index"][:, None] == cols["index"][None, :]
    terms = -F.logsigmoid(torch.where(positive, logits, -logits))
    if same_study == "negative":
        return terms.sum()
    same = same_study_pairs(rows, cols)
    if same_study == "ignore":
        return torch.where(same, torch.zeros_like(terms), terms).sum()
    t = spatial_affinity(rows["study_id"], rows["z_center_mm"], cols["study_id"], cols["z_center_mm"],
                         spatial_sigma_mm).to(logits.dtype)
    soft = -(t * F.logsigmoid(logits) + (1.0 - t) * F.logsigmoid(-logits))
    return torch.where(same, soft, terms).sum()


class SigmoidLoss(nn.Module):
    """Pairwise sigmoid loss over all global pairs of a rank's row block, divided by the local batch.

    Args:
        exchange: how a rank sees the other ranks' text features: ``"gather"`` (all-gather, fastest,
            memory grows with the world size) or ``"ring"`` (bidirectional neighbour exchange of half
            blocks, per-rank memory independent of the world size).
        group: process group (default: the world).

        same_study: pairs of different samples of one study: "negative" (as any other pair), "ignore" (left out)
            or "soft" (target = the spatial kernel of ``spatial_sigma_mm`` on their z-centres); see
            ``sigmoid_pair_loss``. "ignore" needs meta ``study_id``, "soft" also ``z_center_mm``.

    Call: ``loss(image_features (B, E), text_features (B, E), logit_scale (), logit_bias () | None, **meta)``
    returns a 0-dim tensor (float32, float64 for float64 inputs). ``meta`` keys the loss does not need are accepted
    and ignored (see ``META_KEYS``).
    """

    needs_bias: bool = True

    def __init__(self, exchange: str = "gather", group: dist.ProcessGroup | None = None, same_study: str = "negative",
                 spatial_sigma_mm: float = 50.0) -> None:
        super().__init__()
        self._batch_check = EqualBatchCheck()  # one all-gather on the first call, then host-side
        if exchange not in EXCHANGES:
            raise ValueError(f"SigmoidLoss: exchange must be one of {list(EXCHANGES)}, got {exchange!r}")
        if spatial_sigma_mm <= 0:
            raise ValueError(f"SigmoidLoss: spatial_sigma_mm must be > 0, got {spatial_sigma_mm}")
        self.exchange = exchange
        self.group = group
        self.meta_keys: tuple[str, ...] = same_study_meta(same_study)
        self.same_study, self.spatial_sigma_mm = same_study, float(spatial_sigma_mm)
        self._pair_loss = sigmoid_pair_loss if same_study == "negative" else partial(
            sigmoid_pair_loss, same_study=same_study, spatial_sigma_mm=self.spatial_sigma_mm)

    @property
    def needs_meta(self) -> bool:
        return bool(self.meta_keys)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        **meta: Tensor,
    ) -> Tensor:
        check_features(image_features, text_features, logit_scale, "SigmoidLoss")
        check_meta(meta, self.meta_keys, image_features.shape[0], "SigmoidLoss")
        self._batch_check(image_features.shape[0], image_features.device, self.group)
        batch = image_features.shape[0]
        index = {"index": global_index(batch, image_features.device, self.group)}
        index.update({k: meta[k].detach() for k in self.meta_keys})
        total = pairwise_sum(
            self._pair_loss,
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            index,
            index,
            self.exchange,
            self.group,
        )
        return total / batch

    def extra_repr(self) -> str:
        return f"exchange={self.exchange!r}, same_study={self.same_study!r}"
