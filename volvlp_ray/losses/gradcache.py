"""Embedding-gradient caching: a contrastive batch larger than activation memory (Gao et al., GradCache).

A contrastive loss couples every sample of the batch, so plain gradient accumulation changes the loss.
``GradCache`` gets the full-batch gradient in bounded memory:

1. embed every micro-batch of images and texts without autograd;
2. compute the (global, distributed) loss on the detached embeddings and the gradients of the loss
   w.r.t. the embeddings, ``logit_scale`` and ``logit_bias`` (all collectives happen here, once);
3. re-embed each micro-batch with autograd and back-propagate ``<embedding, cached gradient>``; the scale
   and bias gradients ride on the last micro-batch's backward.

Parameter gradients equal the full-batch step up to floating point. Dropout and other randomness is
replayed: the RNG state (CPU and the current CUDA device) is recorded before each micro-batch in step 1
and restored for its re-embedding in step 3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradCache", "split_batch", "batch_size"]

Batch = Any  # a Tensor, or a Mapping / list / tuple of them (split along dim 0); other leaves are shared
BackwardFn = Callable[[Tensor, bool], None]


def batch_size(batch: Batch) -> int:
    """Size of dim 0 of the first tensor found in ``batch``."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return batch_size(value)
        except ValueError:
            continue
    raise ValueError(f"no tensor found in batch of type {type(batch).__name__}")


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Split every tensor of ``batch`` into chunks of ``size`` along dim 0 (non-tensors are repeated)."""
    n = -(-batch_size(batch) // size)

    def parts(value: Batch) -> list[Batch]:
        if isinstance(value, Tensor):
            return list(value.split(size))
        if isinstance(value, Mapping):
            split = {k: parts(v) for k, v in value.items()}
            return [{k: v[i] for k, v in split.items()} for i in range(n)]
        if isinstance(value, (list, tuple)):
            split_items = [parts(v) for v in value]
            return [type(value)(s[i] for s in split_items) for i in range(n)]
        return [value] * n

    return parts(batch)


def _default_backward(surrogate: Tensor, is_last: bool) -> None:
    surrogate.backward()


class _RngState:
    """CPU (+ current CUDA device) RNG state, restorable inside ``fork_rng``."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def devices(self) -> list[int]:
        return [torch.cuda.current_device()] if self.cuda is not None else []

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


class GradCache:
    """Full-batch contrastive gradients computed micro-batch by micro-batch.

    Args:
        encode_image: ``images -> (b, E)`` L2-normalised image features of a micro-batch.
        encode_text: ``texts -> (b, E)`` L2-normalised text features of a micro-batch.
        loss_fn: ``loss_fn(image_features (B, E), text_features (B, E), logit_scale, logit_bias, **meta)``
            -> 0-dim tensor, e.g. a ``ClipLoss`` / ``SigmoidLoss`` / ``SWCALoss`` (which own the gather).
        micro_batch_size: samples per re-embedded micro-batch (the last one may be smaller).
        backward_fn: ``backward_fn(surrogate, is_last)`` back-propagates one micro-batch's surrogate
            loss; default ``surrogate.backward()``. Use it for a DeepSpeed engine
            (``engine.backward(surrogate)``) or to skip DDP's gradient sync until ``is_last``.

    ``step`` leaves the gradients in the parameters' ``.grad`` (accumulated, like ``backward()``).
    """

    def __init__(
        self,
        encode_image: Callable[[Batch], Tensor],
        encode_text: Callable[[Batch], Tensor],
        loss_fn: Callable[..., Tensor],
        micro_batch_size: int,
        backward_fn: BackwardFn | None = None,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"GradCache: micro_batch_size must be >= 1, got {micro_batch_size}")
        self.encode_image, self.encode_text, self.loss_fn = encode_image, encode_text, loss_fn
        self.micro_batch_size = micro_batch_size
        self.backward_fn = backward_fn or _default_backward

    @staticmethod
    def _embed_no_grad(encode: Callable[[Batch], Tensor], parts: Sequence[Batch]) -> tuple[Tensor, list[_RngState]]:
        states, features = [], []
        with torch.no_grad():
            for part in parts:
                states.append(_RngState())
                features.append(encode(part))
        return torch.cat(features), states

    def step(
        self,
        images: Batch,
        texts: Batch,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        **meta: Tensor,
    ) -> Tensor:
        """One forward/backward over the local batch; returns the loss (detached, 0-dim).

        Args:
            images, texts: local batch inputs (tensors or dicts/lists of tensors, batch along dim 0).
            logit_scale: 0-dim, already exponentiated (may be a function of a parameter, e.g. ``p.exp()``).
            logit_bias: 0-dim or None.
            meta: per-sample metadata for the loss (not split; the loss sees the whole local batch).
        """
        n_img, n_txt = batch_size(images), batch_size(texts)
        if n_img != n_txt:
            raise ValueError(f"GradCache: {n_img} images but {n_txt} texts")
        image_parts = split_batch(images, self.micro_batch_size)
        text_parts = split_batch(texts, self.micro_batch_size)
        image_features, image_states = self._embed_no_grad(self.encode_image, image_parts)
        text_features, text_states = self._embed_no_grad(self.encode_text, text_parts)

        image_leaf = image_features.detach().requires_grad_()
        text_leaf = text_features.detach().requires_grad_()
        extras = [t for t in (logit_scale, logit_bias) if t is not None and t.requires_grad]
        loss = self.loss_fn(image_leaf, text_leaf, logit_scale, logit_bias, **meta)
        grads = torch.autograd.grad(loss, [image_leaf, text_leaf, *extras], materialize_grads=True)
        image_grads = grads[0].split(self.micro_batch_size)
        text_grads = grads[1].split(self.micro_batch_size)
        # an unused bias gets a zero gradient (materialize_grads)
        extra_surrogate = sum((t * g).sum() for t, g in zip(extras, grads[2:], strict=True))

        n = len(image_parts)
        for k in range(n):
            with torch.random.fork_rng(devices=image_states[k].devices()):
                image_states[k].restore()
                surrogate = (self.encode_image(image_parts[k]) * image_grads[k]).sum()
            with torch.random.fork_rng(devices=text_states[k].devices()):
                text_states[k].restore()
                surrogate = surrogate + (self.encode_text(text_parts[k]) * text_grads[k]).sum()
            if k == n - 1 and extras:
                surrogate = surrogate + extra_surrogate
            self.backward_fn(surrogate, k == n - 1)
        return loss.detach()
