"""Collectives for global contrastive losses: the loss owns the gather.

Conventions (as open_clip): every rank holds a local batch of ``B`` samples (the same ``B`` on every
rank; use ``drop_last``), computes the loss of its own rows against the *global* columns, and the
collectives carry gradients so that the gradient a rank gets for its features is the gradient of the sum
of all ranks' losses. After the data-parallel gradient average (DDP / DeepSpeed) the parameter gradient
equals that of the global loss ``mean_r L_r``.

Two ways to see the global columns:

- ``all_gather_with_grad``: gather everything (peak memory grows with the world size ``W``);
- ``ring_pair_sum``: neighbour exchange. Each rank's column block is split into two halves; the first
  half travels right (rank r -> r+1), the second half travels left, one hop per round, ``W - 1`` rounds.
  Forward and backward keep only the blocks in flight (the backward recomputes each block), so a rank's
  peak memory is independent of ``W``. The gradient of a column half rides along with it and returns to
  its owner after one more hop.

A *pair loss* is ``pair_loss(x, y, scale, bias, rows, cols) -> Tensor`` (0-dim): the **sum** of a
pairwise loss over rows ``x (n, E)`` and columns ``y (m, E)``, where ``rows``/``cols`` are dicts of
per-sample tensors (always ``"index"``, the global sample index). ``pairwise_sum`` evaluates it over the
local rows against all global columns with either exchange.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "EXCHANGES",
    "PairLoss",
    "world_info",
    "global_index",
    "EqualBatchCheck",
    "check_equal_batch",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "gather_meta",
    "neighbour_exchange",
    "ring_pair_sum",
    "pairwise_sum",
    "column_sum",
]

EXCHANGES: tuple[str, ...] = ("gather", "ring")

PairLoss = Callable[[Tensor, Tensor, Tensor, "Tensor | None", Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed``; ``(0, 1)`` when it is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_equal_batch(batch: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold the same local batch (one tiny all-gather).

    Without it, mismatched collectives abort the process (gloo) or hang (NCCL).
    """
    if world_info(group)[1] == 1:
        return
    sizes = all_gather_no_grad(torch.tensor([batch], device=device), group).tolist()
    if len(set(sizes)) > 1:
        raise ValueError(
            f"local batch sizes differ across ranks: {sizes}; the global contrastive losses need the same "
            "local batch on every rank (drop the last incomplete batch)"
        )


class EqualBatchCheck:
    """``check_equal_batch`` once, then on the host: the first call runs the all-gather (every rank's first loss
    call), later calls compare the batch with the agreed one without a collective or a device sync, so a loss
    that runs every step costs no extra round trip. A rank whose batch size changes raises ``ValueError``."""

    def __init__(self) -> None:
        self.batch: int | None = None

    def __call__(self, batch: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        if world_info(group)[1] == 1:
            return
        if self.batch is None:
            check_equal_batch(batch, device, group)
            self.batch = batch
        elif batch != self.batch:
            raise ValueError(
                f"the local batch changed from {self.batch} (agreed by all ranks on the first call) to {batch}; the "
                "global contrastive losses need the same local batch on every rank in every step"
            )


def global_index(batch: int, device: torch.device, group: dist.ProcessGroup | None = None) -> Tensor:
    """Global indices ``(B,)`` of this rank's samples: ``rank * B + arange(B)``."""
    rank, _ = world_info(group)
    return torch.arange(batch, device=device) + rank * batch


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        rank, world = world_info(group)
        ctx.group, ctx.rank, ctx.batch = group, rank, tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch], None


def all_gather_with_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``tensor (B, ...)`` from all ranks into ``(W*B, ...)``, rank order.

    The backward sums the incoming gradients over ranks and returns this rank's slice, so each rank's
    gradient is that of the sum of all ranks' losses. Identity when the world size is 1.
    """
    if world_info(group)[1] == 1:
        return tensor
    return _AllGather.apply(tensor, group)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Like ``all_gather_with_grad`` for metadata (any dtype; bool travels as uint8), no gradient."""
    if world_info(group)[1] == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    src = (tensor.to(torch.uint8) if is_bool else tensor).contiguous()
    parts = [torch.empty_like(src) for _ in range(world_info(group)[1])]
    dist.all_gather(parts, src, group=group)
    out = torch.cat(parts)
    return out.bool() if is_bool else out


def gather_meta(meta: Mapping[str, Tensor], group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """All-gather a dict of per-sample metadata ``(B, ...)`` -> ``(W*B, ...)``, no gradient.

    ``"index"`` (see ``global_index``) is rebuilt locally as ``arange(W*B)`` instead of being sent.
    """
    world = world_info(group)[1]
    return {
        k: torch.arange(world * v.shape[0], device=v.device) if k == "index" else all_gather_no_grad(v, group)
        for k, v in meta.items()
    }


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def neighbour_exchange(
    to_right: Sequence[Tensor], to_left: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Send ``to_right`` to rank+1 and ``to_left`` to rank-1 (mod W) in one batch of point-to-point ops.

    Every rank must pass tensors of the same shapes. Returns ``(from_left, from_right)``: what rank-1
    sent right (shaped like ``to_right``) and what rank+1 sent left (shaped like ``to_left``).
    """
    rank, world = world_info(group)
    right = _global_rank((rank + 1) % world, group)
    left = _global_rank((rank - 1) % world, group)
    from_left = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in to_right]
    from_right = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in to_left]
    ops: list[dist.P2POp] = []
    for k, (send, recv) in enumerate(zip(to_right, from_left, strict=True)):
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send.contiguous(), right, group, tag=2 * k))
            ops.append(dist.P2POp(dist.irecv, recv, left, group, tag=2 * k))
    for k, (send, recv) in enumerate(zip(to_left, from_right, strict=True)):
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send.contiguous(), left, group, tag=2 * k + 1))
            ops.append(dist.P2POp(dist.irecv, recv, right, group, tag=2 * k + 1))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return from_left, from_right


def _halves(y: Tensor, cols: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Column block -> (first half, second half) as ``[y, *cols.values()]`` lists."""
    split = (y.shape[0] + 1) // 2
    first = [y[:split]] + [v[:split] for v in cols.values()]
    second = [y[split:]] + [v[split:] for v in cols.values()]
    return first, second


class _RingPairSum(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, pair_loss: PairLoss, group, rows: dict, cols: dict, x: Tensor, y: Tensor, scale: Tensor, bias
    ) -> Tensor:
        keys = list(cols)
        ctx.pair_loss, ctx.group, ctx.rows, ctx.cols = pair_loss, group, rows, cols
        ctx.save_for_backward(x, y, scale, bias)
        total = pair_loss(x, y, scale, bias, rows, cols)
        to_right, to_left = _halves(y, cols)
        for _ in range(world_info(group)[1] - 1):
            to_right, to_left = neighbour_exchange(to_right, to_left, group)
            for item in (to_right, to_left):
                total += pair_loss(x, item[0], scale, bias, rows, dict(zip(keys, item[1:], strict=True)))
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        rows, cols, group, keys = ctx.rows, ctx.cols, ctx.group, list(ctx.cols)
        x_ = x.detach().requires_grad_()
        s_ = scale.detach().requires_grad_()
        b_ = None if bias is None else bias.detach().requires_grad_()
        leaves = [x_, s_] + ([] if b_ is None else [b_])
        acc = [torch.zeros_like(t) for t in leaves]

        def block(y_cols: Tensor, col_meta: Mapping[str, Tensor]) -> Tensor:
            """Accumulate d(loss)/d(x, scale, bias) of one block; return d(loss)/d(y_cols)."""
            y_ = y_cols.detach().requires_grad_()
            with torch.enable_grad():
                loss = ctx.pair_loss(x_, y_, s_, b_, rows, col_meta) * grad_out
            grads = torch.autograd.grad(loss, leaves + [y_], allow_unused=True)
            for a, g in zip(acc, grads[:-1], strict=True):
                if g is not None:
                    a += g
            return torch.zeros_like(y_) if grads[-1] is None else grads[-1]

        gy = block(y, cols)
        world = world_info(group)[1]
        if world > 1:
            first, second = _halves(y, cols)
            split = first[0].shape[0]
            # stream item = [y_half, grad_half, *meta_half]; the grad starts with the owner's own part
            to_right = [first[0], gy[:split], *first[1:]]
            to_left = [second[0], gy[split:], *second[1:]]
            for _ in range(world - 1):
                to_right, to_left = neighbour_exchange(to_right, to_left, group)
                for item in (to_right, to_left):
                    item[1] += block(item[0], dict(zip(keys, item[2:], strict=True)))
            # one more hop brings each accumulated column gradient back to its owner
            (g_first,), (g_second,) = neighbour_exchange([to_right[1]], [to_left[1]], group)
            gy = torch.cat([g_first, g_second])
        gx, gs = acc[0], acc[1]
        gb = acc[2] if b_ is not None else None
        return None, None, None, None, gx, gy, gs, gb


def ring_pair_sum(
    pair_loss: PairLoss,
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    rows: Mapping[str, Tensor],
    cols: Mapping[str, Tensor],
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Sum of ``pair_loss`` over local rows ``x (B, E)`` and the global columns, by neighbour exchange.

    ``cols`` holds this rank's column metadata (detached, first dimension B); it travels with ``y``.
    Gradients flow to ``x``, ``y`` (summed over all ranks' losses), ``scale`` and ``bias``.
    Returns a 0-dim tensor (float32 or wider).
    """
    return _RingPairSum.apply(pair_loss, group, dict(rows), dict(cols), x, y, scale, bias)


@torch.no_grad()
def column_sum(
    fn: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor],
    rows: Mapping[str, Tensor],
    cols: Mapping[str, Tensor],
    exchange: str = "gather",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Row sums over all global columns of ``fn(rows, cols) -> (n, m)``: ``(n,)``, no gradient.

    ``cols`` is this rank's share of the columns (per-sample tensors, first dimension B); they are all-gathered
    (``exchange="gather"``) or travel the ring in halves as ``ring_pair_sum``'s columns do (``"ring"``: a rank
    holds one block at a time). A constant of the loss that depends on every column (SWCA's row-normalised
    targets) is computed with it before the loss itself.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {list(EXCHANGES)}, got {exchange!r}")
    world = world_info(group)[1]
    if world == 1:
        return fn(rows, cols).sum(dim=1)
    if exchange == "gather":
        return fn(rows, gather_meta(cols, group)).sum(dim=1)
    keys = list(cols)
    total = fn(rows, cols).sum(dim=1)
    split = (next(iter(cols.values())).shape[0] + 1) // 2
    to_right = [v[:split] for v in cols.values()]
    to_left = [v[split:] for v in cols.values()]
    for _ in range(world - 1):
        to_right, to_left = neighbour_exchange(to_right, to_left, group)
        for item in (to_right, to_left):
            total += fn(rows, dict(zip(keys, item, strict=True))).sum(dim=1)
    return total


def pairwise_sum(
    pair_loss: PairLoss,
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    rows: Mapping[str, Tensor],
    cols: Mapping[str, Tensor],
    exchange: str = "gather",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Sum of ``pair_loss`` over this rank's rows and all global columns (0-dim tensor).

    Args:
        x, y: local features ``(B, E)``; ``y`` and ``cols`` are this rank's share of the columns.
        rows, cols: per-sample metadata dicts (``"index"`` plus whatever ``pair_loss`` reads).
        exchange: ``"gather"`` (all-gather the columns) or ``"ring"`` (neighbour exchange).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {list(EXCHANGES)}, got {exchange!r}")
    if world_info(group)[1] == 1:
        return pair_loss(x, y, scale, bias, rows, cols)
    if exchange == "ring":
        return ring_pair_sum(pair_loss, x, y, scale, bias, rows, cols, group)
    all_cols = gather_meta(cols, group)
    return pair_loss(x, all_gather_with_grad(y, group), scale, bias, rows, all_cols)
