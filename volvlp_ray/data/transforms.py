"""Volume preprocessing (MONAI, nibabel reader): NIfTI -> int16 HU array (D, H, W) = (z, y, x) in RAS.

Volumes are read from a local path with ``nibabel.load``, or from any pyarrow filesystem URI (``s3://...``) as
bytes: gunzipped when compressed, then parsed in memory (``storage.load_nifti``).

Steps: HU = slope*raw + intercept -> orientation to RAS from the affine -> resample to the target spacing
-> HU clip -> in-plane crop/pad. Depth is never cropped or resized to a fixed size: it follows from the
scan length and the target z spacing. Index order of the result: z increases toward superior, y toward
anterior, x toward right.

MONAI is imported by ``preprocess_volume`` only, not with this module: ``import monai`` loads all of MONAI's
subpackages (networks, apps, transformers...), about 10 s of CPU, which ``normalise``'s users (every Ray Data
read task of training, evaluation) need not pay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from volvlp_ray.data import storage
from volvlp_ray.data.storage import load_nifti

__all__ = ["PreprocessResult", "load_nifti_hu", "normalise", "preprocess_volume"]

log = logging.getLogger(__name__)


@dataclass
class PreprocessResult:
    volume: np.ndarray
    """int16 HU, (D, H, W) = (z, y, x), RAS."""
    spacing: tuple[float, float, float]
    """(z, y, x) mm of ``volume``."""
    source_spacing: tuple[float, float, float]
    """(z, y, x) mm of the source as read from the NIfTI header, after canonicalisation."""
    z_origin_mm: float
    """RAS z (mm) of the centre of slice 0 of ``volume``."""
    warnings: list[str]
    affine: np.ndarray | None = None
    """4x4 voxel (x, y, z) -> RAS mm of ``volume``'s grid (index ``volume[z, y, x]``): what label maps are
    resampled onto (``labelmaps.labelmap_on_grid``)."""


def load_nifti_hu(path: str, slope: float, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume (local path or URI) and return (HU float32 (X, Y, Z) in stored order, affine 4x4)."""
    img = load_nifti(path)
    raw = np.asarray(img.dataobj)
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise ValueError(f"{storage.redact(path)}: expected a 3-D volume, got shape {raw.shape}")
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return hu, np.asarray(img.affine, dtype=np.float64)


def preprocess_volume(
    path: str,
    slope: float,
    intercept: float,
    spacing_zyx: tuple[float, float, float],
    in_plane_size: int,
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    expected_xy_spacing: tuple[float, float] | None = None,
    expected_z_spacing: float | None = None,
) -> PreprocessResult:
    """The full chain for one NIfTI file (local path or URI). Raises ``ValueError`` for volumes that cannot be
    used; messages name the file without any credentials a URI may carry."""
    hu, affine = load_nifti_hu(path, slope, intercept)
    path = storage.redact(path)
    warnings: list[str] = []
    if hu.size == 0 or min(hu.shape) == 0:
        raise ValueError(f"{path}: empty volume, shape {hu.shape}")
    finite = np.isfinite(hu)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} non-finite voxels (NaN/inf)")
    header_zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # per stored axis, mm
    if expected_xy_spacing is not None and expected_z_spacing is not None:
        want = np.array([*expected_xy_spacing, expected_z_spacing])
        if not np.allclose(np.sort(header_zooms), np.sort(want), rtol=0.02, atol=1e-3):
            msg = f"spacing disagreement: NIfTI header {header_zooms.round(4).tolist()} vs CSV {want.tolist()}"
            warnings.append(msg)
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

    img = MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(affine))
    img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    src_zooms = np.sqrt((img.affine[:3, :3].numpy() ** 2).sum(axis=0))
    sz, sy, sx = spacing_zyx
    img = Spacing(pixdim=(sx, sy, sz), mode="bilinear", padding_mode="border")(img)
    img = torch.clamp(img, hu_window[0], hu_window[1])
    img = ResizeWithPadOrCrop(spatial_size=(in_plane_size, in_plane_size, -1), mode="constant", value=hu_window[0])(img)
    arr = img.as_tensor()[0].numpy()  # (X, Y, Z) RAS
    if arr.shape[2] == 0:
        raise ValueError(f"{path}: no slices left after resampling")
    z_origin = float(img.affine[2, 3])
    vol = np.ascontiguousarray(np.rint(arr.transpose(2, 1, 0))).astype(np.int16)  # (Z, Y, X)
    return PreprocessResult(
        volume=vol,
        spacing=(float(sz), float(sy), float(sx)),
        source_spacing=(float(src_zooms[2]), float(src_zooms[1]), float(src_zooms[0])),
        z_origin_mm=z_origin,
        warnings=warnings,
        affine=np.asarray(img.affine, dtype=np.float64),
    )


def normalise(volume: np.ndarray, hu_window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """int16 HU -> float32 in [-1, 1] over the window."""
    lo, hi = hu_window
    v = (volume.astype(np.float32) - (lo + hi) / 2) / ((hi - lo) / 2)
    return np.clip(v, -1.0, 1.0)
