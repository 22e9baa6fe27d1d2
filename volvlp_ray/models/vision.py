"""A 3D Vision Transformer for CT volumes of any depth, with 3D rotary position embeddings.

There is no absolute position embedding: positions enter only through rotary embeddings (RoPE) applied to
queries and keys inside every attention layer, computed on the fly from the integer (z, y, x) patch
coordinates of the actual token grid. Any D, H, W that are multiples of the patch size work.

Variable depth: a batch padded at the end of the z-axis carries ``depths`` (valid slices per sample);
patch tokens whose z-patch starts at or beyond the valid depth are removed from the attention keys and from
pooling, so a volume gives the same embedding alone and padded inside a batch.

    vit = ViT3D(dim=96, depth=3, heads=4, patch=(4, 16, 16))
    feats = vit(x, depths)   # x: (B, 1, D, H, W), depths: (B,) -> (B, 96)

Parameter naming follows the optimizer routing contract (Muon for hidden matrices): every parameter that
is not a hidden 2-D matrix either is 1-D or has "embed" in its name (``patch_embed`` is a 5-D Conv3d,
``cls_embed`` and ``attn_pool.query_embed`` are learned vectors).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from volvlp_ray.config import ModelConfig, grad_checkpointing_mode

__all__ = [
    "VIT3D_PRESETS",
    "RotaryEmbedding3D",
    "ViT3D",
    "apply_rotary",
    "rope_split",
    "vit3d_flops_per_sample",
    "vit3d_from_config",
]

VIT3D_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=96, depth=3, heads=4),
    "small": dict(dim=384, depth=12, heads=6),
    "base": dict(dim=768, depth=12, heads=12),
    "large": dict(dim=1024, depth=24, heads=16),
}
"""Transformer sizes. ``tiny`` trains on two CPU cores in minutes (the embedded default)."""

POOLS = ("cls", "mean", "attn")


# --------------------------------------------------------------------------------------------------------
# 3D rotary position embeddings


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotated pairs per axis (z, y, x) for a head of ``head_dim`` channels.

    The ``head_dim // 2`` rotation pairs are split as equally as possible: y and x get ``pairs // 3`` each,
    z (the unbounded axis) gets the rest, so every channel is rotated and each axis owns an even number of
    channels. Examples: head 64 -> (12, 10, 10) pairs = (24, 20, 20) channels; head 24 -> (4, 4, 4) pairs.
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dim >= 6 (one rotation pair per axis), got {head_dim}")
    pairs = head_dim // 2
    yx = pairs // 3
    return pairs - 2 * yx, yx, yx


class RotaryEmbedding3D(nn.Module):
    """cos / sin tables of 3D RoPE for a token grid, with ``n_prefix`` unrotated tokens in front.

    Pair ``j`` of axis ``a`` rotates by ``pos_a * theta ** (-j / pairs_a)`` where ``pos_a`` is the integer
    patch coordinate (0, 1, ...). Prefix tokens (the CLS token) get angle 0, i.e. no rotation. Tables are
    computed on the fly for the actual grid and kept in a small LRU cache keyed by grid shape and device.
    """

    def __init__(self, head_dim: int, theta: float = 100.0, cache_size: int = 16) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.split = rope_split(head_dim)
        self.theta = float(theta)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

    def angles(self, grid: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
        """Rotation angles (gz*gy*gx, head_dim // 2) for the grid in z-major (z, y, x) token order."""
        parts = []
        for size, pairs, axis in zip(grid, self.split, range(3)):
            inv_freq = self.theta ** (-torch.arange(pairs, device=device, dtype=torch.float64) / pairs)
            pos = torch.arange(size, device=device, dtype=torch.float64)
            ang = pos[:, None] * inv_freq[None, :]  # (size, pairs)
            shape = [1, 1, 1, pairs]
            shape[axis] = size
            parts.append(ang.view(shape).expand(*grid, pairs))
        return torch.cat(parts, dim=-1).reshape(-1, self.head_dim // 2).float()

    def forward(self, grid: tuple[int, int, int], n_prefix: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (n_prefix + gz*gy*gx, head_dim // 2), float32."""
        key = (tuple(grid), n_prefix, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        ang = self.angles(grid, device)
        if n_prefix:
            ang = torch.cat([ang.new_zeros(n_prefix, ang.shape[1]), ang], dim=0)
        out = (ang.cos(), ang.sin())
        self._cache[key] = out
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, heads, L, head_dim) by per-token angles; cos / sin (L, head_dim // 2).

    Rotate-half convention: channel ``i`` pairs with channel ``i + head_dim // 2``.
    """
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# --------------------------------------------------------------------------------------------------------
# transformer blocks


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, L, dim); mask None or bool (B, 1, 1, L), True = key may be attended to."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x)).

    ``checkpoint_mlp=True`` (selective activation checkpointing) keeps the attention sub-layer's activations
    and recomputes ``norm2`` + MLP in the backward pass: the MLP holds half of a block's saved activations but
    is cheap to recompute, while attention's quadratic SDPA is the expensive part to run twice.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, checkpoint_mlp: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        if checkpoint_mlp:
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """A learned query attends over the (valid) tokens: (B, L, dim) -> (B, dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_embed = nn.Parameter(torch.zeros(dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.query_embed, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        k, v = self.kv(x).view(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        q = self.query_embed.view(1, self.heads, 1, hd).expand(b, -1, -1, -1).to(k.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, 1, hd)
        return self.proj(out.reshape(b, d))


# --------------------------------------------------------------------------------------------------------
# the encoder


class ViT3D(nn.Module):
    """3D ViT with a Conv3d patch embedding, 3D RoPE attention and cls / mean / attn pooling.

    Args:
        dim, depth, heads: width, number of blocks, attention heads (``dim / heads`` even and >= 6).
        patch: patch size (z, y, x); inputs must be multiples of it.
        in_chans: input channels (1 for CT).
        mlp_ratio: MLP hidden width / dim.
        pool: "cls" (a learned CLS token, unrotated, is prepended), "mean" (masked mean of patch tokens)
            or "attn" (a learned-query attention pool over the valid patch tokens).
        grad_checkpointing: activation checkpointing in training: "none"; "selective" (keep attention's
            activations, recompute norm2 + MLP of each block in the backward pass); "full" (keep only each
            block's input, recompute the whole block). True / False (the old boolean) mean "full" / "none".
        rope_theta: RoPE base; angles are in units of patches.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        patch: tuple[int, int, int] = (4, 16, 16),
        in_chans: int = 1,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        grad_checkpointing: str | bool = "none",
        rope_theta: float = 100.0,
    ) -> None:
        super().__init__()
        patch = tuple(int(p) for p in patch)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch must be three positive ints (z, y, x), got {patch}")
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r} is not one of {list(POOLS)}")
        if dim < 1 or depth < 1 or heads < 1 or dim % heads:
            raise ValueError(f"need positive dim, depth, heads with dim % heads == 0, got {dim=}, {depth=}, {heads=}")
        self.dim, self.depth, self.heads = dim, depth, heads
        self.patch, self.in_chans, self.mlp_ratio, self.pool = patch, in_chans, mlp_ratio, pool
        self.grad_checkpointing = grad_checkpointing_mode(grad_checkpointing)
        self.masked_attention_calls = 0
        """Attention calls (blocks and pool) that received a padding mask, counted on the host (a plain int)."""

        self.patch_embed = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=patch)
        self.cls_embed = nn.Parameter(torch.zeros(dim)) if pool == "cls" else None
        self.rope = RotaryEmbedding3D(dim // heads, theta=rope_theta)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.attn_pool = AttentionPool(dim, heads) if pool == "attn" else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.cls_embed is not None:
            nn.init.trunc_normal_(self.cls_embed, std=0.02)

    @property
    def grad_checkpointing(self) -> str:
        """"none" | "selective" | "full"; setting True / False means "full" / "none"; anything else is an error."""
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: str | bool) -> None:
        self._grad_checkpointing = grad_checkpointing_mode(value)

    # ----------------------------------------------------------------------------------------------------

    def _check(self, x: Tensor, depths: Tensor | None) -> None:
        if x.ndim != 5:
            raise ValueError(f"ViT3D expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"ViT3D expects {self.in_chans} channel(s), got shape {tuple(x.shape)}")
        if any(s % p or s == 0 for s, p in zip(x.shape[2:], self.patch)):
            raise ValueError(
                f"volume (D, H, W)={tuple(x.shape[2:])} is not a non-empty multiple of the patch {self.patch}; "
                "pad or crop it first"
            )
        if depths is not None:
            if depths.shape != (x.shape[0],):
                raise ValueError(f"depths must have shape ({x.shape[0]},), got {tuple(depths.shape)}")
            if depths.is_floating_point() or depths.is_complex():
                raise ValueError(f"depths must be an integer tensor, got {depths.dtype}")

    def valid_tokens(self, depths: Tensor, grid: tuple[int, int, int], d: int) -> Tensor | None:
        """bool (B, gz*gy*gx) marking patch tokens inside the valid depth, or None when nothing is padded."""
        lo, hi = (int(v) for v in torch.aminmax(depths))
        if lo < 1 or hi > d:
            raise ValueError(f"depths must lie in [1, D={d}], got values in [{lo}, {hi}]")
        gz, gy, gx = grid
        nz = torch.div(depths + self.patch[0] - 1, self.patch[0], rounding_mode="floor")  # ceil(depth / pz)
        if int(nz.min()) == gz:
            return None
        z = torch.arange(gz, device=depths.device)
        return (z[None, :] < nz[:, None]).repeat_interleave(gy * gx, dim=1)

    def forward_tokens(self, x: Tensor, depths: Tensor | None = None,
                       collect: tuple[int, ...] = ()) -> tuple[Tensor, Tensor | None]:
        """x (B, C, D, H, W) -> (normed tokens (B, L, dim), valid bool (B, L) or None).

        L = n_prefix + gz*gy*gx (n_prefix = 1 with the CLS token, else 0), tokens in z-major order.
        ``collect``: block indices whose outputs (patch tokens only, (B, gz*gy*gx, dim), before the final norm) are
        set as ``self.collected`` (a list, by each call that collects) for dense heads (``downstream/segmentation``).
        """
        self._check(x, depths)
        tokens = self.patch_embed(x)  # (B, dim, gz, gy, gx)
        grid = tuple(tokens.shape[2:])
        # contiguous: every block then sees inputs of one layout (a compiled block guards on strides, and on the
        # view's base shape, which would recompile it per depth); the first LayerNorm would copy it anyway
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, N, dim)
        valid = None if depths is None else self.valid_tokens(depths.to(x.device), grid, x.shape[2])
        n_prefix = 0
        if self.cls_embed is not None:
            n_prefix = 1
            cls = self.cls_embed.to(tokens.dtype).view(1, 1, -1).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
            if valid is not None:
                valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
        cos, sin = self.rope(grid, n_prefix, tokens.device)
        mask = None if valid is None else valid[:, None, None, :]
        if mask is not None:
            self.masked_attention_calls += len(self.blocks) + (self.attn_pool is not None)
        mode = self.grad_checkpointing if self.training and torch.is_grad_enabled() else "none"
        collected: list[Tensor] = []
        for i, blk in enumerate(self.blocks):
            if mode == "full":
                tokens = checkpoint(blk, tokens, cos, sin, mask, use_reentrant=False)
            else:
                tokens = blk(tokens, cos, sin, mask, checkpoint_mlp=mode == "selective")
            if i in collect:
                collected.append(tokens[:, n_prefix:])
        if collect:
            self.collected = collected
        return self.norm(tokens), valid

    def forward(self, x: Tensor, depths: Tensor | None = None) -> Tensor:
        """x (B, C, D, H, W), depths (B,) valid slices per sample or None -> features (B, dim)."""
        tokens, valid = self.forward_tokens(x, depths)
        return self.pool_tokens(tokens, valid)

    def pool_tokens(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """``forward_tokens``' output -> the pooled features (B, dim) that ``forward`` returns."""
        if self.pool == "cls":
            return tokens[:, 0]
        if self.pool == "mean":
            if valid is None:
                return tokens.mean(dim=1)
            w = valid.to(tokens.dtype).unsqueeze(-1)
            return (tokens * w).sum(dim=1) / w.sum(dim=1)
        return self.attn_pool(tokens, None if valid is None else valid[:, None, None, :])


def vit3d_from_config(cfg: ModelConfig) -> ViT3D:
    """The ViT3D named by ``cfg.preset`` with ``cfg.patch``, ``cfg.pool`` and ``cfg.grad_checkpointing``."""
    if cfg.preset not in VIT3D_PRESETS:
        raise ValueError(f"model.preset={cfg.preset!r} is not one of {list(VIT3D_PRESETS)}")
    return ViT3D(
        **VIT3D_PRESETS[cfg.preset],
        patch=tuple(cfg.patch),
        pool=cfg.pool,
        grad_checkpointing=cfg.grad_checkpointing,
    )


def vit3d_flops_per_sample(model_or_dims: ViT3D | Mapping | str, grid_tokens: int) -> float:
    """Forward FLOPs of one sample with ``grid_tokens`` patch tokens (a training step is ~3x this).

    ``model_or_dims``: a ViT3D, a preset name, or a mapping with dim, depth and optionally heads, patch,
    in_chans, mlp_ratio, pool. Counts 2 FLOPs per multiply-add of every matmul (patch embedding, qkv,
    projection, MLP) plus attention ``4 * L**2 * dim`` per layer (scores and weighted sum), with
    L = grid_tokens (+1 for the CLS token). Norms, softmax, RoPE and pooling are ignored.
    """
    if isinstance(model_or_dims, ViT3D):
        m = model_or_dims
        dims = dict(dim=m.dim, depth=m.depth, patch=m.patch, in_chans=m.in_chans, mlp_ratio=m.mlp_ratio, pool=m.pool)
    elif isinstance(model_or_dims, str):
        dims = dict(VIT3D_PRESETS[model_or_dims])
    else:
        dims = dict(model_or_dims)
    dim, depth = dims["dim"], dims["depth"]
    patch = dims.get("patch", (4, 16, 16))
    in_chans, mlp_ratio = dims.get("in_chans", 1), dims.get("mlp_ratio", 4.0)
    n = grid_tokens + (1 if dims.get("pool", "cls") == "cls" else 0)
    embed = 2.0 * grid_tokens * in_chans * math.prod(patch) * dim
    per_layer = 2.0 * n * (4 * dim * dim + 2 * int(dim * mlp_ratio) * dim) + 4.0 * n * n * dim
    return embed + depth * per_layer
