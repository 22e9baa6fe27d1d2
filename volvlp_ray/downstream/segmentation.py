"""Organ segmentation from the pre-trained ViT3D (SigVLP's segmentation with frozen features, Fig. 4).

    python jobs/segmentation.py --checkpoint latest [key=value ...]

A Ray Train job (``TorchTrainer``, DDP over ``scaling.num_workers`` workers; gloo on CPU, NCCL on GPUs) trains, for
each head in ``segmentation.heads`` and each encoder (the pre-trained one, and with ``random_baseline`` a randomly
initialised ViT3D of the same architecture):

- **linear**: a linear layer on each patch token of the frozen encoder's last layer giving the class logits of the
  patch's ``pz x py x px`` voxels (a linear probe, unpatchified to voxels);
- **unetr**: a light UNETR-style decoder: the last layer's tokens and two earlier layers' (``collect``) as 3-D feature
  maps, upsampled stage by stage by MONAI's ``UnetrUpBlock`` (transposed convolution, skip concatenation,
  convolution block) to the voxel grid, the last skip a convolution stem of the image itself; the encoder frozen or
  fine-tuned (``segmentation.encoder``).

Targets are the shards' organ label maps (``data/labelmaps.py``: ``SEG_CLASSES``), read by Ray Data from the
training split (``read_shards`` with the ``labelmap.npy`` member), cut into random crops of ``segmentation.crop``
voxels (padded with air / background), streamed to the workers. Loss: MONAI's ``DiceCELoss`` (softmax, one-hot
targets). Evaluation (rank 0, after each head is trained): whole held-out volumes by MONAI's
``sliding_window_inference`` (windows of the crop size, padded with air), argmax, MONAI's ``DiceMetric`` per organ
(background excluded; an organ absent from a volume's ground truth is left out of that volume's mean), averaged
over volumes; plus overlay pictures (CT slice, ground truth, each encoder's prediction). Results: a JSON report, a
Ray Train checkpoint folder holding it and the pictures, and (``jobs/segmentation.py``) the pre-training run's
MLflow run: metrics ``segmentation/<head>/<encoder>/dice/<organ>`` and ``.../dice/mean``.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from volvlp_ray.data.labelmaps import SEG_CLASSES

__all__ = ["SegModel", "crop_pair", "dice_per_class", "stage_factors", "segment_volume"]

N_CLASSES = len(SEG_CLASSES)


def stage_factors(patch: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Upsampling factors per decoder stage whose product per axis is the patch: factors of 2 while the size is
    even, then the odd rest; an axis with fewer stages is upsampled in the last ones. (4, 16, 16) ->
    [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]."""
    per_axis = []
    for p in patch:
        f, rest = [], int(p)
        while rest > 1 and rest % 2 == 0:
            f.append(2)
            rest //= 2
        if rest > 1:
            f.append(rest)
        per_axis.append(f)
    n = max(1, max(len(f) for f in per_axis))
    padded = [[1] * (n - len(f)) + f for f in per_axis]
    return [tuple(padded[a][i] for a in range(3)) for i in range(n)]


def _to_map(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, gz*gy*gx, C) tokens in z-major order -> (B, C, gz, gy, gx)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *grid)


class LinearHead(nn.Module):
    """A linear layer per patch token -> the class logits of the patch's voxels."""

    def __init__(self, dim: int, patch: tuple[int, int, int], n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.patch, self.n_classes = tuple(patch), n_classes
        self.proj = nn.Linear(dim, n_classes * int(np.prod(patch)))

    def forward(self, x, tokens, collected, grid):
        b = tokens.shape[0]
        pz, py, px = self.patch
        gz, gy, gx = grid
        out = self.proj(tokens).reshape(b, gz, gy, gx, self.n_classes, pz, py, px)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, self.n_classes, gz * pz, gy * py, gx * px)


class UNETRHead(nn.Module):
    """UNETR-style decoder: 1x1 projections of the encoder's layers, MONAI ``UnetrUpBlock`` stages up to the voxel
    grid; skips are the earlier layers (deep to shallow), then the image stem (average-pooled where a stage is
    coarser than the image; at full resolution for the last stage)."""

    def __init__(self, dim: int, patch: tuple[int, int, int], n_collected: int, channels: int = 16,
                 n_classes: int = N_CLASSES) -> None:
        super().__init__()
        from monai.networks.blocks import UnetResBlock, UnetrUpBlock

        self.stages = stage_factors(patch)
        self.bottom = nn.Conv3d(dim, channels, 1)
        self.skip_proj = nn.ModuleList(nn.Conv3d(dim, channels, 1) for _ in range(n_collected))
        self.stem = UnetResBlock(3, 1, channels, kernel_size=3, stride=1, norm_name="instance")
        self.ups = nn.ModuleList(UnetrUpBlock(3, channels, channels, kernel_size=3, upsample_kernel_size=f,
                                              norm_name="instance", res_block=False) for f in self.stages)
        self.out = nn.Conv3d(channels, n_classes, 1)

    def forward(self, x, tokens, collected, grid):
        f = self.bottom(_to_map(tokens, grid))
        hidden = [_to_map(h, grid) for h in reversed(collected)]  # deep to shallow
        stem = self.stem(x)
        for i, (up, factor) in enumerate(zip(self.ups, self.stages)):
            size = tuple(s * k for s, k in zip(f.shape[2:], factor))
            if i == len(self.ups) - 1:
                skip = stem
            elif i < len(hidden):
                skip = F.interpolate(self.skip_proj[i](hidden[i]), size=size, mode="trilinear", align_corners=False)
            else:
                skip = F.adaptive_avg_pool3d(stem, size)
            f = up(f, skip)
        return self.out(f)


class SegModel(nn.Module):
    """A ViT3D encoder (frozen unless ``tune_encoder``) and a dense head: (B, 1, D, H, W) -> (B, K, D, H, W)."""

    def __init__(self, vit, head: str, channels: int = 16, tune_encoder: bool = False) -> None:
        super().__init__()
        self.vit, self.tune_encoder = vit, tune_encoder
        depth = len(vit.blocks)
        self.collect = tuple(sorted({max(0, depth // 3 - 1), max(0, 2 * depth // 3 - 1)} - {depth - 1})) \
            if head == "unetr" else ()
        if head == "linear":
            self.head = LinearHead(vit.dim, vit.patch)
        elif head == "unetr":
            self.head = UNETRHead(vit.dim, vit.patch, len(self.collect), channels)
        else:
            raise ValueError(f"head must be 'linear' or 'unetr', got {head!r}")
        if not tune_encoder:
            for p in self.vit.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.tune_encoder:
            self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.vit.patch))
        with nullcontext() if self.tune_encoder else torch.no_grad():
            tokens, _ = self.vit.forward_tokens(x, None, collect=self.collect)
            collected = list(self.vit.collected) if self.collect else []
        n_prefix = 1 if self.vit.cls_embed is not None else 0
        return self.head(x, tokens[:, n_prefix:], collected, grid)


def crop_pair(volume: np.ndarray, labels: np.ndarray, crop: tuple[int, int, int], rng: np.random.Generator,
              hu_window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop`` (z, y, x) of an int16 HU volume and its label map: (1, cz, cy, cx) float32 in [-1, 1] and
    (cz, cy, cx) int64; where the volume is smaller than the crop it is padded with air (-1) / background (0)."""
    from volvlp_ray.data.transforms import normalise

    img = np.full((1, *crop), -1.0, dtype=np.float32)
    lab = np.zeros(crop, dtype=np.int64)
    src, dst = [], []
    for n, c in zip(volume.shape, crop):
        if n >= c:
            s = int(rng.integers(0, n - c + 1))
            src.append(slice(s, s + c))
            dst.append(slice(0, c))
        else:
            s = int(rng.integers(0, c - n + 1))
            src.append(slice(0, n))
            dst.append(slice(s, s + n))
    img[(0, *dst)] = normalise(np.asarray(volume[tuple(src)]), hu_window)
    lab[tuple(dst)] = labels[tuple(src)]
    return img, lab


class _CropRows:
    """Ray Data flat_map: a raw shard sample -> one training crop (samples without a label map are dropped)."""

    def __init__(self, crop, hu_window, seed: int) -> None:
        self.crop, self.hu_window, self.seed, self.calls = tuple(crop), tuple(hu_window), seed, 0

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from volvlp_ray.data.shards import DecodeError, decode_sample, npy_view

        if row.get("labelmap.npy") is None:
            return []
        try:
            s = decode_sample(row)
            lab = npy_view(row["labelmap.npy"])
        except (DecodeError, ValueError):
            return []
        if lab.shape != s["volume"].shape:
            return []
        self.calls += 1
        rng = np.random.default_rng([self.seed, zlib.crc32(s["key"].encode()), self.calls, os.getpid()])
        img, target = crop_pair(s["volume"], lab, self.crop, rng, self.hu_window)
        return [{"image": img, "label": target}]


def train_dataset(cfg, seed: int):
    """Ray Dataset of training crops from the training split's shards (label-map member included)."""
    from volvlp_ray.data import storage
    from volvlp_ray.data.pipeline import shard_files
    from volvlp_ray.data.reader import read_shards
    from volvlp_ray.data.shards import CORE_MEMBERS, LABELMAP_MEMBER

    files = shard_files(cfg, "train")
    kwargs: dict[str, Any] = {}
    env = storage.task_runtime_env(*files)
    if env:
        kwargs["runtime_env"] = env
    ds = read_shards(files, suffixes=[*CORE_MEMBERS, LABELMAP_MEMBER], shuffle="files", **kwargs)
    return ds.flat_map(_CropRows(cfg.segmentation.crop, cfg.data.hu_window, seed))


def held_out(cfg, n: int) -> list[dict[str, Any]]:
    """The first ``n`` (0 = all) held-out samples that have a label map: key, int16 volume, uint8 label map."""
    from volvlp_ray.data.pipeline import shard_files
    from volvlp_ray.data.reader import iter_samples, open_shard
    from volvlp_ray.data.shards import DecodeError, decode_sample, npy_view

    out = []
    for location in shard_files(cfg, "valid"):
        with open_shard(location) as stream:
            for raw in iter_samples(stream, location):
                if raw.get("labelmap.npy") is None:
                    continue
                try:
                    s = decode_sample(raw)
                except DecodeError:
                    continue
                out.append({"key": s["key"], "volume": np.array(s["volume"]),
                            "labels": np.array(npy_view(raw["labelmap.npy"]))})
                if n and len(out) >= n:
                    return out
    return out


@torch.no_grad()
def segment_volume(model: nn.Module, volume: np.ndarray, crop: tuple[int, int, int], hu_window, overlap: float,
                   sw_batch_size: int = 4) -> np.ndarray:
    """Whole-volume prediction (D, H, W) uint8 by MONAI's sliding window (windows of ``crop``, air-padded)."""
    from monai.inferers import sliding_window_inference

    from volvlp_ray.data.transforms import normalise

    device = next(model.parameters()).device
    x = torch.from_numpy(normalise(volume, hu_window))[None, None].to(device)
    logits = sliding_window_inference(x, roi_size=tuple(crop), sw_batch_size=sw_batch_size, predictor=model,
                                      overlap=overlap, mode="gaussian", padding_mode="constant", cval=-1.0)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """MONAI ``DiceMetric`` (background excluded) of one volume: (n_classes - 1,), NaN where the class is absent
    from the ground truth (``ignore_empty``)."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    p = F.one_hot(torch.as_tensor(pred, dtype=torch.long), n_classes).permute(3, 0, 1, 2)[None]
    t = F.one_hot(torch.as_tensor(truth, dtype=torch.long), n_classes).permute(3, 0, 1, 2)[None]
    return metric(p, t)[0].numpy().astype(np.float64)


def _overlay_figure(cases: list[dict[str, Any]], title: str):
    """Rows: volumes; columns: CT, ground truth, one prediction per encoder (the axial slice with most organ)."""
    from matplotlib.colors import ListedColormap

    from volvlp_ray.eval.plots import _figure

    names = [k for k in cases[0]["pred"]]
    cols = 2 + len(names)
    fig = _figure(2.4 * cols, 2.4 * len(cases) + 0.6)
    # background (transparent), lung, heart, aorta, airways, esophagus, bones, liver
    colours = ["#00000000", "#4c9be8", "#e8574c", "#ff8c1a", "#7fd34e", "#b06ad9", "#ffe119", "#8c5a3c"]
    cmap = ListedColormap(colours[:N_CLASSES])
    for r, case in enumerate(cases):
        k = int(np.argmax((case["labels"] > 0).sum(axis=(1, 2))))
        ct = case["volume"][k].astype(np.float32)
        panels = [("CT", None), ("ground truth", case["labels"][k])] + [(n, case["pred"][n][k]) for n in names]
        for c, (label, lab) in enumerate(panels):
            ax = fig.add_subplot(len(cases), cols, r * cols + c + 1)
            ax.imshow(ct[::-1], cmap="gray", vmin=-1000, vmax=600)  # anterior up
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab[::-1], 0), cmap=cmap, vmin=0, vmax=N_CLASSES - 1, alpha=0.55,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{case['key']} z={k}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: every (head, encoder) variant trained in turn on the shard of crops; rank 0 evaluates each
    and reports the results (a checkpoint folder with ``segmentation.json`` and the overlays)."""
    import tempfile

    import ray.train
    from monai.losses import DiceCELoss
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from volvlp_ray import console
    from volvlp_ray.config import config_from_dict
    from volvlp_ray.models import VLP
    from volvlp_ray.models.vision import vit3d_from_config

    if config.get("console") is not None:
        console.attach(config["console"])
    cfg = config_from_dict(config["config"])
    s = cfg.segmentation
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("train")

    def crops():
        while True:
            for b in shard.iter_torch_batches(batch_size=s.batch_size, drop_last=True,
                                              local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                              local_shuffle_seed=cfg.seed + rank,
                                              dtypes={"image": torch.float32, "label": torch.int64}):
                yield b

    stream = crops()
    encoders = ["pretrained", *(["random"] if s.random_baseline else [])]
    cases = held_out(cfg, s.eval_volumes) if rank == 0 else []
    report: dict[str, Any] = {"classes": list(SEG_CLASSES[1:]), "variants": {}, "n_eval": len(cases),
                              "crop": list(s.crop), "steps": s.steps, "global_batch": s.batch_size * world}
    shown = cases[: s.overlays]
    preds: dict[str, dict[str, list[np.ndarray]]] = {}
    for head in s.heads:
        for enc in encoders:
            name = f"{head}/{enc}"
            torch.manual_seed(cfg.seed)
            if enc == "pretrained":
                vit = VLP.from_pretrained(config["export_dir"]).vision
            else:
                vit = vit3d_from_config(cfg.model)  # seeded above: the same random encoder on every rank
            tune = head == "unetr" and s.encoder == "tuned"
            model = SegModel(vit, head, s.decoder_channels, tune_encoder=tune)
            groups = [{"params": [p for p in model.head.parameters()], "lr": s.lr}]
            if tune:
                groups.append({"params": list(model.vit.parameters()), "lr": s.encoder_lr})
            ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 \
                else model
            opt = torch.optim.AdamW(groups, weight_decay=1e-4)
            warm = max(1, s.steps // 10)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (
                1 + math.cos(math.pi * min(1.0, max(0, i - warm) / max(1, s.steps - warm)))))
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            ddp.train()
            t0, losses = time.time(), []
            for step in range(1, s.steps + 1):
                b = next(stream)
                loss = loss_fn(ddp(b["image"]), b["label"][:, None])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if rank == 0 and (step % max(1, s.steps // 5) == 0 or step == s.steps):
                    console.info(f"[seg] {name}: step {step}/{s.steps}, loss {np.mean(losses[-10:]):.4f} "
                                 f"({time.time() - t0:.0f}s)")
            entry: dict[str, Any] = {"train_seconds": time.time() - t0, "final_loss": float(np.mean(losses[-10:]))}
            if rank == 0:
                model.eval()
                t1 = time.time()
                dice = []
                for i, case in enumerate(cases):
                    pred = segment_volume(model, case["volume"], tuple(s.crop), tuple(cfg.data.hu_window),
                                          s.sw_overlap)
                    dice.append(dice_per_class(pred, case["labels"]))
                    if i < len(shown):
                        preds.setdefault(head, {}).setdefault(enc, []).append(pred)
                d = np.array(dice) if dice else np.full((0, N_CLASSES - 1), np.nan)
                per = {c: (float(np.nanmean(d[:, j])) if np.isfinite(d[:, j]).any() else None)
                       for j, c in enumerate(SEG_CLASSES[1:])}
                present = [v for v in per.values() if v is not None]
                entry.update(dice=per, dice_mean=float(np.mean(present)) if present else None,
                             n_volumes_with={c: int(np.isfinite(d[:, j]).sum()) for j, c in enumerate(SEG_CLASSES[1:])},
                             eval_seconds=time.time() - t1)
                console.info(f"[seg] {name}: mean Dice {entry['dice_mean']:.3f} over {len(present)} organs on "
                             f"{len(cases)} held-out volumes (" + ", ".join(
                                 f"{c} {v:.2f}" for c, v in per.items() if v is not None) + ")")
            report["variants"][name] = entry
            del ddp, model, opt
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            for head, by_enc in preds.items():
                fig = _overlay_figure([{**c, "pred": {e: by_enc[e][i] for e in by_enc}} for i, c in enumerate(shown)],
                                      f"{head} head: ground truth and predictions (axial slices)")
                fig.savefig(os.path.join(tmp, f"overlay_{head}.png"), dpi=110)
            with open(os.path.join(tmp, "segmentation.json"), "w") as f:
                json.dump(report, f, indent=1)
            for name, e in report["variants"].items():
                for c, v in (e.get("dice") or {}).items():
                    if v is not None:
                        metrics[f"segmentation/{name}/dice/{c}"] = v
                if e.get("dice_mean") is not None:
                    metrics[f"segmentation/{name}/dice/mean"] = e["dice_mean"]
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)
