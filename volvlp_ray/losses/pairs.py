"""The negation-pair loss: each volume prefers a true statement about its own report over its negation.

    loss = negation_pair_loss(image_features, pair_features, pair_valid, logit_scale)

``pair_features`` (B, K, 2, E) hold K (true, false) statement pairs per volume (``volvlp_ray.data.negation``),
``pair_valid`` (B, K) which of them exist. Per pair the loss is the cross-entropy of a softmax over the two
statements, taken at the true one: ``-log sigmoid(scale * (<v, s_true> - <v, s_false>))``, i.e. CT-CLIP's
zero-shot score trained directly. It is local to each worker (a pair belongs to its own volume, nothing is
gathered); DeepSpeed's gradient averaging makes the step that of the mean over workers. Mean over valid pairs;
zero (with a graph) when a batch has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["negation_pair_loss"]


def negation_pair_loss(image_features: Tensor, pair_features: Tensor, pair_valid: Tensor, logit_scale: Tensor) -> Tensor:
    if pair_features.ndim != 4 or pair_features.shape[2] != 2:
        raise ValueError(f"pair_features must be (B, K, 2, E), got {tuple(pair_features.shape)}")
    if pair_valid.shape != pair_features.shape[:2] or image_features.shape[0] != pair_features.shape[0]:
        raise ValueError(f"shapes disagree: image {tuple(image_features.shape)}, pairs "
                         f"{tuple(pair_features.shape)}, valid {tuple(pair_valid.shape)}")
    s = logit_scale * torch.einsum("be,bkte->bkt", image_features, pair_features.to(image_features.dtype))
    nll = -F.logsigmoid((s[..., 0] - s[..., 1]).float())
    w = pair_valid.to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp_min(1.0)
