"""Whole-volume embeddings for volumes of any depth: one pass over all slices, or sliding z-chunks pooled.

    feats = encode_volumes(model, volume, depths, mode="sliding", chunk_depth=48, chunk_stride=24, pool="mean")

``volume`` is a padded batch as :func:`volvlp_ray.data.pipeline.collate` makes it: ``(B, 1, D, H, W)`` with the
true depth of each volume in ``depths`` ``(B,)``.  In sliding mode every volume is cut into chunks of
``chunk_depth`` slices starting every ``chunk_stride`` slices (the last chunk ends at the volume's last slice, so
every slice is covered; a volume no deeper than ``chunk_depth`` is one chunk), all chunks of the batch are
encoded together, and each volume's chunk features are pooled (mean or max) and L2-normalised again.  This is
how a model pre-trained on organ-wise z-chunks (SigVLP) sees a whole scan; "whole" is what report-level
training sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunk_starts", "encode_volumes"]


def chunk_starts(depth: int, chunk_depth: int, stride: int) -> list[int]:
    """Start slices of the z-chunks of a volume of ``depth`` slices: ``[0, stride, …]`` plus ``depth - chunk_depth``
    when the regular starts leave the last slices uncovered; ``[0]`` when ``depth <= chunk_depth``."""
    if depth < 1 or chunk_depth < 1 or stride < 1:
        raise ValueError(f"depth, chunk_depth and stride must be >= 1, got {depth}, {chunk_depth}, {stride}")
    if depth <= chunk_depth:
        return [0]
    starts = list(range(0, depth - chunk_depth + 1, stride))
    if starts[-1] + chunk_depth < depth:
        starts.append(depth - chunk_depth)
    return starts


@torch.no_grad()
def encode_volumes(
    model,
    volume: Tensor,
    depths: Tensor,
    mode: str = "whole",
    chunk_depth: int = 48,
    chunk_stride: int = 24,
    pool: str = "mean",
    max_chunks_per_pass: int = 64,
) -> Tensor:
    """L2-normalised volume embeddings ``(B, E)`` of a padded batch, with the model in its current mode.

    Args:
        model: a :class:`~volvlp_ray.models.VLP` (``encode_image`` and ``vision.patch``).
        volume: ``(B, 1, D, H, W)`` on the model's device and dtype, padded at the end of z.
        depths: ``(B,)`` true depths.
        mode: ``"whole"`` or ``"sliding"``.
        chunk_depth: slices per chunk, rounded down to a multiple of the z patch (at least one patch).
        chunk_stride: slices between chunk starts.
        pool: ``"mean"`` or ``"max"`` over a volume's chunk features.
        max_chunks_per_pass: chunks encoded together; callers pass ``eval.batch_size`` so a pass never holds more
            than a whole-mode batch.
    """
    if volume.ndim != 5 or depths.ndim != 1 or depths.shape[0] != volume.shape[0]:
        raise ValueError(f"expected volume (B, 1, D, H, W) and depths (B,), got {tuple(volume.shape)}, "
                         f"{tuple(depths.shape)}")
    if mode == "whole":
        return model.encode_image(volume, depths)
    if mode != "sliding":
        raise ValueError(f"mode must be 'whole' or 'sliding', got {mode!r}")
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
    pz = int(model.vision.patch[0])
    cd = max(pz, chunk_depth // pz * pz)
    chunks: list[Tensor] = []
    chunk_depths: list[int] = []
    owner: list[int] = []
    for i, d in enumerate(depths.tolist()):
        for s in chunk_starts(int(d), cd, chunk_stride):
            n = min(cd, int(d) - s)
            chunks.append(volume[i, :, s : s + n])
            chunk_depths.append(n)
            owner.append(i)
    feats = []
    for start in range(0, len(chunks), max_chunks_per_pass):
        part, part_depths = chunks[start : start + max_chunks_per_pass], chunk_depths[start : start + max_chunks_per_pass]
        d_max = -(-max(part_depths) // pz) * pz
        # pad with the value the batch is padded with (air, -1 in model units) – masked by depths anyway
        batch = torch.stack([F.pad(c, (0, 0, 0, 0, 0, d_max - c.shape[1]), value=-1.0) for c in part])
        feats.append(model.encode_image(batch, torch.tensor(part_depths, device=volume.device)))
    f = torch.cat(feats).float()
    counts = torch.bincount(torch.tensor(owner), minlength=volume.shape[0]).tolist()  # chunks are grouped by volume
    parts = f.split(counts)
    pooled = torch.stack([p.mean(0) if pool == "mean" else p.max(0).values for p in parts])
    return F.normalize(pooled, dim=-1)
