"""Organ z-extents from a per-volume segmentation (TotalSegmentator's output), for SigVLP's organ-wise chunk text.

Two layouts, under ``{source}/segmentations/`` (either may be used per volume):

    {VolumeName}                              one multi-label file (``TotalSegmentator --ml``); label ids are those
                                              of TotalSegmentator v2's "total" task (``TOTALSEG_V2``) unless a
                                              table {"id": "structure"} is given (``data.segmentation_labels``)
    {VolumeName without .nii.gz}/{structure}.nii.gz    one binary mask per structure (TotalSegmentator's default)

Organ groups are the keys of ``organs.ORGAN_KEYWORDS``. Structures per group (``STRUCTURE_GROUPS``):

    lung         the five lobes (lung_upper_lobe_left, lung_lower_lobe_left, lung_upper_lobe_right,
                 lung_middle_lobe_right, lung_lower_lobe_right)
    airways      trachea
    heart        heart, atrial_appendage_left
    aorta        aorta
    esophagus    esophagus
    bones        vertebrae_C1..S1, sacrum, rib_{left,right}_1..12, sternum, costal_cartilages, clavicula_*,
                 scapula_*, humerus_*
    pleura       derived: the z-range of the lungs (the pleura lines them; TotalSegmentator has no pleura class)
    mediastinum  derived: the z-range of the mediastinal structures (heart, atrial appendage, aorta, trachea,
                 esophagus, superior vena cava, pulmonary vein, brachiocephalic trunk and veins) clipped to the
                 z-range of the lungs; left out when the lungs are not in the segmentation

A group absent from the segmentation gets no extent (``organs.chunk_text`` then treats it as covering the volume).

Extents follow the shards' convention: RAS z in millimetres (world coordinates of the NIfTI affine, which the
preprocessing keeps), ``[z_start, z_end]`` from the lower edge of the lowest slice holding the structure to the
upper edge of the highest one. Each segmentation file is read with its own affine, made closest-canonical (RAS)
first, so its orientation, spacing and grid need not match the CT's. Slices are taken as axial: the z of a slice
is that of its in-plane centre (as the shards' ``z_origin_mm + k * spacing``; gantry tilt is not modelled).
"""

from __future__ import annotations

import numpy as np

from volvlp_ray.data import storage
from volvlp_ray.data.organs import ORGAN_KEYWORDS

__all__ = ["STRUCTURE_GROUPS", "TOTALSEG_V2", "extents_from_segmentation", "label_table", "structure_groups"]

_MEDIASTINAL = "_mediastinal"  # not a group of its own: the input of the derived "mediastinum"


def _totalseg_v2() -> dict[int, str]:
    """TotalSegmentator v2, task "total": the label ids of the structures this module uses (others are ignored)."""
    table = {5: "liver", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
             13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea",
             25: "sacrum", 51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk",
             59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right", 61: "atrial_appendage_left",
             62: "superior_vena_cava", 69: "humerus_left", 70: "humerus_right", 71: "scapula_left",
             72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right", 116: "sternum",
             117: "costal_cartilages"}
    vertebrae = ["S1", *(f"L{i}" for i in range(5, 0, -1)), *(f"T{i}" for i in range(12, 0, -1)),
                 *(f"C{i}" for i in range(7, 0, -1))]
    table.update({26 + i: f"vertebrae_{v}" for i, v in enumerate(vertebrae)})  # 26 = S1 ... 50 = C1
    table.update({92 + i: f"rib_left_{i + 1}" for i in range(12)})  # 92..103
    table.update({104 + i: f"rib_right_{i + 1}" for i in range(12)})  # 104..115
    return table


TOTALSEG_V2: dict[int, str] = _totalseg_v2()

STRUCTURE_GROUPS: dict[str, tuple[str, ...]] = {
    **{s: ("lung",) for s in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                              "lung_middle_lobe_right", "lung_lower_lobe_right")},
    "trachea": ("airways", _MEDIASTINAL),
    "heart": ("heart", _MEDIASTINAL),
    "atrial_appendage_left": ("heart", _MEDIASTINAL),
    "aorta": ("aorta", _MEDIASTINAL),
    "esophagus": ("esophagus", _MEDIASTINAL),
    **{s: (_MEDIASTINAL,) for s in ("superior_vena_cava", "pulmonary_vein", "brachiocephalic_trunk",
                                    "brachiocephalic_vein_left", "brachiocephalic_vein_right")},
    **{s: ("bones",) for s in ("sacrum", "sternum", "costal_cartilages", "clavicula_left", "clavicula_right",
                               "scapula_left", "scapula_right", "humerus_left", "humerus_right")},
}


def structure_groups(structure: str) -> tuple[str, ...]:
    """Organ groups a structure counts toward (``()`` for one that is not used)."""
    if structure.startswith(("vertebrae_", "rib_left_", "rib_right_")):
        return ("bones",)
    return STRUCTURE_GROUPS.get(structure, ())



def label_table(location: str | None = None) -> dict[int, str]:
    """The multi-label table: TotalSegmentator v2 "total" (``location`` empty), or a JSON file {"id": "structure"}."""
    if not location:
        return dict(TOTALSEG_V2)
    try:
        raw = storage.read_json(location)
        table = {int(k): str(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise FileNotFoundError(f"segmentation label table {storage.redact(location)} does not exist") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"segmentation label table {storage.redact(location)} is not a JSON object "
                         f'{{"label id": "structure name"}} ({exc})') from None
    if not any(structure_groups(s) for s in table.values()):
        raise ValueError(f"segmentation label table {storage.redact(location)} names no structure used for organ "
                         f"groups (e.g. {', '.join(list(STRUCTURE_GROUPS)[:6])}, vertebrae_T1, rib_left_1)")
    return table


def _canonical(location: str):
    import nibabel as nib

    img = storage.load_nifti(location)
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3 or min(img.shape) == 0:
        raise ValueError(f"{storage.redact(location)}: expected a 3-D segmentation, got shape {img.shape}")
    return nib.as_closest_canonical(img)


def _slice_z(img) -> tuple[np.ndarray, float]:
    """RAS z (mm) of each slice's in-plane centre, and half a slice's z extent, for a canonical image."""
    a = np.asarray(img.affine, dtype=np.float64)
    nx, ny, nz = img.shape[:3]
    z = a[2, 0] * (nx - 1) / 2 + a[2, 1] * (ny - 1) / 2 + a[2, 2] * np.arange(nz) + a[2, 3]
    return z, abs(float(a[2, 2])) / 2


def _extent(z: np.ndarray, half: float, present: np.ndarray) -> list[float] | None:
    if not present.any():
        return None
    zs = z[present]
    return [float(zs.min() - half), float(zs.max() + half)]


def _union(a: list[float] | None, b: list[float] | None) -> list[float] | None:
    if a is None or b is None:
        return a or b
    return [min(a[0], b[0]), max(a[1], b[1])]


def _multilabel_extents(location: str, table: dict[int, str]) -> dict[str, list[float]]:
    img = _canonical(location)
    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise ValueError(f"{storage.redact(location)}: a multi-label segmentation must hold integer labels "
                             f"(dtype {data.dtype} with fractional or non-finite values)")
        data = data.astype(np.int32)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"{storage.redact(location)}: labels must be in [0, 65535], found [{lo}, {hi}]")
    z, half = _slice_z(img)
    present = np.zeros((hi + 1, data.shape[2]), dtype=bool)  # present[label, slice]
    for k in range(data.shape[2]):
        present[:, k] = np.bincount(data[:, :, k].ravel(), minlength=hi + 1) > 0
    groups: dict[str, list[float] | None] = {}
    for label, structure in table.items():
        if 0 < label <= hi:
            ext = _extent(z, half, present[label])
            for g in structure_groups(structure):
                groups[g] = _union(groups.get(g), ext)
    return {g: e for g, e in groups.items() if e is not None}


def _folder_extents(location: str) -> dict[str, list[float]]:
    groups: dict[str, list[float] | None] = {}
    entries = storage.list_dir(location)
    if not entries:
        raise ValueError(f"{storage.redact(location)}: empty segmentation folder")
    for name, kind in sorted(entries.items()):
        if kind != "file" or not name.endswith((".nii.gz", ".nii")):
            continue
        structure = name.removesuffix(".gz").removesuffix(".nii")
        wanted = structure_groups(structure)
        if not wanted:
            continue
        img = _canonical(storage.child(location, name))
        mask = np.asanyarray(img.dataobj) != 0
        z, half = _slice_z(img)
        ext = _extent(z, half, mask.any(axis=(0, 1)))
        for g in wanted:
            groups[g] = _union(groups.get(g), ext)
    return {g: e for g, e in groups.items() if e is not None}


def extents_from_segmentation(location: str, kind: str, table: dict[int, str] | None = None,
                              decimals: int = 3) -> dict[str, list[float]]:
    """``{organ group: [z_start_mm, z_end_mm]}`` (RAS) from one volume's segmentation.

    ``kind`` is ``"file"`` (multi-label NIfTI, ids from ``table``, default TotalSegmentator v2 "total") or
    ``"folder"`` (one binary mask per structure). Raises ``ValueError`` (or the reader's error) for a segmentation
    that cannot be used, including one that holds none of the structures of the organ groups.
    """
    if kind == "file":
        raw = _multilabel_extents(location, TOTALSEG_V2 if table is None else table)
    elif kind == "folder":
        raw = _folder_extents(location)
    else:
        raise ValueError(f"segmentation kind must be 'file' or 'folder', got {kind!r}")
    mediastinal = raw.pop(_MEDIASTINAL, None)
    if "lung" in raw:
        raw["pleura"] = list(raw["lung"])
        if mediastinal is not None:
            lo, hi = max(mediastinal[0], raw["lung"][0]), min(mediastinal[1], raw["lung"][1])
            if lo < hi:
                raw["mediastinum"] = [lo, hi]
    if not raw:
        raise ValueError(f"{storage.redact(location)}: no structure of the organ groups "
                         f"({', '.join(ORGAN_KEYWORDS)}) in this segmentation")
    return {g: [round(a, decimals), round(b, decimals)] for g, (a, b) in sorted(raw.items())}
