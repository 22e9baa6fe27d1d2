"""DeepSpeed wiring: the engine config (ZeRO stage, precision, clipping, warmup + cosine) and parameter groups.

Optimizers are DeepSpeed's own: ``AdamW`` (torch's implementation, fused on GPU) or ``Muon``. For Muon,
DeepSpeed (0.19) tags each parameter itself when the engine is built: hidden matrices (>= 2-D, name without
"embed" or "lm_head") go to Muon, everything else (the 5-D Conv3d ``patch_embed``, token / position
embeddings, ``cls_embed``, the attention pool's ``query_embed``, norms, biases, ``logit_scale`` and
``logit_bias``) to the auxiliary AdamW. :func:`routes_to_muon` states that rule; :func:`param_groups` puts
exactly the Muon parameters into the weight-decayed group, so "decay" = Muon and "no_decay" = AdamW.

Precision: bf16 on GPU (when the device supports it), fp32 on CPU. ZeRO-3 with Muon needs
``zero_optimization.reduce_scatter = false`` (DeepSpeed orthogonalises full gradients there and refuses
"Muon and reduce scatter cannot be used together"); :func:`deepspeed_config` sets it.

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, use_gpu), dist_init_required=False)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from volvlp_ray import console
from volvlp_ray.config import Config

__all__ = [
    "COMPILE_VARIANTS", "MUON_EXCLUDED_NAMES", "compile_blocks", "deepspeed_config", "param_groups", "routes_to_muon",
    "skip_cpu_shm_comm_op",
]

MUON_EXCLUDED_NAMES = ("embed", "lm_head")
"""Name parts (lower-cased) that keep a >= 2-D parameter on AdamW: DeepSpeed 0.19's own rule."""


def routes_to_muon(name: str, param: torch.Tensor) -> bool:
    """Whether DeepSpeed's Muon optimizer trains ``param`` (named ``name`` in ``model.named_parameters()``)
    with Muon rather than the auxiliary AdamW: a layer of >= 2 dims whose name contains none of
    :data:`MUON_EXCLUDED_NAMES`. Under ZeRO-3 the layer's shape is ``param.ds_shape``."""
    shape = getattr(param, "ds_shape", None)
    ndim = len(tuple(param.shape) if shape is None else tuple(shape))
    return ndim >= 2 and not any(part in name.lower() for part in MUON_EXCLUDED_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: ``decay`` (hidden matrices, the Muon half under ``optimizer=muon``)
    with ``weight_decay``, and ``no_decay`` (embeddings incl. the patch embedding, norms, biases, logit scale
    and bias; the AdamW half) without. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if routes_to_muon(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from building its shared-memory CPU comm op in this process (called by
    :func:`deepspeed_config` for CPU runs, before the engine starts DeepSpeed's comm backend).

    On the CPU accelerator, DeepSpeed's torch comm backend JIT-builds ``deepspeed_shm_comm`` (C++ compiled with
    ninja under ``~/.cache/torch_extensions``) in every process that starts it, and processes that find a build
    under way wait on its lock file. Only DeepSpeed's CPU *inference* all-reduce uses the op; training collectives
    go through ``torch.distributed`` (gloo). Measured on the 2-core machine: 60-100 s per build, rebuilt whenever
    the cache was built from another environment, paid by each training worker of a job before its first step.
    Marked incompatible, the op is skipped exactly as on a platform that cannot build it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def deepspeed_config(cfg: Config, use_gpu: bool, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of ``cfg.train``: ZeRO stage, bf16 on a bf16-capable GPU (fp32 otherwise),
    gradient clipping, AdamW or Muon, linear warmup then cosine decay to ``lr * min_lr_ratio``.
    ``load_universal``: the engine will load a universal checkpoint (a resume on another number of workers,
    ``volvlp_ray.train.elastic``)."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.optimizer not in ("adamw", "muon"):
        raise ValueError(f"train.optimizer must be adamw or muon, got {t.optimizer!r}")
    gpu = use_gpu and torch.cuda.is_available()
    if not gpu:
        skip_cpu_shm_comm_op()
    bf16 = gpu and torch.cuda.is_bf16_supported()
    opt_params: dict[str, Any] = {"lr": t.lr, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": t.weight_decay}
    # torch's AdamW everywhere (``torch_adam``): DeepSpeed's FusedAdam is a JIT-built CUDA op whose build fails
    # on some GPUs (arch "9.0a"); torch's fused AdamW is one kernel per step on GPU
    if t.optimizer == "adamw":
        opt = {"type": "AdamW", "params": {**opt_params, "torch_adam": True, **({"fused": True} if gpu else {})}}
    else:
        opt = {"type": "Muon", "params": {**opt_params, "muon_lr": t.muon_lr, "momentum": 0.95, "torch_adam": True}}
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
        if t.optimizer == "muon":
            zero.update(reduce_scatter=False)  # DeepSpeed: "Muon and reduce scatter cannot be used together"
    if t.zero_stage in (1, 2):
        zero.update(overlap_comm=gpu, contiguous_gradients=True, reduce_bucket_size=5e7,
                    allgather_bucket_size=5e7)
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "optimizer": opt,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": min(t.warmup_steps, max(0, t.steps - 1)),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


COMPILE_VARIANTS = 4
"""Graphs a compiled block needs per token shape: with / without a key-padding mask x grad enabled (training) /
disabled (validation, evaluation). Dynamo guards on both (a None mask, the global grad mode)."""


def compile_blocks(model: nn.Module, distinct_lengths: int | None = None, **compile_kwargs: Any) -> int:
    """``torch.compile`` each vision transformer block in place (regional compilation); returns how many.

    ``nn.Module.compile`` keeps parameter names and state-dict keys unchanged, so DeepSpeed's Muon routing,
    checkpoints and exports are unaffected, and one compiled block graph is reused by every block of the same
    shape. Fuses RoPE, norms, GELU and the residual adds around the attention and matmul kernels.
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).

    Variable depth: the token count changes from step to step (chunks of varying depth; the in-plane grid is
    fixed). By default the blocks compile with ``dynamic=True``: the token (and batch) dimensions are symbolic, so
    one graph per variant (:data:`COMPILE_VARIANTS`: mask or not, grad or not) serves every depth. Without it,
    dynamo compiles a static graph for the first shape, a dynamic one for the second, and after
    ``recompile_limit`` (8) graphs of one function silently runs it uncompiled. ``dynamic=False`` (a graph per
    token count: the fastest kernels, one compile each) needs ``distinct_lengths``, the number of token counts
    training will see; the recompile limit is raised to cover them all (and said so).
    """
    import torch._dynamo

    blocks = getattr(getattr(model, "vision", model), "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no vision transformer blocks to compile")
    dynamic = compile_kwargs.setdefault("dynamic", True)
    if dynamic is False and not distinct_lengths:
        raise ValueError("compile_blocks(dynamic=False) compiles a graph per token count: give distinct_lengths, "
                         "the number of different sequence lengths training sees, so the recompile limit covers them")
    shapes = distinct_lengths if dynamic is False else 2  # automatic dynamic (None): static first, then dynamic
    needed = COMPILE_VARIANTS * (1 if dynamic is True else shapes)
    old = torch._dynamo.config.recompile_limit
    if old < needed:
        torch._dynamo.config.recompile_limit = needed
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               needed)
    for blk in blocks:
        blk.compile(**compile_kwargs)
    console.info(f"[compile] torch.compile of {len(blocks)} vision blocks, dynamic={dynamic}"
                 + (f" ({distinct_lengths} token counts)" if dynamic is False else "")
                 + f": up to {needed} graphs per block function; torch._dynamo recompile_limit "
                 + (f"raised {old} -> {needed}" if old < needed else f"{old}"))
    return len(blocks)
