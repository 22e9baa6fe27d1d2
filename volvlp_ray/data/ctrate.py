"""The CT-RATE layout: label names, file names, and a reader that joins volumes with their CSV rows.

    {root}/{split}/{split}_{P}/{split}_{P}_{S}/{split}_{P}_{S}_{R}.nii.gz
    {root}/radiology_text_reports/{train,validation}_reports.csv   VolumeName, Findings_EN, Impressions_EN
    {root}/metadata/{train,validation}_metadata.csv               VolumeName, RescaleSlope, RescaleIntercept,
                                                                   XYSpacing ("[0.75, 0.75]"), ZSpacing
    {root}/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 labels
    {root}/metadata/{split}_organ_extents.csv  (optional)          VolumeName, organ, z_start_mm, z_end_mm

Split names follow CT-RATE: ``train`` and ``valid`` (the CSVs say "validation" for reports/metadata).
"""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = [
    "LABELS",
    "SPLITS",
    "VolumeRecord",
    "csv_paths",
    "find_volumes",
    "parse_xy_spacing",
    "read_split",
    "volume_relpath",
]

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

SPLITS = ("train", "valid")


def csv_paths(root: str | Path, split: str) -> dict[str, Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    long = "train" if split == "train" else "validation"
    return {
        "reports": root / "radiology_text_reports" / f"{long}_reports.csv",
        "metadata": root / "metadata" / f"{long}_metadata.csv",
        "labels": root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
        "organs": root / "metadata" / f"{split}_organ_extents.csv",
    }


def volume_relpath(volume_name: str) -> str:
    """``train_12_a_1.nii.gz`` -> ``train/train_12/train_12_a/train_12_a_1.nii.gz``."""
    stem = volume_name.removesuffix(".nii.gz")
    parts = stem.split("_")
    if len(parts) != 4:
        raise ValueError(f"VolumeName {volume_name!r} is not of the form split_P_S_R.nii.gz")
    split, p, s, _ = parts
    return f"{split}/{split}_{p}/{split}_{p}_{s}/{volume_name}"


def parse_xy_spacing(text: str) -> tuple[float, float]:
    """``"[0.75, 0.75]"`` -> (0.75, 0.75)."""
    value = ast.literal_eval(str(text).strip())
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2:
        raise ValueError(f"XYSpacing {text!r} does not hold two numbers")
    return float(value[0]), float(value[1])


@dataclass
class VolumeRecord:
    """Everything the converter needs about one volume (one row of the joined CSVs)."""

    volume_name: str
    path: str
    split: str
    findings: str
    impressions: str
    slope: float
    intercept: float
    xy_spacing: tuple[float, float]
    z_spacing: float
    labels: list[int]
    organs: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def find_volumes(root: str | Path, split: str) -> dict[str, Path]:
    root = Path(root) / split
    return {p.name: p for p in sorted(root.rglob("*.nii.gz"))}


def read_split(root: str | Path, split: str) -> tuple[list[VolumeRecord], dict[str, list[str]]]:
    """Join volumes on disk with their CSV rows.

    Returns the records and the problems found, as ``{reason: [VolumeName, ...]}``: volumes without a
    row, rows without a volume, duplicate names. Records are only built for names with a volume *and* a
    row in every CSV; the caller quarantines the rest.
    """
    paths = csv_paths(root, split)
    for key in ("reports", "metadata", "labels"):
        if not paths[key].is_file():
            raise FileNotFoundError(f"CT-RATE layout: missing {paths[key]}")
    problems: dict[str, list[str]] = {}
    frames = {}
    for key in ("reports", "metadata", "labels"):
        df = pd.read_csv(paths[key], keep_default_na=False, encoding_errors="replace")
        if "VolumeName" not in df.columns:
            raise ValueError(f"{paths[key]} has no VolumeName column (columns: {list(df.columns)})")
        dup = df["VolumeName"][df["VolumeName"].duplicated()].tolist()
        if dup:
            problems.setdefault("duplicate_row", []).extend(f"{key}:{d}" for d in dup)
            df = df.drop_duplicates("VolumeName", keep="first")
        frames[key] = df.set_index("VolumeName")
    missing_labels = [c for c in LABELS if c not in frames["labels"].columns]
    if missing_labels:
        raise ValueError(f"{paths['labels']} lacks label columns {missing_labels}")
    organs: dict[str, dict[str, list[float]]] = {}
    if paths["organs"].is_file():
        odf = pd.read_csv(paths["organs"])
        for row in odf.itertuples(index=False):
            organs.setdefault(row.VolumeName, {})[row.organ] = [float(row.z_start_mm), float(row.z_end_mm)]

    volumes = find_volumes(root, split)
    names_with_rows = set(frames["reports"].index) & set(frames["metadata"].index) & set(frames["labels"].index)
    all_rows = set(frames["reports"].index) | set(frames["metadata"].index) | set(frames["labels"].index)
    for name in sorted(set(volumes) - names_with_rows):
        problems.setdefault("volume_without_row", []).append(name)
    for name in sorted(all_rows - set(volumes)):
        problems.setdefault("row_without_volume", []).append(name)

    records = []
    for name in sorted(set(volumes) & names_with_rows):
        rep, meta, lab = frames["reports"].loc[name], frames["metadata"].loc[name], frames["labels"].loc[name]
        try:
            xy = parse_xy_spacing(meta["XYSpacing"])
            z = float(meta["ZSpacing"])
            slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
            if not all(math.isfinite(v) for v in (*xy, z, slope, intercept)):
                raise ValueError("non-finite value")
        except (ValueError, SyntaxError, KeyError) as exc:
            problems.setdefault("bad_metadata_row", []).append(f"{name}: {exc}")
            continue
        records.append(
            VolumeRecord(
                volume_name=name,
                path=str(volumes[name]),
                split=split,
                findings=str(rep.get("Findings_EN", "")),
                impressions=str(rep.get("Impressions_EN", "")),
                slope=slope,
                intercept=intercept,
                xy_spacing=xy,
                z_spacing=z,
                labels=[int(lab[c]) for c in LABELS],
                organs=organs.get(name, {}),
            )
        )
    for reason, names in problems.items():
        log.warning("%s/%s: %d x %s (first: %s)", root, split, len(names), reason, names[:3])
    return records, problems
