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

from .affinity import check_meta
from .gather import EqualBatchCheck, all_gather_with_grad, global_index
from .sigmoid import at_least_float32, check_features

__all__ = ["ClipLoss", "gather_pair_features"]


def gather_pair_features(
    image_features: Tensor, text_features: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """All-gather image and text features ``(B, E)`` in one collective -> two ``(W*B, E)`` tensors.

    Gradients flow back to the local features (summed over ranks' losses).
    """
    dim = image_features.shape[1]
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1), group)
    return both[:, :dim], both[:, dim:]


class ClipLoss(nn.Module):
    """Symmetric softmax cross-entropy between local rows and global columns.

    Args:
        group: process group (default: the world).

    Call: ``loss(image_features (B, E), text_features (B, E), logit_scale (), logit_bias=None, **meta)``
    returns a 0-dim tensor (float32, float64 for float64 inputs). CLIP has no bias: ``logit_bias`` is
    accepted for a uniform call and ignored (a constant shift does not change a softmax); ``meta`` keys
    are accepted and ignored.
    """

    needs_bias: bool = False
    meta_keys: tuple[str, ...] = ()

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self._batch_check = EqualBatchCheck()  # one all-gather on the first call, then host-side
        self.group = group

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
        check_meta(meta, (), image_features.shape[0], "ClipLoss")
        self._batch_check(image_features.shape[0], image_features.device, self.group)
        all_image, all_text = gather_pair_features(image_features, text_features, self.group)
        labels = global_index(image_features.shape[0], image_features.device, self.group)
        logits_per_image = at_least_float32(logit_scale * image_features @ all_text.T)
        logits_per_text = at_least_float32(logit_scale * text_features @ all_image.T)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
