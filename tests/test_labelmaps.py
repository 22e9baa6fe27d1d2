"""Organ label maps in the shards (``volvlp_ray/data/labelmaps.py``, ``prepare``): aligned with the CT after
reorientation and resampling, from the generator's files or a TotalSegmentator folder, bad maps counted and
logged with the CT kept, and skipped by every reader but the segmentation job's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volvlp_ray.config import load_config
from volvlp_ray.data import synthetic
from volvlp_ray.data.labelmaps import SEG_CLASSES, labelmap_on_grid, read_labelmap, structure_class
from volvlp_ray.data.reader import iter_samples
from volvlp_ray.data.segmentation import TOTALSEG_V2
from volvlp_ray.data.shards import decode_sample, npy_view
from volvlp_ray.data.transforms import preprocess_volume

HEART = SEG_CLASSES.index("heart")


def _samples(split_dir: Path) -> dict[str, dict]:
    out = {}
    for tar in sorted(split_dir.glob("*.tar")):
        with open(tar, "rb") as f:
            for raw in iter_samples(f, str(tar)):
                s = decode_sample(raw)
                s["labelmap"] = npy_view(raw["labelmap.npy"]) if "labelmap.npy" in raw else None
                out[s["key"]] = s
    return out


def _box_images(tmp_path: Path):
    """A CT stored LPS-like (x and y flipped, 4 mm in-plane, 5 mm slices) with a bright box at a known RAS place,
    and a label map of the same box stored RAS on another grid (2.5 x 3 x 3.5 mm, another origin and extent)."""
    lo, hi = np.array([-20.0, 10.0, 40.0]), np.array([24.0, 42.0, 80.0])  # RAS mm box (x, y, z)
    n, nz, sp, zsp = 48, 30, 4.0, 5.0
    ras_ct = np.array([[sp, 0, 0, -96.0], [0, sp, 0, -96.0], [0, 0, zsp, 2.5], [0, 0, 0, 1]])
    ii, jj, kk = np.meshgrid(np.arange(n), np.arange(n), np.arange(nz), indexing="ij")
    world = [ras_ct[a, a] * idx + ras_ct[a, 3] for a, idx in enumerate((ii, jj, kk))]
    inside = np.all([(w >= l) & (w <= h) for w, l, h in zip(world, lo, hi)], axis=0)
    hu = np.where(inside, 500, -1000).astype(np.int16) + 1024
    ct = nib.Nifti1Image(hu[::-1, ::-1, :].copy(), ras_ct @ _flip_affine(n))
    ct_path = tmp_path / "ct.nii.gz"
    nib.save(ct, ct_path)
    lab_aff = np.array([[2.5, 0, 0, -70.0], [0, 3.0, 0, -60.0], [0, 0, 3.5, 20.0], [0, 0, 0, 1]])
    shape = (60, 50, 25)
    ii, jj, kk = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    world = [lab_aff[a, a] * idx + lab_aff[a, 3] for a, idx in enumerate((ii, jj, kk))]
    inside = np.all([(w >= l) & (w <= h) for w, l, h in zip(world, lo, hi)], axis=0)
    lab = np.where(inside, 51, 0).astype(np.uint8)  # TotalSegmentator's heart
    lab_path = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(lab, lab_aff), lab_path)
    return ct_path, lab_path


def _flip_affine(n: int) -> np.ndarray:
    """Stored index -> RAS index of an array stored with its x and y indices reversed."""
    a = np.diag([-1.0, -1.0, 1.0, 1.0])
    a[:2, 3] = n - 1
    return a


def test_label_map_lands_on_the_ct_box_after_reorientation_and_resampling(tmp_path):
    ct_path, lab_path = _box_images(tmp_path)
    assert nib.aff2axcodes(nib.load(ct_path).affine) == ("L", "P", "S")  # stored LPS-like, as CT-RATE's are
    res = preprocess_volume(str(ct_path), 1.0, -1024.0, (6.0, 3.0, 3.0), 64)
    classes, affine = read_labelmap(str(lab_path), "file", TOTALSEG_V2)
    lm = labelmap_on_grid(classes, affine, res.affine, res.volume.shape[::-1])
    assert lm.shape == res.volume.shape and set(np.unique(lm)) == {0, HEART}
    bright = res.volume > 0  # the box, resampled (bilinear) onto the same grid
    label = lm == HEART
    dice = 2 * (bright & label).sum() / (bright.sum() + label.sum())
    assert dice > 0.85, dice
    centre = [np.mean(np.nonzero(m)[a]) for m in (bright, label) for a in range(3)]
    assert np.allclose(centre[:3], centre[3:], atol=0.6), centre  # same place to within a voxel


def test_structure_classes():
    assert structure_class("lung_middle_lobe_right") == SEG_CLASSES.index("lung")
    assert structure_class("vertebrae_T6") == structure_class("rib_left_3") == SEG_CLASSES.index("bones")
    assert structure_class("atrial_appendage_left") == HEART and structure_class("liver") == SEG_CLASSES.index("liver")
    assert structure_class("spleen") == 0 and structure_class("kidney_left") == 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_session):
    """3 + 3 synthetic volumes prepared: valid_1_a_1 keeps the generator's map, valid_1_a_2's is replaced by one of
    another scan (far away), valid_1_b_1's by an unreadable file; train_1_a_1's generator map is removed and a
    TotalSegmentator folder of masks (heart only) takes its place."""
    from volvlp_ray.data.prepare import prepare_shards

    tmp = tmp_path_factory.mktemp("labelmaps")
    root = synthetic.generate_dataset(tmp / "src", 3, 3, seed=0, processes=1, progress=False)
    far = nib.load(root / "labelmaps" / "valid_1_a_2.nii.gz")
    far_ids, moved = np.asanyarray(far.dataobj), far.affine.copy()
    moved[2, 3] += 5000.0
    nib.save(nib.Nifti1Image(far_ids, moved), root / "labelmaps" / "valid_1_a_2.nii.gz")
    (root / "labelmaps" / "valid_1_b_1.nii.gz").write_bytes(b"not a nifti")
    gen = nib.load(root / "labelmaps" / "train_1_a_1.nii.gz")
    gen_ids, gen_affine = np.asanyarray(gen.dataobj), gen.affine  # read before the file goes
    (root / "labelmaps" / "train_1_a_1.nii.gz").unlink()
    folder = root / "segmentations" / "train_1_a_1"
    folder.mkdir(parents=True)
    heart = (gen_ids == 51).astype(np.uint8)
    nib.save(nib.Nifti1Image(heart, gen_affine), folder / "heart.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(heart), gen_affine), folder / "spleen.nii.gz")  # unused structure
    cfg = load_config(None, [f"workspace={tmp / 'ws'}"])
    prepare_shards(str(root), str(tmp / "shards"), cfg, progress=False)
    return tmp / "shards", root


def test_synthetic_label_maps_cover_the_tissues_they_name(prepared):
    """On the prepared grid (the CT reoriented from LPS-like storage and resampled; the map stored RAS on the
    source grid), each class's voxels hold its tissue's HU: alignment to within the partial-volume edge."""
    shards, _ = prepared
    s = _samples(shards / "valid")["valid_1_a_1"]
    lm, hu = s["labelmap"], s["volume"]
    assert lm.shape == hu.shape and lm.dtype == np.uint8 and s["meta"]["labelmap_from"] == "labelmaps"
    assert s["meta"]["labelmap_classes"] == list(SEG_CLASSES)
    median = {SEG_CLASSES[c]: float(np.median(hu[lm == c])) for c in np.unique(lm)}
    assert set(median) == {"background", "lung", "heart", "aorta", "airways", "bones", "liver"}
    assert median["lung"] < -600 and median["airways"] < -600
    assert 90 < median["heart"] < 170 and 90 < median["aorta"] < 170 and 30 < median["liver"] < 90
    assert median["bones"] > 250
    # a map flipped front to back (a reader ignoring the y axis's direction) would not: the spine is posterior
    flipped = lm[:, ::-1, :]
    assert float(np.median(hu[flipped == SEG_CLASSES.index("bones")])) < 100


def test_bad_label_maps_are_counted_and_the_ct_kept(prepared):
    shards, _ = prepared
    valid = _samples(shards / "valid")
    assert set(valid) == {"valid_1_a_1", "valid_1_a_2", "valid_1_b_1"}  # every CT kept
    for key in ("valid_1_a_2", "valid_1_b_1"):
        assert valid[key]["labelmap"] is None and valid[key]["meta"]["labelmap_from"] == "none"
    manifest = json.loads((shards / "valid" / "manifest.json").read_text())
    assert manifest["labelmaps_from"] == {"labelmaps": 1, "none": 2} and manifest["num_quarantined"] == 0
    warnings = json.loads((shards / "valid" / "quarantine.json").read_text())["warnings"]
    bad = [w for w in warnings if "unusable label map" in w]
    assert len(bad) == 2 and manifest["num_warnings"] >= 2
    assert any("valid_1_a_2" in w and "another scan" in w for w in bad)
    assert any("valid_1_b_1" in w for w in bad)


def test_a_totalsegmentator_folder_gives_the_label_map(prepared):
    shards, root = prepared
    train = _samples(shards / "train")
    s = train["train_1_a_1"]
    assert s["meta"]["labelmap_from"] == "segmentation" and set(np.unique(s["labelmap"])) == {0, HEART}
    assert 90 < float(np.median(s["volume"][s["labelmap"] == HEART])) < 170
    assert json.loads((shards / "train" / "manifest.json").read_text())["labelmaps_from"] == \
        {"labelmaps": 2, "segmentation": 1}


def test_readers_other_than_segmentation_skip_the_label_maps(prepared, tmp_path):
    """The training stream's rows and the held-out reader's carry no label-map bytes (the member is skipped with
    a seek), and ``data.label_maps=none`` writes none."""
    shards, root = prepared
    from volvlp_ray.data.pipeline import build_dataset
    from volvlp_ray.eval.validation import read_subset
    from volvlp_ray.models.text import build_tokenizer

    tok_dir = tmp_path / "tok"
    build_tokenizer(["a b c d"] * 4, 100).save_pretrained(str(tok_dir))
    cfg = load_config(None, [f"data.shards_dir={shards}", "data.shuffle_buffer=0"])
    rows = read_subset(cfg, "valid", str(tok_dir), 3)
    assert len(rows) == 3 and not any("labelmap" in k for r in rows for k in r)
    batch = next(iter(build_dataset(cfg, "valid", str(tok_dir), training=False).iter_batches(batch_size=3)))
    assert not any("labelmap" in k for k in batch)
    from volvlp_ray.data.prepare import prepare_shards

    shutil.rmtree(root / "segmentations")
    prepare_shards(str(root), str(tmp_path / "none"), load_config(None, ["data.label_maps=none"]), progress=False)
    assert all(s["labelmap"] is None for s in _samples(tmp_path / "none" / "valid").values())
