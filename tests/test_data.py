"""Synthetic data, preprocessing, shards and the Ray Data conversion job."""

import csv
import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volvlp_ray.config import load_config
from volvlp_ray.data import synthetic
from volvlp_ray.data.ctrate import LABELS, csv_paths, read_split, volume_relpath
from volvlp_ray.data.organs import chunk_text, split_findings_by_organ
from volvlp_ray.data.pipeline import collate
from volvlp_ray.data.shards import DecodeError, decode_sample, encode_sample
from volvlp_ray.data.transforms import preprocess_volume


def test_synthetic_is_deterministic_by_seed():
    a, b, c = synthetic.make_case(0, "train", 3), synthetic.make_case(0, "train", 3), synthetic.make_case(1, "train", 3)
    assert np.array_equal(a["stored"], b["stored"]) and a["findings"] == b["findings"]
    assert not np.array_equal(a["stored"], c["stored"]) or a["findings"] != c["findings"]


@pytest.mark.parametrize("label", synthetic.RENDERED_LABELS)
def test_each_rendered_abnormality_is_visible(label):
    n = 64
    xs = ((np.arange(n) - (n - 1) / 2) * 6.0).astype(np.float32)
    zs = (np.arange(48) * 6.0 + 3).astype(np.float32)
    grid = (xs[:, None, None], xs[None, :, None], zs[None, None, :])
    none = {l: 0 for l in LABELS}
    base = synthetic._render(np.random.default_rng(0), none, grid, 288.0)
    sick = synthetic._render(np.random.default_rng(0), {**none, label: 1}, grid, 288.0)
    changed = (np.abs(sick - base) > 80).sum()
    assert changed >= 20, f"{label}: only {changed} voxels differ by > 80 HU"
    assert len(synthetic.RENDERED_LABELS) >= 8


def test_reports_describe_labels_with_negations_and_varied_wording():
    cases = [synthetic.make_case(0, "train", i) for i in range(40)]
    sentences = set()
    negations = 0
    for c in cases:
        text = c["findings"].lower()
        for label, present in c["labels"].items():
            if present:
                assert any(s.lower() in text for s in synthetic._POSITIVE[label]), (label, text)
        negations += text.count("no ") + text.count("not present") + text.count("not observed")
        sentences.update(s.strip() for s in c["findings"].split("."))
    assert negations > 40 and len(sentences) > 60
    depths = {c["stored"].shape[2] for c in cases}
    z_spacings = {c["z_spacing"] for c in cases}
    assert len(depths) > 5 and len(z_spacings) > 1


def test_layout_csvs(tmp_path):
    synthetic.generate_dataset(tmp_path, 6, 3, seed=0, processes=1, progress=False)
    for split, n in (("train", 6), ("valid", 3)):
        paths = csv_paths(tmp_path, split)
        with open(paths["labels"]) as f:
            header = next(csv.reader(f))
        assert header == ["VolumeName", *LABELS]
        recs, problems = read_split(tmp_path, split)
        assert len(recs) == n and not problems
        assert all(Path(r.path).is_file() for r in recs) and all(r.organs for r in recs)
        assert recs[0].xy_spacing[0] > 0 and "[" in open(paths["metadata"]).read()


def test_preprocess_is_ras_with_variable_depth(tmp_path):
    synthetic.generate_dataset(tmp_path, 2, 1, seed=0, processes=1, progress=False)
    rec = read_split(tmp_path, "train")[0][0]
    case = synthetic.make_case(0, "train", 0)
    res = preprocess_volume(rec.path, rec.slope, rec.intercept, (8.0, 6.0, 6.0), 64,
                            expected_xy_spacing=rec.xy_spacing, expected_z_spacing=rec.z_spacing)
    v = res.volume
    assert v.dtype == np.int16 and v.shape[1:] == (64, 64)
    extent = case["stored"].shape[2] * case["z_spacing"]
    assert abs(v.shape[0] - extent / 8.0) <= 1.5  # depth follows the scan length: no fixed-depth crop
    assert not res.warnings
    mid = v[v.shape[0] // 2].astype(float)
    bone_rows = np.nonzero((mid > 300).any(axis=1))[0]
    assert bone_rows.mean() < 32, "spine must be posterior: low y index (y increases toward anterior)"
    at_heart = v[int(0.38 * v.shape[0])].astype(float)  # heart centre: 38 % of the scan length (synthetic.ORGAN_EXTENT)
    heart = (at_heart > 90) & (at_heart < 200)
    assert np.nonzero(heart)[1].mean() < 32, "heart is left of midline: low x index (x increases toward right)"
    assert np.nonzero(heart)[0].mean() > 32, "heart is anterior: high y index"
    # superior slices hold the trachea (air inside the body at the top), inferior ones the liver
    assert v[-1].min() <= -990 and (v[0] > 40).mean() > (v[-1] > 40).mean()


def test_spacing_disagreement_is_reported(tmp_path):
    synthetic.generate_dataset(tmp_path, 1, 1, seed=0, processes=1, progress=False)
    rec = read_split(tmp_path, "train")[0][0]
    res = preprocess_volume(rec.path, rec.slope, rec.intercept, (8.0, 6.0, 6.0), 64,
                            expected_xy_spacing=(0.75, 0.75), expected_z_spacing=rec.z_spacing)
    assert res.warnings and "disagreement" in res.warnings[0]


def test_sample_encoding_round_trip_and_bad_members():
    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    members = dict(encode_sample("train_1_a_1", vol, "Report.", {"labels": [1, 0]}))
    row = {"__key__": "train_1_a_1", **{k.split(".", 1)[1]: v for k, v in members.items()}}
    s = decode_sample(row)
    assert np.array_equal(s["volume"], vol) and s["report"] == "Report." and s["meta"]["labels"] == [1, 0]
    bad = io.BytesIO()
    np.save(bad, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for change, match in [({"volume.npy": bad.getvalue()}, "undecodable"), ({"volume.npy": b"junk"}, "undecodable"),
                          ({"report.txt": b"\xff\xfe\xfa"}, "undecodable"), ({"report.txt": b"  "}, "empty"),
                          ({"meta.json": None}, "missing")]:
        with pytest.raises(DecodeError, match=match):
            decode_sample({**row, **change})
    with pytest.raises(ValueError):
        encode_sample("a.b", vol, "r", {})


def test_organ_text():
    parts = split_findings_by_organ("The heart is enlarged. No pleural effusion. A lung nodule is seen. Other.")
    assert parts["heart"] == "The heart is enlarged." and "nodule" in parts["lung"] and parts["general"] == "Other."
    ext = {"heart": [100, 200], "lung": [150, 300], "pleura": [150, 300]}
    assert chunk_text(parts, ext, (0, 120)) == "The heart is enlarged. Other."
    assert "nodule" in chunk_text(parts, ext, (250, 280)) and "heart" not in chunk_text(parts, ext, (250, 280))
    # SigVLP's organ text: the covered organs' findings plus the general sentence; the impression only on request
    assert chunk_text(parts, ext, (0, 120), impression="Cardiomegaly.") == \
        "The heart is enlarged. Other. Cardiomegaly."
    # a chunk that covers no organ with findings: its general sentence, else the documented text, never the report
    assert chunk_text(parts, ext, (400, 450)) == "Other."
    no_general = {k: v for k, v in parts.items() if k != "general"}
    assert chunk_text(no_general, ext, (400, 450)) == "No findings are reported for this region."
    assert chunk_text(no_general, ext, (400, 450), empty_text="Nothing here.", impression="Cardiomegaly.") == \
        "Nothing here. Cardiomegaly."


def test_organ_text_follows_the_config():
    """``OrganText`` (what the training stream uses): the impression is off by default in organ mode and on with
    ``data.organ_impression``; ``data.empty_chunk_text`` for a chunk without findings."""
    from volvlp_ray.config import load_config
    from volvlp_ray.data.pipeline import OrganText

    meta = {"organ_findings": {"heart": "The heart is enlarged.", "general": ""}, "organs": {"heart": [100, 200]},
            "impressions": "Cardiomegaly."}
    default = OrganText(load_config(None, ["data.text_mode=organ"]))
    assert default(meta, (90, 130)) == "The heart is enlarged."
    assert default(meta, (300, 330)) == "No findings are reported for this region."
    opted = OrganText(load_config(None, ["data.text_mode=organ", "data.organ_impression=true",
                                         "data.empty_chunk_text=Normal region."]))
    assert opted(meta, (90, 130)) == "The heart is enlarged. Cardiomegaly."
    assert opted(meta, (300, 330)) == "Normal region. Cardiomegaly."


def test_collate_pads_depth_with_air_and_reports_depths():
    batch = {
        "volume": np.array([np.full((5, 8, 8), 1000, np.int16), np.full((9, 8, 8), -1000, np.int16)], dtype=object),
        "input_ids": np.zeros((2, 6), np.int32), "attention_mask": np.ones((2, 6), np.int8),
        "labels": np.zeros((2, 18), np.float32), "study_id": np.array([1, 2]), "z_center_mm": np.array([0.0, 1.0]),
    }
    b = collate(batch, patch_z=4, hu_window=(-1000, 1000))
    assert b["volume"].shape == (2, 1, 12, 8, 8) and b["depths"].tolist() == [5, 9]
    assert b["volume"][0, 0, :5].eq(1).all() and b["volume"][0, 0, 5:].eq(-1).all()


# ---------------------------------------------------------------------------------------------- Ray Data


def _corrupt_source(root: Path) -> dict[str, str]:
    """Add bad inputs beside good ones; returns {volume: expected reason fragment}."""
    synthetic.generate_dataset(root, 10, 2, seed=0, processes=1, progress=False)
    paths = csv_paths(root, "train")
    recs = {r.volume_name: r for r in read_split(root, "train")[0]}
    names = sorted(recs)
    # NaN voxels
    img = nib.load(recs[names[0]].path)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), recs[names[0]].path)
    # unreadable NIfTI
    Path(recs[names[1]].path).write_bytes(b"this is not a nifti file")
    # empty report
    rows = list(csv.reader(open(paths["reports"])))
    for r in rows[1:]:
        if r[0] == names[2]:
            r[1], r[2] = "", ""
    # duplicate row and a row without a volume
    rows.append([names[3], "dup", "dup"])
    rows.append(["train_99_a_1.nii.gz", "orphan row", ""])
    with open(paths["reports"], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    # volume without a row
    extra = root / volume_relpath("train_98_a_1.nii.gz")
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_bytes(Path(recs[names[4]].path).read_bytes())
    return {names[0]: "non-finite", names[1]: "Error", names[2]: "empty report",
            "train_99_a_1.nii.gz": "row_without_volume", "train_98_a_1.nii.gz": "volume_without_row"}


def _keys_in_shards(split_dir: Path) -> list[str]:
    keys = []
    manifest = json.loads((split_dir / "manifest.json").read_text())
    for s in manifest["shards"]:
        with tarfile.open(split_dir / s["name"]) as t:
            keys += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".volume.npy")]
    return keys


def test_prepare_quarantines_bad_input_and_keeps_good(tmp_path, ray_session):
    from volvlp_ray.data.prepare import prepare_shards

    expected = _corrupt_source(tmp_path / "src")
    cfg = load_config(None, ["data.shard_max_bytes=200000"])
    summary = prepare_shards(tmp_path / "src", tmp_path / "out", cfg, progress=False)
    q = json.loads((tmp_path / "out" / "train" / "quarantine.json").read_text())["quarantined"]
    reasons = {e["volume"]: e["reason"] for e in q}
    for name, frag in expected.items():
        assert name in reasons and frag in reasons[name], (name, reasons.get(name))
    assert any("duplicate_row" in e["reason"] for e in q)
    keys = _keys_in_shards(tmp_path / "out" / "train")
    assert len(keys) == len(set(keys)) == summary["train"]["num_samples"] == 10 - 3
    assert summary["train"]["num_shards"] > 1


def test_prepare_resumes_after_a_kill_with_every_volume_once(tmp_path, ray_session):
    from volvlp_ray.data.prepare import prepare_shards

    synthetic.generate_dataset(tmp_path / "src", 12, 2, seed=0, processes=1, progress=False)
    cfg = load_config(None, ["data.shard_max_bytes=150000"])
    prepare_shards(tmp_path / "src", tmp_path / "out", cfg, progress=False)
    split = tmp_path / "out" / "train"
    before = sorted(_keys_in_shards(split))
    # simulate a kill mid-way: one group's marker never written, its shard half-written, manifest missing
    (split / "_groups" / "group-00001.json").unlink()
    victim = sorted(split.glob("shard-00001-*.tar"))[0]
    victim.rename(split / ".shard-00001-00.deadbeef.tmp")
    (split / "manifest.json").unlink()
    prepare_shards(tmp_path / "src", tmp_path / "out", cfg, progress=False)
    after = sorted(_keys_in_shards(split))
    assert after == before and len(after) == len(set(after)) == 12
    assert not list(split.glob("*.tmp"))


def test_read_path_modules_do_not_import_monai():
    """What each Ray Data read task and the job's driver import (the row pipeline, the prepare entry points, the
    trainer, evaluation) leaves MONAI out: ``import monai`` loads all of it (~10 s of CPU per process); only
    ``preprocess_volume`` (the conversion job's tasks, the pyfunc model's NIfTI input) imports it, when called."""
    import subprocess
    import sys

    mods = ["volvlp_ray.data.pipeline", "volvlp_ray.data.prepare", "volvlp_ray.train.trainer", "volvlp_ray.eval.run",
            "volvlp_ray.eval.validation", "volvlp_ray.data.transforms"]
    code = (f"import sys\nfor m in {mods!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]", p.stdout[-2000:]
