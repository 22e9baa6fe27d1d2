"""Global contrastive losses for CT volume-report pre-training. The loss owns the gather.

Every loss is an ``nn.Module`` constructible with no arguments; rank and world size are read from
``torch.distributed`` at call time (world size 1 when it is not initialised). One call signature::

    loss(image_features, text_features, logit_scale, logit_bias=None, **meta) -> 0-dim tensor (at least float32)

- ``image_features``, ``text_features``: ``(B, E)`` L2-normalised, the *local* batch (same B on all ranks);
- ``logit_scale``: 0-dim, already exponentiated; ``logit_bias``: 0-dim or None;
- ``meta``: optional per-sample tensors, keys from ``META_KEYS``: ``study_id (B,)``, ``z_center_mm (B,)``,
  ``labels (B, L)``. Unknown keys raise ``TypeError``; keys a loss does not use are ignored.

What the training loop must pass, as attributes of every loss:

- ``needs_bias: bool``: the loss uses ``logit_bias`` (sigmoid losses); otherwise pass None or anything.
- ``meta_keys: tuple[str, ...]``: meta keys required by the loss's configuration; ``needs_meta`` is
  ``bool(meta_keys)``.

Conventions are open_clip's: gathers carry gradients (each rank's feature gradient is that of the sum of
all ranks' losses, so after data-parallel gradient averaging the step is that of the global loss); the
mean of the per-rank losses equals the single-process loss over the global batch.

``negation_pair_loss`` (per worker, added to the global loss with ``loss.pair_weight``) trains the
zero-shot score: each volume against a true statement from its report and that statement negated.

``GradCache`` runs a full-batch step in micro-batches (embedding-gradient caching).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .affinity import CT_RATE_ABNORMALITIES, META_KEYS, concepts_from_reports, soft_targets
from .clip import ClipLoss
from .gather import all_gather_with_grad, neighbour_exchange, world_info
from .gradcache import GradCache
from .pairs import negation_pair_loss
from .sigmoid import SigmoidLoss
from .swca import SWCALoss

__all__ = [
    "ClipLoss",
    "SigmoidLoss",
    "SWCALoss",
    "GradCache",
    "LOSSES",
    "META_KEYS",
    "CT_RATE_ABNORMALITIES",
    "build_loss",
    "negation_pair_loss",
    "concepts_from_reports",
    "soft_targets",
    "all_gather_with_grad",
    "neighbour_exchange",
    "world_info",
]

LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "sigmoid": SigmoidLoss, "swca": SWCALoss}


def build_loss(kind: str, **kwargs: Any) -> nn.Module:
    """Construct a loss by name: ``"clip"``, ``"sigmoid"`` or ``"swca"``; ``kwargs`` go to its constructor."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {sorted(LOSSES)}")
    return LOSSES[kind](**kwargs)
