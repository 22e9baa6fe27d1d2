"""Test helpers: TotalSegmentator-style segmentations of synthetic volumes, built from known organ z-extents."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

# ground-truth group -> (TotalSegmentator v2 label id, structure) pairs covering its z-range between them:
# (lower part, upper part), so that a group's extent is the union of two structures
GROUP_LABELS = {
    "lung": ((11, "lung_lower_lobe_left"), (10, "lung_upper_lobe_left")),
    "heart": ((51, "heart"), (61, "atrial_appendage_left")),
    "aorta": ((52, "aorta"), (52, "aorta")),
    "esophagus": ((15, "esophagus"), (15, "esophagus")),
    "airways": ((16, "trachea"), (16, "trachea")),
    "bones": ((32, "vertebrae_T12"), (43, "vertebrae_T1")),
}


def ground_truth(root: Path, split: str) -> dict[str, dict[str, list[float]]]:
    """``{VolumeName: {organ: [z0, z1]}}`` from the synthetic generator's organ-extents CSV."""
    out: dict[str, dict[str, list[float]]] = {}
    with open(root / "metadata" / f"{split}_organ_extents.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["VolumeName"], {})[row["organ"]] = [float(row["z_start_mm"]), float(row["z_end_mm"])]
    return out


def _grid_image(data: np.ndarray, z_sp: float, xy_sp: float, axcodes: tuple[str, str, str],
                z_shift: float = 0.0) -> nib.Nifti1Image:
    """A RAS-ordered array (x, y, z; slice centres at (k + 0.5) * z_sp + z_shift mm) stored in the orientation
    ``axcodes``."""
    n = data.shape[0]
    affine = np.diag([xy_sp, xy_sp, z_sp, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * xy_sp, -(n - 1) / 2 * xy_sp, z_sp / 2 + z_shift]
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(axcodes))
    out = img.as_reoriented(ornt)
    assert nib.aff2axcodes(out.affine) == axcodes
    return out


def _boxes(gt: dict[str, list[float]]) -> list[tuple[int, str, float, float]]:
    boxes = []
    for group, (low, high) in GROUP_LABELS.items():
        a, b = gt[group]
        mid = (a + b) / 2
        boxes += [(low[0], low[1], a, mid), (high[0], high[1], mid, b)]
    return boxes


def multilabel_segmentation(gt: dict[str, list[float]], extent_mm: float, z_sp: float = 2.5,
                            axcodes=("I", "L", "P"), shift_mm: float = 0.0, n: int = 8) -> nib.Nifti1Image:
    """One multi-label image: each structure a column of voxels over the slices whose centre lies in its range
    (``shift_mm``: the whole image moved along z, as a segmentation of another scan would be)."""
    nz = int(round(extent_mm / z_sp))
    zc = (np.arange(nz) + 0.5) * z_sp
    data = np.zeros((n, n, nz), np.uint8)
    for idx, (label, _, a, b) in enumerate(_boxes(gt)):
        data[idx % n, idx // n, (zc >= a) & (zc <= b)] = label
    return _grid_image(data, z_sp, 40.0, axcodes, z_shift=shift_mm)


def folder_segmentation(folder: Path, gt: dict[str, list[float]], extent_mm: float, groups: tuple[str, ...],
                        z_sp: float = 3.0, axcodes=("L", "P", "S"), n: int = 6) -> None:
    """Binary masks ``{structure}.nii.gz`` for the structures of ``groups``, plus an unused one (spleen) and an
    empty aorta mask when aorta is not among ``groups``."""
    folder.mkdir(parents=True, exist_ok=True)
    nz = int(round(extent_mm / z_sp))
    zc = (np.arange(nz) + 0.5) * z_sp
    masks: dict[str, np.ndarray] = {}
    for label, structure, a, b in _boxes(gt):
        if not any(structure in (lo[1], hi[1]) for g, (lo, hi) in GROUP_LABELS.items() if g in groups):
            continue
        m = masks.setdefault(structure, np.zeros((n, n, nz), np.uint8))
        m[n // 2, n // 2, (zc >= a) & (zc <= b)] = 1
    masks["spleen"] = np.ones((n, n, nz), np.uint8)
    if "aorta" not in groups:
        masks["aorta"] = np.zeros((n, n, nz), np.uint8)
    for structure, m in masks.items():
        nib.save(_grid_image(m, z_sp, 50.0, axcodes), folder / f"{structure}.nii.gz")


def volume_extent_mm(path: str) -> float:
    img = nib.load(path)
    return float(img.shape[2] * img.header.get_zooms()[2])
