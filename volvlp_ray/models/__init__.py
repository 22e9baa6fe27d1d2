"""Pure ``nn.Module`` models: the 3D ViT with 3D RoPE, the Hugging Face text tower, and the dual encoder.

No distributed code lives here; wrapping (DeepSpeed, activation checkpointing policy, compile) is in
``volvlp_ray.train``.
"""

from volvlp_ray.models.text import (
    TEXT_PRESETS,
    TextTower,
    build_tokenizer,
    load_tokenizer,
    text_flops_per_sample,
    text_tower_from_config,
)
from volvlp_ray.models.vision import VIT3D_PRESETS, RotaryEmbedding3D, ViT3D, vit3d_flops_per_sample, vit3d_from_config
from volvlp_ray.models.vlp import VLP, build_model

__all__ = [
    "TEXT_PRESETS",
    "VIT3D_PRESETS",
    "VLP",
    "RotaryEmbedding3D",
    "TextTower",
    "ViT3D",
    "build_model",
    "build_tokenizer",
    "load_tokenizer",
    "text_flops_per_sample",
    "text_tower_from_config",
    "vit3d_flops_per_sample",
    "vit3d_from_config",
]
