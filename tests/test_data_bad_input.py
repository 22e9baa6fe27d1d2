"""Bad input the other data tests do not cover: a truncated shard in the training stream, zero-slice volumes and
non-UTF-8 report text, each through the real path (Ray Data stream, or the Ray Data conversion job)."""

import csv
import json
import logging
import tarfile

import nibabel as nib
import numpy as np

from volvlp_ray.config import load_config
from volvlp_ray.data import synthetic
from volvlp_ray.data.ctrate import LABELS, csv_paths, read_split
from volvlp_ray.data.shards import encode_sample, write_group_shards
from volvlp_ray.data.storage import write_json

META = {"spacing": [8.0, 6.0, 6.0], "z_origin_mm": 0.0, "labels": [0] * len(LABELS)}


def _sample(key: str, depth: int = 8, report: str = "No pleural effusion.") -> list[tuple[str, bytes]]:
    return encode_sample(key, np.full((depth, 32, 32), -500, np.int16), report, META)


def test_truncated_shard_is_skipped_with_an_error_and_intact_shards_keep_every_sample(ray_session, tmp_path, caplog):
    from volvlp_ray.data.pipeline import build_dataset
    from volvlp_ray.models.text import build_tokenizer

    split = tmp_path / "shards" / "train"
    good: list[str] = []
    specs = []
    for g in range(3):
        keys = [f"train_{g}_a_{i}" for i in range(3)]
        good += keys
        samples = [_sample(k) for k in keys]
        if g == 0:  # bad samples inside an intact shard: zero slices, and a report that is not UTF-8
            samples.insert(1, _sample("train_90_a_1", depth=0))
            samples.append([(n, b"Pl\xe9ural effusion \xff." if n.endswith(".txt") else d)
                            for n, d in _sample("train_91_a_1")])
        specs += write_group_shards(split, g, samples, max_bytes=1 << 30)
    specs += write_group_shards(split, 3, [_sample(f"train_3_a_{i}") for i in range(4)], max_bytes=1 << 30)
    write_json(split / "manifest.json", {"shards": specs})
    victim = split / specs[-1]["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # cut a real shard in half

    tok_dir = tmp_path / "tokenizer"
    build_tokenizer(["No pleural effusion.", "Cardiomegaly."], 50).save_pretrained(str(tok_dir))
    cfg = load_config(None, [f"workspace={tmp_path}", f"data.shards_dir={tmp_path / 'shards'}"])
    with caplog.at_level(logging.ERROR, logger="volvlp_ray.data.shards"):
        rows = build_dataset(cfg, "train", str(tok_dir), training=True).take_all()
    keys = sorted(r["key"] for r in rows)
    assert keys == sorted(good), keys  # all 9 samples of the 3 intact shards, none of the bad ones
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and victim.name in errors[0] and f"{len(data) // 2} bytes" in errors[0], errors
    assert "4 samples lost" in errors[0]


def test_zero_slice_volume_is_quarantined_and_non_utf8_report_is_kept_readable(ray_session, tmp_path):
    from volvlp_ray.data.prepare import prepare_shards

    root = tmp_path / "src"
    synthetic.generate_dataset(root, 4, 1, seed=0, processes=1, progress=False)
    recs = {r.volume_name: r for r in read_split(root, "train")[0]}
    names = sorted(recs)
    img = nib.load(recs[names[0]].path)
    nib.save(nib.Nifti1Image(np.zeros((*img.shape[:2], 0), np.int16), img.affine), recs[names[0]].path)
    reports = csv_paths(root, "train")["reports"]
    rows = list(csv.reader(open(reports, encoding="utf-8")))
    for r in rows[1:]:
        if r[0] == names[1]:
            r[1] = "Mild pleural effusion @@LATIN1@@ on the right."
    text = "\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\n"
    reports.write_bytes(text.encode("utf-8").replace(b"@@LATIN1@@", b"caf\xe9 \xff"))  # not UTF-8 in one row

    cfg = load_config(None, ["data.shard_max_bytes=1000000"])
    summary = prepare_shards(root, tmp_path / "out", cfg, progress=False)
    assert summary["train"]["num_samples"] == 3
    q = json.loads((tmp_path / "out" / "train" / "quarantine.json").read_text())["quarantined"]
    assert [e["volume"] for e in q] == [names[0]] and recs[names[0]].path in q[0]["reason"], q
    split = tmp_path / "out" / "train"
    texts = {}
    for s in json.loads((split / "manifest.json").read_text())["shards"]:
        with tarfile.open(split / s["name"]) as t:
            for m in t.getmembers():
                if m.name.endswith(".report.txt"):
                    texts[m.name.split(".")[0] + ".nii.gz"] = t.extractfile(m).read().decode("utf-8")
    assert sorted(texts) == names[1:]
    assert texts[names[1]].startswith("Mild pleural effusion caf\ufffd \ufffd on the right.")
    for n in names[2:]:  # the other rows are untouched by the bad bytes in the file
        assert texts[n].startswith(recs[n].findings.strip())
