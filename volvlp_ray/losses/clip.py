"""CLIP (InfoNCE) loss over the global batch, open_clip's local-loss form.

Each rank scores its local images against all gathered texts and its local texts against all gathered
images; the labels are the local indices offset by ``rank * B``::

    L_r = 1/2 * (CE(s * x_r @ Y^T, labels) + CE(s * y_r @ X^T, labels)),   labels = rank * B + arange(B)

``s = logit_scale`` is already exponentiated. The mean of ``L_r`` over ranks is the single-process CLIP
loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .affinity import check_meta, same_study_meta, same_study_pairs, spatial_affinity
from .gather import EqualBatchCheck, all_gather_with_grad, gather_meta, global_index
from .sigmoid import at_least_float32, check_features

__all__ = ["ClipLoss", "gather_pair_features", "soft_cross_entropy"]


def gather_pair_features(
    image_features: Tensor, text_features: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """All-gather image and text features ``(B, E)`` in one collective -> two ``(W*B, E)`` tensors.

    Gradients flow back to the local features (summed over ranks' losses).
    """
    dim = image_features.shape[1]
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1), group)
    return both[:, :dim], both[:, dim:]


def soft_cross_entropy(logits: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Mean over rows of ``-sum_j targets_ij log softmax(logits_i)_j``; ``targets`` rows sum to 1. ``exclude``
    ``(n, m)`` bool: pairs left out of the softmax (their targets must be 0)."""
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    logp = F.log_softmax(logits, dim=1)
    if exclude is not None:
        logp = logp.masked_fill(exclude, 0.0)
    return -(targets * logp).sum(dim=1).mean()


class ClipLoss(nn.Module):
    """Symmetric softmax cross-entropy between local rows and global columns.

    Args:
        group: process group (default: the world).
        same_study: pairs of different samples of one study: "negative" (as any other pair: CLIP), "ignore" (left
            out of the softmax) or "soft" (targets ``I + S`` row-normalised, ``S`` the spatial kernel of
            ``spatial_sigma_mm`` on their z-centres). "ignore" needs meta ``study_id``, "soft" also ``z_center_mm``.

    Call: ``loss(image_features (B, E), text_features (B, E), logit_scale (), logit_bias=None, **meta)``
    returns a 0-dim tensor (float32, float64 for float64 inputs). CLIP has no bias: ``logit_bias`` is
    accepted for a uniform call and ignored (a constant shift does not change a softmax); ``meta`` keys the loss
    does not need are accepted and ignored.
    """

    needs_bias: bool = False

    def __init__(self, group: dist.ProcessGroup | None = None, same_study: str = "negative",
                 spatial_sigma_mm: float = 50.0) -> None:
        super().__init__()
        self._batch_check = EqualBatchCheck()  # one all-gather on the first call, then host-side
        if spatial_sigma_mm <= 0:
            raise ValueError(f"ClipLoss: spatial_sigma_mm must be > 0, got {spatial_sigma_mm}")
        self.group = group
        self.meta_keys: tuple[str, ...] = same_study_meta(same_study)
        self.same_study, self.spatial_sigma_mm = same_study, float(spatial_sigma_mm)

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
        check_features(image_features, text_features, logit_scale, "ClipLoss")
        check_meta(meta, self.meta_keys, image_features.shape[0], "ClipLoss")
        self._batch_check(image_features.shape[0], image_features.device, self.group)
        all_image, all_text = gather_pair_features(image_features, text_features, self.group)
        labels = global_index(image_features.shape[0], image_features.device, self.group)
        logits_per_image = at_least_float32(logit_scale * image_features @ all_text.T)
        logits_per_text = at_least_float32(logit_scale * text_features @ all_image.T)
        if self.same_study == "negative":
            return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
        rows = {"index": labels, **{k: meta[k].detach() for k in self.meta_keys}}
        cols = gather_meta(rows, self.group)
        same = same_study_pairs(rows, cols)
        if self.same_study == "ignore":
            return 0.5 * (F.cross_entropy(logits_per_image.masked_fill(same, float("-inf")), labels)
                          + F.cross_entropy(logits_per_text.masked_fill(same, float("-inf")), labels))
        eye = (rows["index"][:, None] == cols["index"][None, :]).to(logits_per_image.dtype)
        t = eye + spatial_affinity(rows["study_id"], rows["z_center_mm"], cols["study_id"], cols["z_center_mm"],
                                   self.spatial_sigma_mm).to(eye.dtype) * same
        p = t / t.sum(dim=1, keepdim=True)
        return 0.5 * (soft_cross_entropy(logits_per_image, p) + soft_cross_entropy(logits_per_text, p))

    def extra_repr(self) -> str:
        return f"same_study={self.same_study!r}"
