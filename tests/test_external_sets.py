"""External evaluation sets (SCALE-VLP's cross-domain protocol): a source with one split only, labels of its own,
and CT-RATE's grid as the default for a real source. The evaluation of such a set by a trained model is tested in
``test_evaluate.py`` (``test_external_set_is_evaluated_over_the_shared_labels``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volvlp_ray.config import CT_RATE_GRID, load_config
from volvlp_ray.data import synthetic
from volvlp_ray.data.ctrate import LABELS, available_splits, csv_paths, layout_problem, read_split

from jobutil import load_job

ROOT = Path(__file__).resolve().parents[1]


def _job_main():
    return load_job("prepare_data").main


def external_set(root: Path, n: int = 4, seed: int = 7, labels: dict[str, list[int]] | None = None) -> Path:
    """A validation-only source in the CT-RATE layout (the synthetic generator's ``valid`` split of another
    seed, the train split's files removed) whose labels CSV holds ``labels`` (default: 3 CT-RATE labels and one
    of its own, "Pneumothorax")."""
    synthetic.generate_dataset(root, 0, n, seed=seed, processes=1, progress=False)
    for p in csv_paths(root, "train").values():
        p.unlink(missing_ok=True)
    path = csv_paths(root, "valid")["labels"]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if labels is None:
        rng = np.random.default_rng(seed)
        keep = ["Cardiomegaly", "Emphysema", "Lung nodule"]
        labels = {c: [int(r[c]) for r in rows] for c in keep}
        labels["Pneumothorax"] = [int(v) for v in rng.integers(0, 2, len(rows))]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *labels])
        w.writerows([[r["VolumeName"], *(labels[c][i] for c in labels)] for i, r in enumerate(rows)])
    return root


def test_a_real_source_gets_ct_rate_grid_unless_set(tmp_path):
    toy = load_config(None, [])
    assert toy.data.spacing == [8.0, 6.0, 6.0] and toy.data.in_plane_size == 64  # synthetic: the embedded grid
    real = load_config(None, [f"data.source={tmp_path}"])
    assert real.data.spacing == CT_RATE_GRID["spacing"] == [1.5, 0.75, 0.75] and real.data.in_plane_size == 480
    assert load_config(None, [], real_source=True).data.in_plane_size == 480  # prepare_data --source DIR
    mixed = load_config(None, [f"data.source={tmp_path}", "data.in_plane_size=256"])
    assert mixed.data.spacing == [1.5, 0.75, 0.75] and mixed.data.in_plane_size == 256  # each key on its own
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  spacing: [3.0, 1.5, 1.5]\n")
    from_file = load_config(cfg_file, [], real_source=True)
    assert from_file.data.spacing == [3.0, 1.5, 1.5] and from_file.data.in_plane_size == 480
    whole = load_config(None, ["data={spacing: [2.0, 1.0, 1.0], in_plane_size: 128}"], real_source=True)
    assert whole.data.spacing == [2.0, 1.0, 1.0] and whole.data.in_plane_size == 128
    assert load_config(ROOT / "configs" / "tiny.yaml", [f"data.source={tmp_path}"]).data.in_plane_size == 480


def test_one_split_sources_and_their_own_labels(tmp_path):
    src = external_set(tmp_path / "ext")
    assert available_splits(str(src)) == ["valid"] and layout_problem(str(src)) is None
    records, problems = read_split(src, "valid")
    assert len(records) == 4 and not problems and all(len(r.labels) == 4 for r in records)
    from volvlp_ray.data.ctrate import split_label_names

    assert split_label_names(src, "valid") == ["Cardiomegaly", "Emphysema", "Lung nodule", "Pneumothorax"]
    # a begun but incomplete second split is an error naming it, not silently skipped
    (src / "radiology_text_reports" / "train_reports.csv").write_text("VolumeName,Findings_EN,Impressions_EN\n")
    problem = layout_problem(str(src))
    assert problem and "train split is incomplete" in problem and "train_metadata.csv" in problem
    # nothing at all
    (tmp_path / "empty").mkdir()
    assert "is not in the CT-RATE layout: missing" in layout_problem(str(tmp_path / "empty"))
    # a label that is neither 0 nor 1 (empty, "0.5", text) quarantines that volume, counted, the others are kept
    src2 = external_set(tmp_path / "ext2", labels={"Emphysema": [1, 0, 1, 0], "Pneumothorax": [0, 1, 0, 1]})
    path = csv_paths(src2, "valid")["labels"]
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ","
    lines[2] = lines[2].rsplit(",", 1)[0] + ",0.5"
    path.write_text("\n".join(lines) + "\n")
    records, problems = read_split(src2, "valid")
    assert len(records) == 2 and len(problems["bad_label_row"]) == 2
    assert "'Pneumothorax' is '0.5', not 0 or 1" in " ".join(problems["bad_label_row"])
    # all 18 CT-RATE columns present: exactly those, in CT-RATE's order, whatever else the CSV holds
    full = csv_paths(synthetic.generate_dataset(tmp_path / "full", 2, 1, seed=0, processes=1, progress=False),
                     "valid")["labels"]
    text = full.read_text().splitlines()
    full.write_text("\n".join([text[0] + ",Extra"] + [t + ",1" for t in text[1:]]) + "\n")
    from volvlp_ray.data.ctrate import split_label_names as names_of

    assert names_of(tmp_path / "full", "valid") == list(LABELS)


def test_prepare_job_on_a_validation_only_source(ray_session, tmp_path, capsys):
    """`prepare_data --source DIR` of a one-split source writes that split only (its manifest naming the set's own
    labels), says the grid it used, and a rerun finds it current; pre-training on it is a clear error."""
    src = external_set(tmp_path / "ext")
    out = tmp_path / "shards"
    grid = ["data.spacing=[8.0,6.0,6.0]", "data.in_plane_size=64", f"workspace={tmp_path / 'ws'}"]
    main = _job_main()
    assert main(["--source", str(src), "--out", str(out), *grid]) == 0
    first = capsys.readouterr().out
    assert "split(s) valid; grid 8 x 6 x 6 mm (z, y, x), 64x64 in-plane" in first
    assert "[prepare] valid: 4 samples in" in first and "[prepare] train" not in first
    assert not (out / "train").exists()
    manifest = json.loads((out / "valid" / "manifest.json").read_text())
    assert manifest["labels"] == ["Cardiomegaly", "Emphysema", "Lung nodule", "Pneumothorax"]
    assert manifest["num_samples"] == 4 and manifest["organ_extents_from"] == {"csv": 4}
    assert main(["--source", str(src), "--out", str(out), *grid]) == 0
    assert "nothing to do" in capsys.readouterr().out
    from volvlp_ray.config import ConfigError
    from volvlp_ray.train.trainer import ensure_shards

    with pytest.raises(ConfigError, match="holds no complete train split"):
        ensure_shards(load_config(None, [f"data.source={src}", f"workspace={tmp_path / 'ws'}"]))


def test_prepare_job_uses_ct_rate_grid_for_a_real_source(ray_session, tmp_path, capsys):
    """No grid given: CT-RATE's 1.5 x 0.75 x 0.75 mm and 480 x 480 (a hand-made 20 x 20 x 8 volume at 5 mm keeps
    the conversion small: 133 x 133 after resampling, padded to 480)."""
    src = external_set(tmp_path / "ext", n=1)
    path = next((src / "valid").rglob("*.nii.gz"))
    name = path.name
    hu = np.full((20, 20, 8), -1024 + 40, dtype=np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([5.0, 5.0, 5.0, 1.0])), path)
    meta = csv_paths(src, "valid")["metadata"]
    meta.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\n"
                    f'{name},1.0,-1024.0,"[5.0, 5.0]",5.0\n')
    out = tmp_path / "shards"
    assert _job_main()(["--source", str(src), "--out", str(out), f"workspace={tmp_path / 'ws'}"]) == 0
    assert "grid 1.5 x 0.75 x 0.75 mm (z, y, x), 480x480 in-plane" in capsys.readouterr().out
    manifest = json.loads((out / "valid" / "manifest.json").read_text())
    assert manifest["options"]["spacing"] == [1.5, 0.75, 0.75] and manifest["options"]["in_plane_size"] == 480
    from volvlp_ray.data.shards import decode_sample
    from volvlp_ray.data.reader import iter_samples

    (tar,) = (out / "valid").glob("*.tar")
    with open(tar, "rb") as f:
        (sample,) = [decode_sample(s) for s in iter_samples(f, str(tar))]
    # 8 slices of 5 mm span 35 mm centre to centre (40 mm edge to edge): 24-27 slices of 1.5 mm
    assert sample["volume"].shape[1:] == (480, 480) and 24 <= sample["volume"].shape[0] <= 27, sample["volume"].shape
