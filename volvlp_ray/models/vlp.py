"""The dual encoder: ViT3D + text tower, linear projections into a joint space, learned scale and bias.

    model = build_model(cfg.model, tokenizer)
    out = model(volume, depths, input_ids, attention_mask)
    # out["image_features"] (B, E), out["text_features"] (B, E): L2-normalised
    # out["logit_scale"]: exp of the stored log-scale (open_clip convention), out["logit_bias"]

An export is a folder that rebuilds the model without Ray or DeepSpeed (and without a network):

    model.save_pretrained("export/", tokenizer, config=config_to_dict(cfg))
    model = VLP.from_pretrained("export/")        # eval mode, model.tokenizer attached
    t = model.embed_text(["no pleural effusion."])  # (1, E)
    v = model.embed_volume(array)                 # array (D, H, W) in model input units -> (E,)

Folder layout: ``model.safetensors`` (all weights), ``vlp_config.json`` (model config, tower dimensions,
vocabulary size, optional run config), ``text_config/config.json`` (the HF config of the text model) and
``tokenizer/``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volvlp_ray.config import ModelConfig
from volvlp_ray.models.text import TextTower, text_tower_from_config
from volvlp_ray.models.vision import ViT3D, vit3d_from_config

__all__ = ["VLP", "build_model"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "vlp_config.json"
TEXT_CONFIG_DIR = "text_config"
TOKENIZER_DIR = "tokenizer"


class VLP(nn.Module):
    """Vision-language dual encoder with L2-normalised projections and SigLIP-style scale / bias.

    Args:
        vision: the 3D image encoder (B, 1, D, H, W) -> (B, vision.dim).
        text: the text tower (B, T) -> (B, text.hidden_size).
        embed_dim: size E of the joint space.
        init_logit_scale: initial scale (= 1 / temperature); ``logit_scale`` stores its log.
        init_logit_bias: initial bias (used by sigmoid losses).
    """

    def __init__(
        self,
        vision: ViT3D,
        text: TextTower,
        embed_dim: int,
        init_logit_scale: float = 10.0,
        init_logit_bias: float = -10.0,
        proj_norm: bool = True,
    ) -> None:
        super().__init__()
        if init_logit_scale <= 0:
            raise ValueError(f"init_logit_scale must be > 0, got {init_logit_scale}")
        self.vision = vision
        self.text = text
        self.embed_dim = embed_dim
        self.vision_proj = nn.Linear(vision.dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.vision_proj.weight, std=vision.dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.hidden_size**-0.5)
        # Batch-normalised projections (no affine): freshly initialised towers map CT volumes, which share most
        # of their anatomy, to nearly one vector (cosine ~0.997 between samples), and a contrastive loss then
        # collapses them completely. Removing the batch's common mode keeps the features apart from step 0.
        self.proj_norm = proj_norm
        self.vision_norm = nn.BatchNorm1d(embed_dim, affine=False) if proj_norm else nn.Identity()
        self.text_norm = nn.BatchNorm1d(embed_dim, affine=False) if proj_norm else nn.Identity()
        # shape (1,), not 0-dim: DeepSpeed's parameter broadcast views each parameter as bytes, which a
        # 0-dim tensor cannot do. ``forward`` returns 0-dim values.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))
        self.model_config: ModelConfig | None = None
        self.tokenizer: Any = None
        self.run_config: dict | None = None  # the training run's resolved config (set by from_pretrained)

    # ----------------------------------------------------------------------------------------------------
    # encoders

    def encode_image(self, volume: Tensor, depths: Tensor | None = None) -> Tensor:
        """volume (B, 1, D, H, W), depths (B,) or None -> L2-normalised features (B, E)."""
        return F.normalize(self.vision_norm(self.vision_proj(self.vision(volume, depths))), dim=-1)

    def _text_projected(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text tower + projection, before the batch normalisation: (B, T) -> (B, E)."""
        return self.text_proj(self.text(input_ids, attention_mask))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) -> L2-normalised features (B, E)."""
        return F.normalize(self.text_norm(self._text_projected(input_ids, attention_mask)), dim=-1)

    def forward(
        self,
        volume: Tensor,
        depths: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        pair_ids: Tensor | None = None,
        pair_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """-> image_features (B, E), text_features (B, E), logit_scale (exp'd, 0-d), logit_bias (0-d).

        With ``pair_ids``/``pair_mask`` (B, K, 2, T) (statement pairs, see ``volvlp_ray.data.negation``) also
        ``pair_features`` (B, K, 2, E), L2-normalised. In training the statements are normalised with the
        statistics of *this batch's* reports, the way the reports themselves are; with the running statistics
        the tower can move the reports away from them along low-variance directions (measured: held-out
        retrieval fell to chance). In eval mode both use the running statistics, as zero-shot prompts do.
        """
        h = self._text_projected(input_ids, attention_mask)
        out = dict(
            image_features=self.encode_image(volume, depths),
            text_features=F.normalize(self.text_norm(h), dim=-1),
            logit_scale=self.logit_scale.exp().squeeze(0),
            logit_bias=self.logit_bias.squeeze(0),
        )
        if pair_ids is not None:
            if pair_mask is None or pair_ids.ndim != 4 or pair_ids.shape[2] != 2 or pair_mask.shape != pair_ids.shape:
                raise ValueError(f"pair_ids and pair_mask must both be (B, K, 2, T), got {tuple(pair_ids.shape)} and "
                                 f"{None if pair_mask is None else tuple(pair_mask.shape)}")
            b, k, _, t = pair_ids.shape
            hp = self._text_projected(pair_ids.reshape(-1, t), pair_mask.reshape(-1, t))
            if self.proj_norm:
                norm = self.text_norm
                if self.training:
                    mean, var = h.mean(0), h.var(0, unbiased=False)
                else:
                    mean, var = norm.running_mean, norm.running_var
                hp = (hp - mean) / (var + norm.eps).sqrt()
            out["pair_features"] = F.normalize(hp, dim=-1).reshape(b, k, 2, -1)
        return out

    # ----------------------------------------------------------------------------------------------------
    # convenience inference

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], max_length: int = 64) -> Tensor:
        """Tokenise ``texts`` with the attached tokenizer and embed them -> (N, E), on the model's device.

        Runs in eval mode (the previous mode is restored) without gradients.
        """
        if self.tokenizer is None:
            raise ValueError("no tokenizer attached: load with VLP.from_pretrained or set model.tokenizer")
        if isinstance(texts, str):
            raise ValueError("embed_text takes a list of strings, got a single string")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        was_training = self.training
        self.eval()
        try:
            return self.encode_text(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def embed_volume(
        self,
        volume: np.ndarray | Tensor | str | os.PathLike,
        preprocess: Callable[[str], np.ndarray] | None = None,
    ) -> Tensor:
        """Embed one volume -> (E,).

        ``volume``: an array (D, H, W) already in model input units (H, W multiples of the in-plane patch),
        or a path (e.g. a NIfTI file) that ``preprocess(path) -> array (D, H, W)`` turns into one. D is
        padded with air (-1) at the end to a multiple of the z patch, as evaluation pads, and the true depth is
        passed as ``depths``.
        """
        if isinstance(volume, (str, os.PathLike)):
            if preprocess is None:
                raise ValueError(f"embed_volume got a path ({os.fspath(volume)!r}); pass preprocess=path -> array")
            volume = preprocess(os.fspath(volume))
        x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, Tensor) else volume, dtype=torch.float32)
        if x.ndim != 3:
            raise ValueError(f"embed_volume expects one volume (D, H, W), got shape {tuple(x.shape)}")
        d = x.shape[0]
        pz = self.vision.patch[0]
        pad = (-d) % pz
        if pad:  # air (-1 in normalised units), as evaluation's collate pads: a zero would read as soft tissue
            x = F.pad(x, (0, 0, 0, 0, 0, pad), value=-1.0)
        x = x[None, None].to(self.device, dtype=self.vision.patch_embed.weight.dtype)
        depths = torch.tensor([d], device=self.device)
        was_training = self.training
        self.eval()
        try:
            return self.encode_image(x, depths)[0]
        finally:
            self.train(was_training)

    def _data_setting(self, key: str) -> Any:
        from volvlp_ray.config import DataConfig

        data = (getattr(self, "run_config", None) or {}).get("data") or {}
        return data.get(key, getattr(DataConfig(), key))

    def embed_reports(self, reports: Sequence[str]) -> Tensor:
        """Embed radiology reports -> (N, E), truncated to the training run's ``data.max_text_length``."""
        return self.embed_text(reports, max_length=int(self._data_setting("max_text_length")))

    def embed_report(self, report: str) -> Tensor:
        """Embed one radiology report -> (E,)::

            model = VLP.from_pretrained("path/to/export")
            e = model.embed_report("Findings: ... No pleural effusion.")
        """
        if not isinstance(report, str) or not report.strip():
            raise ValueError("embed_report takes one non-empty report string")
        return self.embed_reports([report])[0]

    def embed_nifti(self, path: str | os.PathLike, slope: float = 1.0, intercept: float = 0.0) -> Tensor:
        """Embed one CT NIfTI file -> (E,), preprocessed exactly as the training data was: HU = slope * stored +
        intercept (CT-RATE keeps these in its metadata CSV; files already in HU use the defaults), RAS
        orientation, resampling to the run's ``data.spacing``, HU window, in-plane crop/pad, any depth::

            e = model.embed_nifti("valid_1_a_1.nii.gz", slope=1.0, intercept=-1024.0)
        """
        from volvlp_ray.data.transforms import normalise, preprocess_volume

        window = tuple(float(x) for x in self._data_setting("hu_window"))
        res = preprocess_volume(
            os.fspath(path), slope, intercept, tuple(float(x) for x in self._data_setting("spacing")),
            int(self._data_setting("in_plane_size")), window,
        )
        return self.embed_volume(normalise(res.volume, window))

    # ----------------------------------------------------------------------------------------------------
    # export

    def export_spec(self) -> dict[str, Any]:
        """Everything besides the weights that ``from_pretrained`` needs to rebuild this model."""
        v = self.vision
        return dict(
            format="volvlp_ray.VLP",
            version=1,
            model_config=asdict(self.model_config) if self.model_config is not None else None,
            vision=dict(
                dim=v.dim, depth=v.depth, heads=v.heads, patch=list(v.patch), in_chans=v.in_chans,
                mlp_ratio=v.mlp_ratio, pool=v.pool, rope_theta=v.rope.theta,
            ),
            text=dict(
                pool=self.text.pool,
                freeze_layers=self.text.freeze_layers,
                model_type=getattr(self.text.model.config, "model_type", None),
                hidden_size=self.text.hidden_size,
            ),
            embed_dim=self.embed_dim,
            proj_norm=self.proj_norm,
            vocab_size=len(self.tokenizer) if self.tokenizer is not None else None,
        )

    def save_pretrained(self, path: str | os.PathLike, tokenizer: Any = None, config: dict | None = None) -> Path:
        """Write weights (safetensors), ``vlp_config.json`` (+ optional run ``config``), the text model's HF
        config and the tokenizer (``tokenizer`` or the attached one) into folder ``path``; returns it."""
        from safetensors.torch import save_file

        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("save_pretrained needs a tokenizer (argument or model.tokenizer)")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        spec = self.export_spec()
        spec["vocab_size"] = len(tokenizer)
        spec["run_config"] = config
        # cloned: under DeepSpeed ZeRO the parameters are views into flat buffers, which safetensors refuses
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME))
        self.text.model.config.save_pretrained(str(out / TEXT_CONFIG_DIR))
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        (out / CONFIG_NAME).write_text(json.dumps(spec, indent=2, default=str))
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VLP:
        """Rebuild an exported model (offline: no hub, no Ray, no DeepSpeed); eval mode, tokenizer attached."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoTokenizer

        src = Path(path)
        if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{src} is not a VLP export (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        spec = json.loads((src / CONFIG_NAME).read_text())
        vision = ViT3D(**{**spec["vision"], "patch": tuple(spec["vision"]["patch"])})
        text_cfg = AutoConfig.from_pretrained(str(src / TEXT_CONFIG_DIR))
        text = TextTower(text_cfg, pool=spec["text"]["pool"], freeze_layers=spec["text"]["freeze_layers"])
        model = cls(vision, text, embed_dim=spec["embed_dim"], proj_norm=spec.get("proj_norm", False))
        load_model(model, str(src / WEIGHTS_NAME), strict=True, device=str(map_location))
        if spec.get("model_config") is not None:
            model.model_config = ModelConfig(**spec["model_config"])
        model.run_config = spec.get("run_config")
        model.tokenizer = AutoTokenizer.from_pretrained(str(src / TOKENIZER_DIR))
        return model.to(map_location).eval()


def build_model(cfg: ModelConfig, tokenizer: Any) -> VLP:
    """The VLP described by ``cfg`` (vision preset, text tower, projections, initial scale / bias), with the
    tokenizer attached as ``model.tokenizer``."""
    model = VLP(
        vit3d_from_config(cfg),
        text_tower_from_config(cfg, tokenizer),
        embed_dim=cfg.embed_dim,
        init_logit_scale=cfg.init_logit_scale,
        init_logit_bias=cfg.init_logit_bias,
        proj_norm=cfg.proj_norm,
    )
    model.model_config = cfg
    model.tokenizer = tokenizer
    return model
