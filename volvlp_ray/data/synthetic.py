"""A synthetic chest-CT dataset in the CT-RATE layout, deterministic by seed.

Each volume is a phantom built in RAS millimetres (body, fat, lungs, heart, aorta, trachea, spine, liver)
and stored the way scanners store it: int16 raw values (HU = slope*raw + intercept, the slope/intercept in
the metadata CSV), an LPS-like affine (the first two axes flipped, so readers must canonicalise), varying
in-plane spacing, z spacing and number of slices. Sixteen of the 18 CT-RATE abnormalities are rendered
with plausible HU at plausible places; the report describes every present one and many absent ones
(negated), with varied wording, organ by organ. Organ z-extents (mm, RAS) are written as ground truth, and an organ
label map per volume (``labelmaps/{VolumeName}``: TotalSegmentator v2 ids of the lung lobes, heart, aorta, trachea,
a vertebra for the spine and the liver, stored in RAS order with its own affine, unlike the CT).

    generate_dataset("workspace/data/synthetic", num_train=192, num_valid=64, seed=0)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from volvlp_ray import console
from volvlp_ray.data.ctrate import LABELS, csv_paths, volume_relpath

__all__ = ["LABEL_ORGAN", "RENDERED_LABELS", "generate_dataset", "make_case"]

log = logging.getLogger(__name__)

# organ each label's findings belong to (organ-wise text)
LABEL_ORGAN: dict[str, str] = {
    "Medical material": "heart",
    "Arterial wall calcification": "aorta",
    "Cardiomegaly": "heart",
    "Pericardial effusion": "heart",
    "Coronary artery wall calcification": "heart",
    "Hiatal hernia": "esophagus",
    "Lymphadenopathy": "mediastinum",
    "Emphysema": "lung",
    "Atelectasis": "lung",
    "Lung nodule": "lung",
    "Lung opacity": "lung",
    "Pulmonary fibrotic sequela": "lung",
    "Pleural effusion": "pleura",
    "Mosaic attenuation pattern": "lung",
    "Peribronchial thickening": "airways",
    "Consolidation": "lung",
    "Bronchiectasis": "lung",
    "Interlobular septal thickening": "lung",
}
RENDERED_LABELS = tuple(l for l in LABELS if l not in ("Peribronchial thickening", "Interlobular septal thickening"))
PREVALENCE = 0.3

# organ z-extents as fractions of the scanned length (inferior = 0)
ORGAN_EXTENT = {
    "lung": (0.22, 0.98),
    "pleura": (0.22, 0.98),
    "heart": (0.25, 0.51),
    "aorta": (0.05, 0.66),
    "mediastinum": (0.25, 0.9),
    "airways": (0.62, 1.0),
    "esophagus": (0.0, 0.9),
    "bones": (0.0, 1.0),
    "liver": (0.0, 0.27),
}

_POSITIVE = {
    "Medical material": ["A cardiac pacemaker device is seen.", "Medical material is present.", "There is a metallic implant in the chest wall."],
    "Arterial wall calcification": ["Calcified atherosclerotic plaques are seen in the aortic wall.", "Arterial wall calcification is present.", "There is calcification of the aortic wall."],
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present.", "Heart size is increased, consistent with cardiomegaly."],
    "Pericardial effusion": ["There is pericardial effusion.", "Pericardial effusion is present.", "Fluid is seen in the pericardial space."],
    "Coronary artery wall calcification": ["Coronary artery wall calcification is present.", "Calcifications are seen in the coronary arteries.", "There is coronary artery calcification."],
    "Hiatal hernia": ["A hiatal hernia is present.", "There is a sliding hiatal hernia.", "Hiatal hernia is observed."],
    "Lymphadenopathy": ["Enlarged mediastinal lymph nodes are seen, consistent with lymphadenopathy.", "Lymphadenopathy is present.", "There are pathologically enlarged lymph nodes in the mediastinum."],
    "Emphysema": ["Emphysematous changes are seen in both lungs.", "Emphysema is present.", "There is centrilobular emphysema."],
    "Atelectasis": ["Atelectasis is present in the lower lobe.", "There is subsegmental atelectasis.", "Atelectatic changes are seen at the lung bases."],
    "Lung nodule": ["A solid lung nodule is seen.", "Lung nodule is present.", "There is a pulmonary nodule in the parenchyma."],
    "Lung opacity": ["Ground-glass opacity is seen in the lung.", "Lung opacity is present.", "There are patchy opacities in the lung parenchyma."],
    "Pulmonary fibrotic sequela": ["Fibrotic sequelae are seen in the lung periphery.", "Pulmonary fibrotic sequela is present.", "There are reticular fibrotic changes."],
    "Pleural effusion": ["There is pleural effusion.", "Pleural effusion is present.", "Fluid is seen in the pleural space."],
    "Mosaic attenuation pattern": ["A mosaic attenuation pattern is seen.", "Mosaic attenuation pattern is present.", "There is heterogeneous mosaic attenuation of the lungs."],
    "Peribronchial thickening": ["Peribronchial thickening is present.", "There is bronchial wall thickening.", "Peribronchial thickening is observed."],
    "Consolidation": ["There is consolidation in the lung.", "Consolidation is present.", "A consolidated area is seen in the lower lobe."],
    "Bronchiectasis": ["Bronchiectasis is present.", "There are dilated bronchi, consistent with bronchiectasis.", "Bronchiectatic changes are seen."],
    "Interlobular septal thickening": ["Interlobular septal thickening is present.", "There is thickening of the interlobular septa.", "Interlobular septal thickening is observed."],
}
_NEGATIVE_TEMPLATES = ["No {l}.", "There is no {l}.", "{L} is not present.", "No evidence of {l}.", "{L} was not observed."]
_NORMAL = {
    "airways": ["Trachea and both main bronchi are patent.", "The airways are open."],
    "heart": ["The heart contour is normal.", "Cardiac chambers are unremarkable."],
    "aorta": ["The thoracic aorta has a normal calibre.", "Main vascular structures are normal in width."],
    "mediastinum": ["Mediastinal structures are unremarkable."],
    "esophagus": ["The esophagus is within normal limits."],
    "lung": ["Lung aeration is normal.", "Both lungs are clear."],
    "pleura": ["The pleural spaces are clear."],
    "bones": ["No lytic or destructive bone lesion.", "Bone structures are intact."],
}
_ORGAN_ORDER = ["airways", "heart", "aorta", "mediastinum", "esophagus", "lung", "pleura", "bones"]


# --------------------------------------------------------------------------------------------------------
# rendering


def _ellipsoid(grid, c, r):
    x, y, z = grid
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _cylinder(grid, cx, cy, r, z0, z1):
    x, y, z = grid
    return (((x - cx) / r) ** 2 + ((y - cy) / r) ** 2 <= 1.0) & (z >= z0) & (z <= z1)


# TotalSegmentator v2 "total" ids of the structures the phantom renders (its label maps use them)
_TS_IDS = {"liver": 5, "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
           "lung_lower_lobe_right": 14, "trachea": 16, "vertebrae_T6": 38, "heart": 51, "aorta": 52}


def _render(rng: np.random.Generator, labels: dict[str, int], grid, extent: float,
            with_labelmap: bool = False):
    """HU volume (X, Y, Z) in RAS order for the given labels; with ``with_labelmap`` also the organ label map
    (X, Y, Z) uint8 of TotalSegmentator ids (``_TS_IDS``), painted in the order the tissues are (what is seen is
    what is labelled; lesions keep their organ's label). The label map draws nothing from ``rng``."""
    x, y, z = grid
    E = extent
    s = rng.uniform(0.92, 1.08)
    hu = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), -1000.0, dtype=np.float32)
    body = _ellipsoid(grid, (0, 0, E / 2), (150 * s, 108 * s, 10 * E))
    hu[body] = -90.0  # subcutaneous fat
    inner = _ellipsoid(grid, (0, 0, E / 2), (138 * s, 96 * s, 10 * E))
    hu[inner] = 35.0  # muscle / soft tissue
    medi = _ellipsoid(grid, (0, 5, E / 2), (40 * s, 60 * s, 10 * E))
    hu[medi & inner] = -70.0  # mediastinal fat
    liver = _ellipsoid(grid, (55 * s, 5, 0.04 * E), (90 * s, 78 * s, 0.24 * E))
    hu[liver & inner] = 60.0
    seg = np.zeros(hu.shape, dtype=np.uint8)
    seg[liver & inner] = _TS_IDS["liver"]

    lung = np.zeros(hu.shape, dtype=bool)
    lz0, lz1 = ORGAN_EXTENT["lung"]
    for side in (1, -1):
        lung |= _ellipsoid(grid, (side * 72 * s, -5, (lz0 + lz1) / 2 * E), (50 * s, 74 * s, (lz1 - lz0) / 2 * E))
    lung &= inner
    hu[lung] = -860.0 + rng.normal(0, 15, size=lung.sum())
    upper = np.broadcast_to(z >= (lz0 + lz1) / 2 * E, hu.shape)
    right = np.broadcast_to(x > 0, hu.shape)
    for (is_right, is_upper), name in {(False, True): "lung_upper_lobe_left", (False, False): "lung_lower_lobe_left",
                                        (True, True): "lung_upper_lobe_right",
                                        (True, False): "lung_lower_lobe_right"}.items():
        seg[lung & (right == is_right) & (upper == is_upper)] = _TS_IDS[name]

    hz0, hz1 = ORGAN_EXTENT["heart"]
    hscale = 1.38 if labels["Cardiomegaly"] else 1.0
    hc = (-18 * s, 30, (hz0 + hz1) / 2 * E)
    hr = (46 * s * hscale, 40 * s * hscale, (hz1 - hz0) / 2 * E)
    if labels["Pericardial effusion"]:
        shell = _ellipsoid(grid, hc, (hr[0] + 10, hr[1] + 10, hr[2] + 6))
        hu[shell] = 5.0
    heart = _ellipsoid(grid, hc, hr)
    hu[heart] = 130.0
    seg[heart] = _TS_IDS["heart"]
    aorta = _cylinder(grid, -25 * s, -48, 13, 0.05 * E, 0.64 * E) | _cylinder(grid, -4 * s, 22, 15, 0.45 * E, 0.66 * E)
    hu[aorta] = 130.0
    seg[aorta] = _TS_IDS["aorta"]
    trachea = _cylinder(grid, 0, 12, 9, 0.62 * E, E)
    hu[trachea] = -1000.0
    seg[trachea] = _TS_IDS["trachea"]
    spine = _cylinder(grid, 0, -85 * s, 19, -1, E + 1)
    hu[spine] = 450.0
    seg[spine] = _TS_IDS["vertebrae_T6"]
    hu[_cylinder(grid, 0, -85 * s, 11, -1, E + 1)] = 250.0

    def in_lung_spot(radius):
        idx = np.flatnonzero(lung)
        if idx.size == 0:
            return (0.0, 0.0, E / 2)
        k = idx[rng.integers(idx.size)]
        i = np.unravel_index(k, lung.shape)
        return (float(x.flat[i[0]]), float(y.flat[i[1]]), float(z.flat[i[2]]))

    if labels["Medical material"]:
        m = (np.abs(x + 60 * s) < 12) & (np.abs(y - 88 * s) < 4) & (np.abs(z - 0.82 * E) < 14)
        hu[m] = 3000.0
    if labels["Arterial wall calcification"]:
        for _ in range(rng.integers(4, 8)):
            a, zz = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.6) * E
            hu[_ellipsoid(grid, (-25 * s + 12 * np.cos(a), -48 + 12 * np.sin(a), zz), (7, 7, 8))] = 800.0
    if labels["Coronary artery wall calcification"]:
        for _ in range(rng.integers(3, 6)):
            a = rng.uniform(0.2, 1.2)
            zz = rng.uniform(0.35, 0.48) * E
            hu[_ellipsoid(grid, (hc[0] + hr[0] * np.cos(a) * 0.9, hc[1] + hr[1] * np.sin(a) * 0.9, zz), (7, 7, 8))] = 700.0
    if labels["Hiatal hernia"]:
        c = (-8, -28, 0.26 * E)
        hu[_ellipsoid(grid, c, (22, 18, 0.07 * E))] = 30.0
        hu[_ellipsoid(grid, c, (15, 12, 0.05 * E))] = -750.0
    if labels["Lymphadenopathy"]:
        for _ in range(rng.integers(2, 5)):
            c = (rng.uniform(-22, 22), rng.uniform(-5, 35), rng.uniform(0.52, 0.75) * E)
            hu[_ellipsoid(grid, c, (10, 10, 11))] = 45.0
    if labels["Emphysema"]:
        for _ in range(rng.integers(6, 12)):
            c = in_lung_spot(15)
            hu[_ellipsoid(grid, c, (16, 16, 18)) & lung] = -990.0
    if labels["Mosaic attenuation pattern"]:
        field = np.sin(x / 22.0 + rng.uniform(0, 6)) * np.sin(y / 19.0 + rng.uniform(0, 6)) * np.sin(z / 25.0)
        hu[lung] += (np.sign(field) * 110.0)[lung]
    if labels["Pulmonary fibrotic sequela"]:
        for side in (1, -1):
            core = _ellipsoid(grid, (side * 72 * s, -5, 0.5 * E), (36 * s, 56 * s, 0.5 * E))
            stripes = np.sin((x + y) / 4.0) > 0.3
            hu[lung & ~core & stripes & (z < 0.7 * E)] = -380.0
    if labels["Bronchiectasis"]:
        for _ in range(rng.integers(3, 6)):
            c = in_lung_spot(6)
            hu[_ellipsoid(grid, c, (8, 8, 16)) & lung] = 60.0
            hu[_ellipsoid(grid, c, (5, 5, 14)) & lung] = -1000.0
    if labels["Lung opacity"]:
        c = in_lung_spot(30)
        hu[_ellipsoid(grid, c, (30, 30, 34)) & lung] = -520.0
    if labels["Consolidation"]:
        c = in_lung_spot(30)
        hu[_ellipsoid(grid, c, (28, 26, 30)) & lung] = 38.0
    if labels["Lung nodule"]:
        for _ in range(rng.integers(1, 3)):
            c = in_lung_spot(8)
            r = rng.uniform(6, 10)
            hu[_ellipsoid(grid, c, (r, r, r)) & lung] = 45.0
    if labels["Atelectasis"]:
        side = rng.choice([-1, 1])
        hu[_ellipsoid(grid, (side * 72 * s, -48, 0.3 * E), (40, 12, 0.06 * E)) & lung] = 25.0
    if labels["Pleural effusion"]:
        hu[lung & (y < -42) & (z < 0.58 * E)] = 10.0
    hu += rng.normal(0, 12, size=hu.shape).astype(np.float32)
    return (hu, seg) if with_labelmap else hu


# --------------------------------------------------------------------------------------------------------
# text


def _sentence(rng: np.random.Generator, label: str, present: bool) -> str:
    if present:
        return str(rng.choice(_POSITIVE[label]))
    t = str(rng.choice(_NEGATIVE_TEMPLATES))
    return t.format(l=label.lower(), L=label)


def _report(rng: np.random.Generator, labels: dict[str, int]) -> tuple[str, str, dict[str, str]]:
    by_organ: dict[str, list[str]] = {o: [] for o in _ORGAN_ORDER}
    for label in LABELS:
        organ = LABEL_ORGAN[label]
        if labels[label]:
            by_organ[organ].append(_sentence(rng, label, True))
        elif rng.random() < 0.6:
            by_organ[organ].append(_sentence(rng, label, False))
    organ_text = {}
    for organ in _ORGAN_ORDER:
        sents = by_organ[organ]
        rng.shuffle(sents)
        if not any(labels[l] for l in LABELS if LABEL_ORGAN[l] == organ) and rng.random() < 0.7:
            sents.insert(0, str(rng.choice(_NORMAL[organ])))
        organ_text[organ] = " ".join(sents)
    findings = " ".join(t for t in organ_text.values() if t)
    positives = [l for l in LABELS if labels[l]]
    impressions = " ".join(f"{p}." for p in positives) if positives else "No significant acute abnormality."
    return findings, impressions, {k: v for k, v in organ_text.items() if v}


# --------------------------------------------------------------------------------------------------------
# one case, and the dataset


def _draw_case(rng: np.random.Generator) -> tuple[dict[str, int], float, float, float]:
    """A case's labels, in-plane and z spacing (mm) and z extent (mm): the generator's first draws."""
    labels = {l: int(rng.random() < PREVALENCE) for l in LABELS}
    if labels["Cardiomegaly"] and rng.random() < 0.4:
        labels["Pericardial effusion"] = 1
    xy_sp = float(rng.choice([4.6, 5.0, 5.4]))
    z_sp = float(rng.choice([4.0, 5.0, 6.0]))
    return labels, xy_sp, z_sp, float(rng.uniform(200, 330))


def case_extent_mm(seed: int, split: str, index: int) -> float:
    """The z extent (mm) of case ``index`` of ``split``, as ``make_case`` draws it, without rendering: after
    resampling to a z spacing ``s`` the volume has about ``extent / s`` slices (the scale benchmark's depths)."""
    _, _, z_sp, extent = _draw_case(np.random.default_rng([seed, 0 if split == "train" else 1, index]))
    return int(round(extent / z_sp)) * z_sp


def make_case(seed: int, split: str, index: int) -> dict:
    """Render one case. Returns the stored int16 array, its affine, metadata, report and labels."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    labels, xy_sp, z_sp, extent = _draw_case(rng)
    n_xy = 80
    n_z = int(round(extent / z_sp))
    extent = n_z * z_sp
    xs = ((np.arange(n_xy) - (n_xy - 1) / 2) * xy_sp).astype(np.float32)
    zs = (np.arange(n_z) * z_sp + z_sp / 2).astype(np.float32)
    grid = (xs[:, None, None], xs[None, :, None], zs[None, None, :])
    hu, seg = _render(rng, labels, grid, extent, with_labelmap=True)
    slope, intercept = (1.0, -1024.0) if rng.random() < 0.7 else (1.0, -1000.0)
    raw = np.clip(np.round((hu - intercept) / slope), -32768, 32767).astype(np.int16)
    stored = raw[::-1, ::-1, :].copy()  # L->R and P->A flipped: an LPS-like storage order
    half = (n_xy - 1) / 2 * xy_sp
    affine = np.array(
        [[-xy_sp, 0, 0, half], [0, -xy_sp, 0, half], [0, 0, z_sp, float(zs[0])], [0, 0, 0, 1]], dtype=np.float64
    )
    findings, impressions, organ_text = _report(rng, labels)
    # the label map is stored in RAS order (not flipped like the CT): readers must use each file's own affine
    labelmap_affine = np.array(
        [[xy_sp, 0, 0, -half], [0, xy_sp, 0, -half], [0, 0, z_sp, float(zs[0])], [0, 0, 0, 1]], dtype=np.float64
    )
    organs = {o: [ORGAN_EXTENT[o][0] * extent, ORGAN_EXTENT[o][1] * extent] for o in ORGAN_EXTENT}
    p, sdx, r = index // 4 + 1, "abcd"[index % 4 // 2], index % 2 + 1
    return {
        "volume_name": f"{split}_{p}_{sdx}_{r}.nii.gz",
        "stored": stored,
        "affine": affine,
        "labelmap": seg,
        "labelmap_affine": labelmap_affine,
        "slope": slope,
        "intercept": intercept,
        "xy_spacing": (xy_sp, xy_sp),
        "z_spacing": z_sp,
        "labels": labels,
        "findings": findings,
        "impressions": impressions,
        "organ_text": organ_text,
        "organs": organs,
    }


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    """A NIfTI file written under a temporary name and renamed into place (never seen half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def _write_case(args: tuple[str, int, str, int]) -> dict:
    root, seed, split, index = args
    case = make_case(seed, split, index)
    _save_nifti(Path(root) / volume_relpath(case["volume_name"]), case.pop("stored"), case.pop("affine"), np.int16)
    # the organ label map: a TotalSegmentator-style multi-label file
    _save_nifti(Path(root) / "labelmaps" / case["volume_name"], case.pop("labelmap"), case.pop("labelmap_affine"),
                np.uint8)
    return case


def generate_dataset(
    root: str | os.PathLike,
    num_train: int,
    num_valid: int,
    seed: int = 0,
    processes: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the synthetic dataset to ``root`` in the CT-RATE layout (skipped when already complete)."""
    root = Path(root)
    stamp = root / "COMPLETE.json"
    want = {"num_train": num_train, "num_valid": num_valid, "seed": seed, "version": 3}  # 3: label maps
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        if progress:
            console.info(f"[data] synthetic dataset already at {root} ({num_train} train / {num_valid} valid)")
        return root
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, "train", i) for i in range(num_train)] + [
        (str(root), seed, "valid", i) for i in range(num_valid)
    ]
    cases: list[dict] = []
    workers = processes or min(os.cpu_count() or 1, 4)
    with ProcessPoolExecutor(workers) as pool, console.progress(
            total=len(jobs), desc="[data] synthetic", unit="volumes", plain_lines=4, disabled=not progress) as bar:
        for case in pool.map(_write_case, jobs, chunksize=4):
            cases.append(case)
            bar.update(1)
    for split in ("train", "valid"):
        rows = [c for c in cases if c["volume_name"].startswith(split + "_")]
        paths = csv_paths(root, split)
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(paths["reports"], ["VolumeName", "Findings_EN", "Impressions_EN"],
                   [[c["volume_name"], c["findings"], c["impressions"]] for c in rows])
        _write_csv(paths["metadata"], ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
                   [[c["volume_name"], c["slope"], c["intercept"], str(list(c["xy_spacing"])), c["z_spacing"]] for c in rows])
        _write_csv(paths["labels"], ["VolumeName", *LABELS],
                   [[c["volume_name"], *[c["labels"][l] for l in LABELS]] for c in rows])
        _write_csv(paths["organs"], ["VolumeName", "organ", "z_start_mm", "z_end_mm"],
                   [[c["volume_name"], o, round(a, 2), round(b, 2)] for c in rows for o, (a, b) in c["organs"].items()])
    stamp.write_text(json.dumps(want))
    if progress:
        console.info(f"[data] synthetic dataset written to {root} in {time.time() - t0:.0f}s")
    return root


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
