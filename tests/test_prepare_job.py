"""jobs/prepare_data.py as a real subprocess: shards + manifest from a synthetic source, a no-op rerun, bad input."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "prepare_data.py"


def run_job(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(JOB), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_prepare_job_writes_verified_shards_and_a_rerun_is_a_no_op(tmp_path):
    args = ["--source", "synthetic", "--out", str(tmp_path / "shards"), f"workspace={tmp_path / 'ws'}",
            "data.num_volumes=6", "data.num_val_volumes=2", "data.shard_max_bytes=300000"]
    first = run_job(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[prepare] train: 6 samples in" in first.stdout and "[prepare] valid: 2 samples in" in first.stdout
    assert (tmp_path / "ws" / "data" / "synthetic" / "COMPLETE.json").is_file()
    stamps = {}
    for split, n in (("train", 6), ("valid", 2)):
        split_dir = tmp_path / "shards" / split
        manifest = json.loads((split_dir / "manifest.json").read_text())
        assert manifest["num_samples"] == n and manifest["num_quarantined"] == 0
        listed = {s["name"] for s in manifest["shards"]}
        assert listed == {p.name for p in split_dir.glob("*.tar")}, "every shard on disk is in the manifest"
        keys = []
        for s in manifest["shards"]:
            path = split_dir / s["name"]
            assert s["bytes"] == path.stat().st_size > 0
            assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            with tarfile.open(path) as t:
                names = t.getnames()
            vols = [m.split(".")[0] for m in names if m.endswith(".volume.npy")]
            # volume, report, metadata and the organ label map (the synthetic generator writes one per volume)
            assert s["samples"] == len(vols) and len(names) == 4 * len(vols)
            assert len([m for m in names if m.endswith(".labelmap.npy")]) == len(vols)
            keys += vols
        assert len(keys) == len(set(keys)) == n == sum(s["samples"] for s in manifest["shards"])
        assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"])
        stamps[split] = (split_dir / "manifest.json").stat().st_mtime_ns
    assert len(json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())["shards"]) > 1

    second = run_job(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to do" in second.stdout and "train 6 samples, valid 2 samples" in second.stdout
    assert "converting" not in second.stdout
    for split, stamp in stamps.items():
        assert (tmp_path / "shards" / split / "manifest.json").stat().st_mtime_ns == stamp


def _half_layout(root: Path) -> Path:
    (root / "radiology_text_reports").mkdir(parents=True)
    (root / "radiology_text_reports" / "train_reports.csv").write_text("VolumeName,Findings_EN,Impressions_EN\n")
    return root


@pytest.mark.parametrize("case, fragment", [
    ("missing", "input error: source folder"),
    ("not_layout", "is not in the CT-RATE layout: missing"),
    ("unknown_key", "config error: unknown config key 'data.no_such_key'"),
])
def test_prepare_job_bad_input_is_one_line_and_exit_2(tmp_path, case, fragment):
    source = {"missing": tmp_path / "nowhere", "not_layout": _half_layout(tmp_path / "src"),
              "unknown_key": tmp_path}[case]
    extra = ["data.no_such_key=1"] if case == "unknown_key" else []
    res = run_job("--source", str(source), "--out", str(tmp_path / "out"), *extra, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and fragment in lines[0], res.stderr
    assert not (tmp_path / "out").exists()
