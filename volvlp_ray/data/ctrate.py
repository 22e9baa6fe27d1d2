"""The CT-RATE layout: label names, file names, and a reader that joins volumes with their CSV rows.

    {root}/{split}/{split}_{P}/{split}_{P}_{S}/{split}_{P}_{S}_{R}.nii.gz
    {root}/radiology_text_reports/{train,validation}_reports.csv   VolumeName, Findings_EN, Impressions_EN
    {root}/metadata/{train,validation}_metadata.csv               VolumeName, RescaleSlope, RescaleIntercept,
                                                                   XYSpacing ("[0.75, 0.75]"), ZSpacing
    {root}/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 labels
    {root}/metadata/{split}_organ_extents.csv  (optional)          VolumeName, organ, z_start_mm, z_end_mm
    {root}/metadata/{split}_organ_findings.json (optional)         {VolumeName: {organ: findings text}}
    {root}/segmentations/{VolumeName}  or  {root}/segmentations/{VolumeName minus .nii.gz}/{structure}.nii.gz
                                       (optional)                  TotalSegmentator output (see segmentation.py)

Split names follow CT-RATE: ``train`` and ``valid`` (the CSVs say "validation" for reports/metadata).
``root`` is a local folder or any pyarrow filesystem URI (``s3://bucket/ct-rate?region=...``, see storage.py);
volume paths in the records are then URIs of the same form.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from volvlp_ray.data import storage
from volvlp_ray.data.organs import ORGAN_KEYWORDS

__all__ = [
    "LABELS",
    "ORGAN_EXTENT_SOURCES",
    "ORGAN_NAMES",
    "SPLITS",
    "available_splits",
    "label_columns",
    "split_label_names",
    "VolumeRecord",
    "csv_paths",
    "find_labelmaps",
    "find_segmentations",
    "find_volumes",
    "layout_check",
    "layout_locations",
    "layout_problem",
    "parse_xy_spacing",
    "read_organ_findings",
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
ORGAN_EXTENT_SOURCES = ("auto", "csv", "segmentation", "none")
ORGAN_NAMES: tuple[str, ...] = (*ORGAN_KEYWORDS, "general")
"""Organ keys of organ-wise findings: the keyword groups of ``organs.py`` and "general"."""


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


def layout_locations(root: str, split: str) -> dict[str, str]:
    """``csv_paths`` for a local folder or a URI (``storage.child`` keeps the URI's query)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    long = "train" if split == "train" else "validation"
    return {
        "reports": storage.child(root, "radiology_text_reports", f"{long}_reports.csv"),
        "metadata": storage.child(root, "metadata", f"{long}_metadata.csv"),
        "labels": storage.child(root, "multi_abnormality_labels", f"{split}_predicted_labels.csv"),
        "organs": storage.child(root, "metadata", f"{split}_organ_extents.csv"),
        "organ_findings": storage.child(root, "metadata", f"{split}_organ_findings.json"),
        "segmentations": storage.child(root, "segmentations"),
    }


def _split_problem(source: str, split: str) -> str | None:
    shown = storage.redact(source)
    for kind in ("reports", "metadata", "labels"):
        if not storage.is_file(layout_locations(source, split)[kind]):
            return f"{shown} is not in the CT-RATE layout: missing {storage.redact(layout_locations(source, split)[kind])}"
    if not find_volumes(source, split):
        return f"{shown} is not in the CT-RATE layout: no {split}/**/*.nii.gz volumes"
    return None


def _has_any_of_split(source: str, split: str) -> bool:
    return any(storage.is_file(layout_locations(source, split)[kind]) for kind in ("reports", "metadata", "labels")) \
        or storage.is_dir(storage.child(source, split))


def layout_check(source: str) -> tuple[str | None, list[str]]:
    """``(why source is not usable as a CT-RATE-layout folder or None, the splits it holds completely)``, from one
    listing of each split (a CT-RATE folder on an object store has tens of thousands of volumes to list). A source
    may hold one split only (an external evaluation set: its ``valid`` split), but a split it has begun must be
    complete."""
    shown = storage.redact(source)
    try:
        if not storage.is_dir(source):
            return f"source folder {shown!r} does not exist", []
        problems = {s: _split_problem(source, s) for s in SPLITS}
        complete = [s for s, problem in problems.items() if problem is None]
        if not complete:  # what the first begun split (else the first split) lacks
            begun = [s for s in SPLITS if _has_any_of_split(source, s)]
            return problems[(begun or SPLITS)[0]], []
        for split, problem in problems.items():
            if problem and _has_any_of_split(source, split):
                return f"{problem} (the {split} split is incomplete; a source may hold one complete split only)", \
                    complete
    except (OSError, ValueError) as exc:  # an unreachable store, refused credentials, a URI pyarrow does not know
        return f"cannot read source {shown!r}: {type(exc).__name__}: {exc}", []
    return None, complete


def available_splits(source: str) -> list[str]:
    """The splits of ``SPLITS`` that ``source`` holds completely (CSVs and volumes): both for CT-RATE and the
    synthetic data; one for an external evaluation set laid out as its ``valid`` split."""
    return [s for s in SPLITS if _split_problem(source, s) is None]


def layout_problem(source: str) -> str | None:
    """Why ``source`` (a folder or URI) is not usable as a CT-RATE-layout folder, or None (``layout_check``)."""
    return layout_check(source)[0]


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
    """Organ z-extents from the CSV (RAS mm); empty when the CSV is absent or not used."""
    segmentation: str = ""
    """Location of the volume's segmentation ("" when none is used)."""
    segmentation_kind: str = ""
    """"file" (multi-label NIfTI) or "folder" (one binary mask per structure)."""
    organ_findings: dict[str, str] | None = None
    """Organ-wise findings from the JSON file; None: split ``findings`` by keywords."""
    labelmap: str = ""
    """Location of the volume's organ label map ("" when none): ``labelmaps/{VolumeName}`` or its segmentation."""
    labelmap_kind: str = ""
    """"file" (multi-label NIfTI) or "folder" (binary masks per structure)."""
    labelmap_from: str = ""
    """Where the label map was found: "labelmaps" or "segmentation" ("" when none)."""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def find_volumes(root: str | Path, split: str) -> dict[str, str]:
    """``{VolumeName: path or URI}`` of every ``*.nii.gz`` under ``{root}/{split}``."""
    if not storage.is_uri(root):
        base = Path(root) / split
        return {p.name: str(p) for p in sorted(base.rglob("*.nii.gz"))}
    base = storage.child(root, split)
    return {rel.rsplit("/", 1)[-1]: storage.child(base, *rel.split("/")) for rel in storage.list_files(base, ".nii.gz")}


def find_labelmaps(root: str | Path, names: list[str]) -> dict[str, tuple[str, str, str]]:
    """``{VolumeName: (location, "file" | "folder", "labelmaps" | "segmentation")}`` of the volumes' organ label
    maps: the multi-label file ``{root}/labelmaps/{VolumeName}`` (the synthetic generator's), else the volume's
    segmentation (``find_segmentations``)."""
    entries = storage.list_dir(storage.child(str(root), "labelmaps"))
    found = {name: (loc, kind, "segmentation") for name, (loc, kind) in find_segmentations(root, names).items()}
    for name in names:
        if entries.get(name) == "file":
            found[name] = (storage.child(str(root), "labelmaps", name), "file", "labelmaps")
    return found


def find_segmentations(root: str | Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """``{VolumeName: (location, "file" | "folder")}`` for the volumes that have a segmentation under
    ``{root}/segmentations`` (a multi-label file named like the volume, else a folder named like its stem)."""
    seg_root = storage.child(str(root), "segmentations")
    entries = storage.list_dir(seg_root)
    found = {}
    for name in names:
        stem = name.removesuffix(".nii.gz")
        if entries.get(name) == "file":
            found[name] = (storage.child(seg_root, name), "file")
        elif entries.get(stem) == "dir":
            found[name] = (storage.child(seg_root, stem), "folder")
    return found


def _csv_source(location: str):
    """What ``pd.read_csv`` reads: the local path itself, or a URI's bytes."""
    return location if not storage.is_uri(location) else io.BytesIO(storage.read_bytes(location))


def read_organ_findings(location: str) -> dict[str, dict[str, str]]:
    """``{VolumeName: {organ: text}}`` from a JSON file, checked: unknown organ names are an error naming the
    valid ones. Keys may omit ``.nii.gz``; empty texts are dropped."""
    shown = storage.redact(location)
    try:
        raw = json.loads(storage.read_bytes(location).decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"organ findings file {shown} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"organ findings file {shown} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"organ findings file {shown} must hold an object {{VolumeName: {{organ: text}}}}")
    out: dict[str, dict[str, str]] = {}
    for name, organs in raw.items():
        if not isinstance(organs, dict) or not all(isinstance(t, str) for t in organs.values()):
            raise ValueError(f"organ findings file {shown}: the entry of {name!r} must be an object {{organ: text}}")
        unknown = sorted(set(organs) - set(ORGAN_NAMES))
        if unknown:
            raise ValueError(f"organ findings file {shown}: unknown organ name(s) {unknown} for {name!r}; "
                             f"valid organs: {', '.join(ORGAN_NAMES)}")
        key = name if name.endswith(".nii.gz") else f"{name}.nii.gz"
        out[key] = {organ: text.strip() for organ, text in organs.items() if text.strip()}
    return out


def label_columns(columns: list[str], shown: str = "the labels CSV") -> list[str]:
    """The label names of a split, from its labels CSV header: CT-RATE's 18 ``LABELS`` in their order when the CSV
    has them all (other columns are then ignored), else every column but ``VolumeName`` in the CSV's order (an
    external evaluation set with labels of its own: zero-shot classification works from the label names)."""
    if all(c in columns for c in LABELS):
        return list(LABELS)
    own = [str(c) for c in columns if c != "VolumeName"]
    if not own:
        raise ValueError(f"{shown} has no label columns (CT-RATE's are: {', '.join(LABELS)})")
    log.info("%s: %d label columns of its own (not CT-RATE's 18): %s", shown, len(own), own)
    return own


def split_label_names(root: str | Path, split: str) -> list[str]:
    """``label_columns`` of a split's labels CSV (its header only)."""
    location = layout_locations(str(root), split)["labels"]
    header = pd.read_csv(_csv_source(location), nrows=0).columns
    return label_columns(list(header), storage.redact(location))


def _binary(value, column: str) -> int:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise ValueError(f"label {column!r} is {text!r}, not 0 or 1")
    return int(number)


def read_split(
    root: str | Path,
    split: str,
    organ_extents: str = "auto",
    organ_findings: str = "auto",
    label_maps: str = "none",
) -> tuple[list[VolumeRecord], dict[str, list[str]]]:
    """Join volumes on disk with their CSV rows.

    Returns the records and the problems found, as ``{reason: [VolumeName, ...]}``: volumes without a
    row, rows without a volume, duplicate names. Records are only built for names with a volume *and* a
    row in every CSV; the caller quarantines the rest.

    ``organ_extents`` (``ORGAN_EXTENT_SOURCES``): "csv" / "segmentation" require the organ-extents CSV / the
    ``segmentations`` folder; "auto" attaches both when present (the converter prefers the segmentation, per
    volume); "none" attaches neither. ``organ_findings``: "auto" (the split's JSON when present), "keywords"
    (none), or the location of a JSON file; volumes without an entry keep the keyword split (counted, logged).
    ``label_maps``: "auto" attaches each volume's organ label map (``find_labelmaps``), "none" none.
    """
    if organ_extents not in ORGAN_EXTENT_SOURCES:
        raise ValueError(f"organ_extents must be one of {list(ORGAN_EXTENT_SOURCES)}, got {organ_extents!r}")
    paths = layout_locations(str(root), split)
    shown = {k: storage.redact(v) for k, v in paths.items()}
    for key in ("reports", "metadata", "labels"):
        if not storage.is_file(paths[key]):
            raise FileNotFoundError(f"CT-RATE layout: missing {shown[key]}")
    problems: dict[str, list[str]] = {}
    frames = {}
    for key in ("reports", "metadata", "labels"):
        df = pd.read_csv(_csv_source(paths[key]), keep_default_na=False, encoding_errors="replace")
        if "VolumeName" not in df.columns:
            raise ValueError(f"{shown[key]} has no VolumeName column (columns: {list(df.columns)})")
        dup = df["VolumeName"][df["VolumeName"].duplicated()].tolist()
        if dup:
            problems.setdefault("duplicate_row", []).extend(f"{key}:{d}" for d in dup)
            df = df.drop_duplicates("VolumeName", keep="first")
        frames[key] = df.set_index("VolumeName")
    label_names = label_columns(list(frames["labels"].columns), shown["labels"])
    organs: dict[str, dict[str, list[float]]] = {}
    if organ_extents in ("auto", "csv"):
        if storage.is_file(paths["organs"]):
            odf = pd.read_csv(_csv_source(paths["organs"]))
            for row in odf.itertuples(index=False):
                organs.setdefault(row.VolumeName, {})[row.organ] = [float(row.z_start_mm), float(row.z_end_mm)]
        elif organ_extents == "csv":
            raise FileNotFoundError(f"data.organ_extents=csv: missing {shown['organs']}")
    if organ_extents == "segmentation" and not storage.is_dir(paths["segmentations"]):
        raise FileNotFoundError(f"data.organ_extents=segmentation: missing folder {shown['segmentations']}")
    findings_json: dict[str, dict[str, str]] | None = None
    findings_from = ""
    if organ_findings not in ("auto", "keywords", ""):
        findings_from = organ_findings
    elif organ_findings == "auto" and storage.is_file(paths["organ_findings"]):
        findings_from = paths["organ_findings"]
    if findings_from:
        findings_json = read_organ_findings(findings_from)

    volumes = find_volumes(root, split)
    names_with_rows = set(frames["reports"].index) & set(frames["metadata"].index) & set(frames["labels"].index)
    all_rows = set(frames["reports"].index) | set(frames["metadata"].index) | set(frames["labels"].index)
    for name in sorted(set(volumes) - names_with_rows):
        problems.setdefault("volume_without_row", []).append(name)
    for name in sorted(all_rows - set(volumes)):
        problems.setdefault("row_without_volume", []).append(name)

    usable = sorted(set(volumes) & names_with_rows)
    segs = find_segmentations(root, usable) if organ_extents in ("auto", "segmentation") else {}
    if label_maps not in ("auto", "none"):
        raise ValueError(f"label_maps must be 'auto' or 'none', got {label_maps!r}")
    maps = find_labelmaps(root, usable) if label_maps == "auto" else {}
    if organ_extents == "segmentation" and len(segs) < len(usable):
        missing = [n for n in usable if n not in segs]
        log.warning("%s/%s: %d of %d volumes have no segmentation under %s; they get no organ z-extents "
                    "(first: %s)", storage.redact(root), split, len(missing), len(usable), shown["segmentations"],
                    missing[:3])
    if findings_json is not None:
        missing = [n for n in usable if n not in findings_json]
        if missing:
            log.warning("%s/%s: %d of %d volumes have no entry in %s; their organ-wise findings come from the "
                        "keyword split of Findings_EN (first: %s)", storage.redact(root), split, len(missing),
                        len(usable), storage.redact(findings_from), missing[:3])
    records = []
    for name in usable:
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
        try:
            labels = [_binary(lab[c], c) for c in label_names]
        except ValueError as exc:
            problems.setdefault("bad_label_row", []).append(f"{name}: {exc}")
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
                labels=labels,
                organs=organs.get(name, {}),
                segmentation=segs.get(name, ("", ""))[0],
                segmentation_kind=segs.get(name, ("", ""))[1],
                organ_findings=None if findings_json is None else findings_json.get(name),
                labelmap=maps.get(name, ("", "", ""))[0],
                labelmap_kind=maps.get(name, ("", "", ""))[1],
                labelmap_from=maps.get(name, ("", "", ""))[2],
            )
        )
    for reason, names in problems.items():
        log.warning("%s/%s: %d x %s (first: %s)", storage.redact(root), split, len(names), reason, names[:3])
    return records, problems
