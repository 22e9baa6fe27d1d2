"""Organ z-extents from TotalSegmentator-style segmentations and organ-wise findings from a JSON file, through the
real Ray Data conversion job; bad input in both (unreadable or foreign segmentation, unknown organ names)."""

import json
import logging
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segutil import GROUP_LABELS, folder_segmentation, ground_truth, multilabel_segmentation, volume_extent_mm

from volvlp_ray.config import load_config
from volvlp_ray.data import synthetic
from volvlp_ray.data.ctrate import ORGAN_NAMES, csv_paths, read_organ_findings, read_split
from volvlp_ray.data.organs import split_findings_by_organ
from volvlp_ray.data.segmentation import TOTALSEG_V2, extents_from_segmentation, structure_groups

from jobutil import load_job

ROOT = Path(__file__).resolve().parents[1]


def _job_main():
    return load_job("prepare_data").main


def _metas(split_dir: Path) -> dict[str, dict]:
    out = {}
    for s in json.loads((split_dir / "manifest.json").read_text())["shards"]:
        with tarfile.open(split_dir / s["name"]) as t:
            for m in t.getmembers():
                if m.name.endswith(".meta.json"):
                    meta = json.loads(t.extractfile(m).read())
                    out[meta["volume_name"]] = meta
    return out


def _close(got: list[float], want: list[float], tol: float) -> bool:
    return abs(got[0] - want[0]) <= tol and abs(got[1] - want[1]) <= tol


def test_extents_from_segmentations_and_findings_from_json(ray_session, tmp_path, caplog):
    from volvlp_ray.data.prepare import prepare_shards

    root = tmp_path / "src"
    synthetic.generate_dataset(root, 4, 1, seed=0, processes=1, progress=False)
    recs = {r.volume_name: r for r in read_split(root, "train")[0]}
    a, b, c, d = sorted(recs)
    (v,) = [r.volume_name for r in read_split(root, "valid")[0]]
    gt = {**ground_truth(root, "train"), **ground_truth(root, "valid")}
    segs = root / "segmentations"
    segs.mkdir()
    # a: one multi-label file, stored I-L-P (z first, reversed) at 2.5 mm slices -- not the CT's grid or orientation
    nib.save(multilabel_segmentation(gt[a], volume_extent_mm(recs[a].path), z_sp=2.5, axcodes=("I", "L", "P")),
             segs / a)
    # b: TotalSegmentator's folder of binary masks, L-P-S at 3 mm: heart, lungs, trachea, an empty aorta, a spleen
    folder_segmentation(segs / b.removesuffix(".nii.gz"), gt[b], volume_extent_mm(recs[b].path),
                        ("heart", "lung", "airways"), z_sp=3.0, axcodes=("L", "P", "S"))
    # c: an unreadable segmentation; d: none; v (valid): a segmentation of "another scan" (5 m away in z)
    (segs / c).write_bytes(b"this is not a nifti file")
    valid_path = read_split(root, "valid")[0][0].path
    nib.save(multilabel_segmentation(gt[v], volume_extent_mm(valid_path), shift_mm=5000.0), segs / v)
    findings = {a: {"heart": "Heart text of a.", "general": "General of a."},
                b.removesuffix(".nii.gz"): {"lung": "Lung text of b.", "pleura": ""}}
    (root / "metadata" / "train_organ_findings.json").write_text(json.dumps(findings))

    cfg = load_config(None, ["data.shard_max_bytes=1000000", "data.prepare_parallelism=2"])
    with caplog.at_level(logging.WARNING):
        summary = prepare_shards(root, tmp_path / "out", cfg, progress=False)
    assert summary["train"]["num_samples"] == 4 and summary["valid"]["num_samples"] == 1
    metas = {**_metas(tmp_path / "out" / "train"), **_metas(tmp_path / "out" / "valid")}

    # a: every group within one segmentation slice (2.5 mm) of the truth; derived groups by their rule
    ma = metas[a]
    assert ma["organs_from"] == "segmentation"
    for group in GROUP_LABELS:
        assert _close(ma["organs"][group], gt[a][group], 2.5), (group, ma["organs"][group], gt[a][group])
    assert ma["organs"]["pleura"] == ma["organs"]["lung"]
    inner = [ma["organs"][g] for g in ("heart", "aorta", "esophagus", "airways")]
    lung = ma["organs"]["lung"]
    assert ma["organs"]["mediastinum"] == [max(min(e[0] for e in inner), lung[0]),
                                           min(max(e[1] for e in inner), lung[1])]
    assert "liver" not in ma["organs"]  # no organ group of its own
    # the same frame as the shard's slices: the spine spans the scan, i.e. slice 0's lower edge to the last's upper
    sz = ma["spacing"][0]
    scan = [ma["z_origin_mm"] - sz / 2, ma["z_origin_mm"] + (ma["depth"] - 0.5) * sz]
    assert _close(ma["organs"]["bones"], scan, sz), (ma["organs"]["bones"], scan)
    # b: the groups its masks hold, within one 3 mm slice; the empty aorta mask gives no aorta extent
    mb = metas[b]
    assert mb["organs_from"] == "segmentation"
    assert set(mb["organs"]) == {"heart", "lung", "airways", "pleura", "mediastinum"}
    for group in ("heart", "lung", "airways"):
        assert _close(mb["organs"][group], gt[b][group], 3.0), (group, mb["organs"][group], gt[b][group])
    # c and v: kept, extents from the CSV, a counted and logged warning; d: the CSV
    for name in (c, d, v):
        assert metas[name]["organs_from"] == "csv" and metas[name]["organs"] == gt[name], name
    q_train = json.loads((tmp_path / "out" / "train" / "quarantine.json").read_text())
    q_valid = json.loads((tmp_path / "out" / "valid" / "quarantine.json").read_text())
    assert q_train["quarantined"] == [] and q_valid["quarantined"] == []
    (wc,) = [w for w in q_train["warnings"] if "segmentation" in w]
    assert wc.startswith(f"{c}: unusable segmentation {segs / c}")
    assert wc.endswith("organ z-extents from the organ-extents CSV")
    (wv,) = [w for w in q_valid["warnings"] if "segmentation" in w]
    assert wv.startswith(f"{v}: unusable segmentation") and "no organ extent overlaps the volume's z-range" in wv
    logged = [r.getMessage() for r in caplog.records]
    assert wc in logged and wv in logged

    # organ-wise findings: the JSON for a and b (empty texts dropped), the keyword split for c and d
    assert metas[a]["organ_findings"] == findings[a] and metas[a]["organ_findings_from"] == "json"
    assert metas[b]["organ_findings"] == {"lung": "Lung text of b."} and metas[b]["organ_findings_from"] == "json"
    for name in (c, d):
        assert metas[name]["organ_findings"] == split_findings_by_organ(recs[name].findings)
        assert metas[name]["organ_findings_from"] == "keywords"
    assert any("2 of 4 volumes have no entry in" in m and "keyword split" in m for m in logged), logged

    man = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert man["organ_extents_from"] == {"csv": 2, "segmentation": 2}
    assert man["organ_findings_from"] == {"json": 2, "keywords": 2}
    assert man["num_warnings"] == len(q_train["warnings"]) >= 1
    assert man["options"]["organ_extents"] == "auto" and man["options"]["organ_findings"] == "auto"


def test_organ_source_options_and_bad_input_without_ray(tmp_path):
    root = tmp_path / "src"
    synthetic.generate_dataset(root, 2, 1, seed=0, processes=1, progress=False)
    (root / "segmentations").mkdir()
    names = sorted(r.volume_name for r in read_split(root, "train")[0])
    (root / "segmentations" / names[0]).write_bytes(b"x")
    recs = read_split(root, "train", organ_extents="none")[0]
    assert all(r.organs == {} and r.segmentation == "" for r in recs)
    recs = read_split(root, "train", organ_extents="segmentation")[0]
    assert [r.segmentation_kind for r in recs] == ["file", ""] and all(r.organs == {} for r in recs)
    recs = read_split(root, "train", organ_extents="csv")[0]
    assert all(r.organs and r.segmentation == "" for r in recs)
    with pytest.raises(ValueError, match="organ_extents must be one of"):
        read_split(root, "train", organ_extents="totalseg")

    # organ-wise findings JSON: unknown organ names name the valid ones; malformed files are clear errors
    bad = tmp_path / "findings.json"
    bad.write_text(json.dumps({names[0]: {"heart": "ok.", "kidney": "Left kidney cyst."}}))
    with pytest.raises(ValueError) as err:
        read_split(root, "train", organ_findings=str(bad))
    assert "unknown organ name(s) ['kidney']" in str(err.value) and names[0] in str(err.value)
    assert f"valid organs: {', '.join(ORGAN_NAMES)}" in str(err.value)
    for text, fragment in (("[1, 2]", "must hold an object"), ("{not json", "is not valid UTF-8 JSON"),
                           (json.dumps({names[0]: {"heart": 3}}), "must be an object {organ: text}")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=".*" + fragment.replace("{", r"\{").replace("}", r"\}")):
            read_organ_findings(str(bad))
    with pytest.raises(FileNotFoundError, match="organ findings file .*nowhere.json does not exist"):
        read_split(root, "train", organ_findings=str(tmp_path / "nowhere.json"))
    # "keywords" ignores the split's JSON even when it is there (and broken)
    (root / "metadata" / "train_organ_findings.json").write_text("{broken")
    assert all(r.organ_findings is None for r in read_split(root, "train", organ_findings="keywords")[0])

    # required sources that are missing
    csv_paths(root, "train")["organs"].unlink()
    with pytest.raises(FileNotFoundError, match="data.organ_extents=csv: missing .*train_organ_extents.csv"):
        read_split(root, "train", organ_extents="csv")
    (root / "segmentations" / names[0]).unlink()
    (root / "segmentations").rmdir()
    with pytest.raises(FileNotFoundError, match="data.organ_extents=segmentation: missing folder .*segmentations"):
        read_split(root, "train", organ_extents="segmentation", organ_findings="keywords")

    # segmentations that cannot be used
    seg = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 5), 0.5, np.float32), np.eye(4)), seg)
    with pytest.raises(ValueError, match="must hold integer labels"):
        extents_from_segmentation(str(seg), "file")
    nib.save(nib.Nifti1Image(np.full((4, 4, 5), 1, np.uint8), np.eye(4)), seg)  # 1 = spleen: no organ group
    with pytest.raises(ValueError, match="no structure of the organ groups"):
        extents_from_segmentation(str(seg), "file")
    # the TotalSegmentator v2 table: every group has structures, and ids are where v2 puts them
    assert {g for s in TOTALSEG_V2.values() for g in structure_groups(s)} >= {"lung", "heart", "aorta", "esophagus",
                                                                            "airways", "bones"}
    assert (TOTALSEG_V2[10], TOTALSEG_V2[16], TOTALSEG_V2[51], TOTALSEG_V2[52], TOTALSEG_V2[26], TOTALSEG_V2[50],
            TOTALSEG_V2[92], TOTALSEG_V2[115], TOTALSEG_V2[117]) == (
        "lung_upper_lobe_left", "trachea", "heart", "aorta", "vertebrae_S1", "vertebrae_C1", "rib_left_1",
        "rib_right_12", "costal_cartilages")


@pytest.mark.parametrize("case, fragment", [
    ("unknown_organ", "input error: organ findings file"),
    ("no_segmentations", "input error: data.organ_extents=segmentation: missing folder"),
    ("bad_mode", "config error: data.organ_extents='totalseg' is not one of"),
])
def test_prepare_job_bad_organ_input_is_one_line_and_exit_2(ray_session, tmp_path, capsys, case, fragment):
    root = tmp_path / "src"
    synthetic.generate_dataset(root, 2, 1, seed=0, processes=1, progress=False)
    extra = {"bad_mode": ["data.organ_extents=totalseg"], "no_segmentations": ["data.organ_extents=segmentation"],
             "unknown_organ": []}[case]
    if case == "unknown_organ":
        name = sorted(r.volume_name for r in read_split(root, "train")[0])[0]
        (root / "metadata" / "train_organ_findings.json").write_text(json.dumps({name: {"spleen": "Normal."}}))
    rc = _job_main()(["--source", str(root), "--out", str(tmp_path / "out"), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and fragment in err[0], err
    if case == "unknown_organ":
        assert "unknown organ name(s) ['spleen']" in err[0] and "valid organs: airways, heart," in err[0]
