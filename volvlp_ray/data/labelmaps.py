"""Organ label maps on the CT's grid: segmentation labels for the downstream segmentation task (SigVLP's Fig. 4).

A volume's label map comes, in this order, from

    {source}/labelmaps/{VolumeName}     a multi-label NIfTI (the synthetic generator writes these; any tool's output
                                        with TotalSegmentator v2 "total" ids, or the ids of data.segmentation_labels)
    {source}/segmentations/...          the TotalSegmentator output that organ extents read (``segmentation.py``):
                                        one multi-label file, or a folder of binary masks per structure

and is stored in the volume's shard sample as ``{key}.labelmap.npy``: uint8 class indices (``SEG_CLASSES``), shape
(D, H, W) = the CT's, on the CT's grid. Each file is read with its own affine (any orientation, spacing, grid or
field of view) and resampled onto the grid the CT was preprocessed to (``transforms.PreprocessResult.affine``) by
nearest neighbour: every output voxel takes the label of the source voxel whose centre is nearest to its own
centre in world (RAS mm) coordinates; output voxels outside the source grid are background.

Structures map to classes by name (``structure_class``): the five lung lobes -> lung; heart and left atrial
appendage -> heart; aorta; trachea -> airways; esophagus; vertebrae, sacrum, ribs, sternum, costal cartilages,
clavicles, scapulae, humeri -> bones; liver. Other structures are background. Where a folder's masks overlap, the
later file (sorted by name) wins.
"""

from __future__ import annotations

import numpy as np

from volvlp_ray.data import storage
from volvlp_ray.data.segmentation import _canonical

__all__ = ["SEG_CLASSES", "labelmap_on_grid", "read_labelmap", "structure_class"]

SEG_CLASSES: tuple[str, ...] = ("background", "lung", "heart", "aorta", "airways", "esophagus", "bones", "liver")
"""Class index -> name of the stored label maps (0 = background)."""

_BY_NAME = {
    "heart": "heart", "atrial_appendage_left": "heart", "aorta": "aorta", "trachea": "airways",
    "esophagus": "esophagus", "liver": "liver", "sacrum": "bones", "sternum": "bones", "costal_cartilages": "bones",
    "clavicula_left": "bones", "clavicula_right": "bones", "scapula_left": "bones", "scapula_right": "bones",
    "humerus_left": "bones", "humerus_right": "bones",
}


def structure_class(structure: str) -> int:
    """The ``SEG_CLASSES`` index of a TotalSegmentator structure name (0 for a structure not used)."""
    if structure.startswith("lung_") and "lobe" in structure:
        return SEG_CLASSES.index("lung")
    if structure.startswith(("vertebrae_", "rib_left_", "rib_right_")):
        return SEG_CLASSES.index("bones")
    group = _BY_NAME.get(structure)
    return SEG_CLASSES.index(group) if group else 0


def read_labelmap(location: str, kind: str, table: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(classes (X, Y, Z) uint8 in RAS, affine 4x4)`` of a multi-label file (``kind="file"``, ids from
    ``table``) or a folder of binary masks (``kind="folder"``). Raises ``ValueError`` for a file that is not an
    integer label volume, a folder whose masks differ in grid, or one that holds no structure of ``SEG_CLASSES``."""
    shown = storage.redact(location)
    if kind == "file":
        img = _canonical(location)
        data = np.asanyarray(img.dataobj)
        if not np.issubdtype(data.dtype, np.integer):
            if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
                raise ValueError(f"{shown}: a multi-label map must hold integer labels (dtype {data.dtype} with "
                                 "fractional or non-finite values)")
        data = data.astype(np.int64)
        lo, hi = int(data.min()), int(data.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{shown}: labels must be in [0, 65535], found [{lo}, {hi}]")
        lut = np.zeros(hi + 1, dtype=np.uint8)
        for label, structure in table.items():
            if 0 < label <= hi:
                lut[label] = structure_class(structure)
        classes, affine = lut[data], np.asarray(img.affine, dtype=np.float64)
    elif kind == "folder":
        classes = affine = None
        for name, entry in sorted(storage.list_dir(location).items()):
            if entry != "file" or not name.endswith((".nii.gz", ".nii")):
                continue
            cls = structure_class(name.removesuffix(".gz").removesuffix(".nii"))
            if not cls:
                continue
            img = _canonical(storage.child(location, name))
            if classes is None:
                classes, affine = np.zeros(img.shape, dtype=np.uint8), np.asarray(img.affine, dtype=np.float64)
            elif img.shape != classes.shape or not np.allclose(img.affine, affine, atol=1e-3):
                raise ValueError(f"{shown}: mask {name} is on another grid than the folder's first mask")
            classes[np.asanyarray(img.dataobj) != 0] = cls
        if classes is None:
            raise ValueError(f"{shown}: no mask of a structure of the label classes ({', '.join(SEG_CLASSES[1:])})")
    else:
        raise ValueError(f"label map kind must be 'file' or 'folder', got {kind!r}")
    if not classes.any():
        raise ValueError(f"{shown}: no voxel of a structure of the label classes ({', '.join(SEG_CLASSES[1:])})")
    return classes, affine


def labelmap_on_grid(classes: np.ndarray, affine: np.ndarray, out_affine: np.ndarray,
                     out_shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of ``classes`` (X, Y, Z) with ``affine`` onto the grid ``out_affine`` /
    ``out_shape_xyz`` (X, Y, Z): returns (Z, Y, X) uint8 (the shards' index order), background outside the
    source. One z slice at a time (a 480² x 400 grid never holds more than a slice's coordinates)."""
    to_src = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(out_affine, dtype=np.float64)
    nx, ny, nz = out_shape_xyz
    sx, sy, sz = classes.shape
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="ij")
    out = np.zeros((nz, ny, nx), dtype=np.uint8)
    for k in range(nz):
        src = [to_src[a, 0] * ii + to_src[a, 1] * jj + to_src[a, 2] * k + to_src[a, 3] for a in range(3)]
        idx = [np.floor(c + 0.5).astype(np.int64) for c in src]  # nearest centre (halves go up, as np.rint's ties)
        inside = (idx[0] >= 0) & (idx[0] < sx) & (idx[1] >= 0) & (idx[1] < sy) & (idx[2] >= 0) & (idx[2] < sz)
        plane = np.zeros((nx, ny), dtype=np.uint8)
        plane[inside] = classes[idx[0][inside], idx[1][inside], idx[2][inside]]
        out[k] = plane.T
    return out
