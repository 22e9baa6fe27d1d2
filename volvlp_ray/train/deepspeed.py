"""DeepSpeed wiring: the engine config (ZeRO stage, precision, clipping, warmup + cosine) and parameter groups.

Optimizers are DeepSpeed's own: ``AdamW`` (torch's implementation on CPU) or ``Muon``. For Muon, DeepSpeed
tags each parameter itself: hidden matrices (>= 2-D, name without "embed") go to Muon, everything else
(patch/token embeddings, norms, biases, logit scale and bias) to the auxiliary AdamW. Weight decay is
applied to matrices only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from volvlp_ray.config import Config

__all__ = ["deepspeed_config", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def deepspeed_config(cfg: Config, use_gpu: bool) -> dict[str, Any]:
    t = cfg.train
    bf16 = use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    opt_params: dict[str, Any] = {"lr": t.lr, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": t.weight_decay}
    if t.optimizer == "adamw":
        opt = {"type": "AdamW", "params": {**opt_params, "torch_adam": not use_gpu}}
    else:
        opt = {"type": "Muon", "params": {**opt_params, "muon_lr": t.muon_lr, "momentum": 0.95,
                                          "torch_adam": not use_gpu}}
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if t.zero_stage in (1, 2):
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7,
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
    }
