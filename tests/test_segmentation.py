"""Segmentation heads and their pieces (``volvlp_ray/downstream/segmentation.py``): decoder stages, the linear
head's unpatchifying, crops, the Dice against hand-made cases, a frozen encoder. The job on a trained tiny model is
tested in ``test_evaluate.py`` (``test_segmentation_job``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volvlp_ray.data.labelmaps import SEG_CLASSES
from volvlp_ray.downstream.segmentation import (LinearHead, SegModel, crop_pair, dice_per_class, segment_volume,
                                                stage_factors)
from volvlp_ray.models.vision import ViT3D


@pytest.mark.parametrize("patch", [(4, 16, 16), (2, 8, 8), (3, 6, 6), (1, 4, 4)])
def test_stage_factors_multiply_to_the_patch(patch):
    stages = stage_factors(patch)
    assert tuple(int(np.prod([s[a] for s in stages])) for a in range(3)) == patch
    assert len(stages) >= 1 and all(min(s) >= 1 for s in stages)


def test_linear_head_puts_each_tokens_logits_in_its_patch():
    """Token (gz, gy, gx) -> voxels [gz*pz:(gz+1)*pz, gy*py:..., gx*px:...]: with a projection that copies an
    input feature to every output, a token whose feature is its own index paints exactly its patch."""
    patch, grid, k = (2, 4, 4), (2, 3, 2), 3
    head = LinearHead(dim=1, patch=patch, n_classes=k)
    with torch.no_grad():
        head.proj.weight.fill_(1.0)
        head.proj.bias.zero_()
    n = int(np.prod(grid))
    tokens = torch.arange(n, dtype=torch.float32).view(1, n, 1)
    out = head(None, tokens, [], grid)
    assert out.shape == (1, k, 4, 12, 8)
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                idx = (z * grid[1] + y) * grid[2] + x  # z-major token order
                block = out[0, :, z * 2:(z + 1) * 2, y * 4:(y + 1) * 4, x * 4:(x + 1) * 4]
                assert torch.all(block == idx)


@pytest.mark.parametrize("head", ["linear", "unetr"])
def test_seg_model_shapes_and_a_frozen_encoder(head):
    torch.manual_seed(0)
    vit = ViT3D(24, 3, 2, patch=(2, 8, 8))
    before = [p.detach().clone() for p in vit.parameters()]
    model = SegModel(vit, head, channels=4)
    x = torch.randn(2, 1, 4, 16, 24)
    y = model(x)
    assert y.shape == (2, len(SEG_CLASSES), 4, 16, 24)
    y.square().mean().backward()
    assert all(p.grad is None for p in vit.parameters())  # frozen: no gradient reaches the encoder
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, vit.parameters()))
    model.train()
    assert not vit.training  # a frozen encoder stays in eval mode
    tuned = SegModel(ViT3D(24, 3, 2, patch=(2, 8, 8)), head, channels=4, tune_encoder=True)
    tuned(x).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.vit.parameters())


def test_crop_pair_crops_and_pads_consistently():
    rng = np.random.default_rng(0)
    vol = (np.arange(6 * 10 * 4).reshape(6, 10, 4) - 900).astype(np.int16)  # every voxel above air
    lab = (np.arange(6 * 10 * 4).reshape(6, 10, 4) % 7).astype(np.uint8)
    img, target = crop_pair(vol, lab, (4, 8, 8), rng, (-1000.0, 1000.0))
    assert img.shape == (1, 4, 8, 8) and target.shape == (4, 8, 8) and target.dtype == np.int64
    # x (4 wide) is padded to 8: air (-1) / background (0) outside, the volume's values inside, label with its voxel
    inside = img[0] > -1.0 + 1e-6
    hu = np.rint(img[0] * 1000.0).astype(int)
    for z, y, x in zip(*np.nonzero(inside)):
        match = np.argwhere(vol == hu[z, y, x])
        assert len(match) == 1 and lab[tuple(match[0])] == target[z, y, x]
    assert inside.sum() == 4 * 8 * 4  # z: 4 of 6 slices, y: 8 of 10 rows, x: all 4 columns (padded to 8)
    assert (target[~inside] == 0).all()


def test_dice_against_hand_made_cases():
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # 4 voxels of class 1
    truth[1, :, :] = 2  # 16 voxels of class 2
    pred = np.zeros_like(truth)
    pred[0, :2, :] = 1  # 8 voxels, 4 right: 2*4/(8+4)
    pred[1, :2, :] = 2  # 8 of 16: 2*8/(8+16)
    pred[0, 3, 3] = 3  # class 3 predicted but absent from the truth: NaN (left out)
    d = dice_per_class(pred, truth)
    assert d.shape == (len(SEG_CLASSES) - 1,)
    assert d[0] == pytest.approx(8 / 12) and d[1] == pytest.approx(16 / 24)
    assert np.isnan(d[2:]).all()
    assert dice_per_class(truth, truth)[:2].tolist() == [1.0, 1.0]


def test_sliding_window_covers_a_volume_deeper_and_shallower_than_the_window():
    """A model that labels voxels brighter than 0 HU as class 2: the whole-volume prediction is exact whatever
    the volume's size against the window (padding with air never leaks into the volume)."""

    class Threshold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(x.shape[0], len(SEG_CLASSES), *x.shape[2:])
            logits[:, 2] = (x[:, 0] > 0).float() * 10
            return logits

    rng = np.random.default_rng(0)
    for shape in [(5, 20, 12), (20, 8, 8), (8, 16, 16)]:
        vol = rng.integers(-1000, 1000, shape).astype(np.int16)
        pred = segment_volume(Threshold(), vol, (8, 16, 16), (-1000.0, 1000.0), overlap=0.25)
        assert pred.shape == shape and np.array_equal(pred, np.where(vol > 0, 2, 0))
