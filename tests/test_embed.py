"""jobs/embed.py: one scan (NIfTI file, DICOM series folder) -> embedding + zero-shot findings; a dataset -> Parquet.

One tiny pre-training run (configs/tiny.yaml, in this process on the session's Ray) serves every test: its export
folder, its Ray Train checkpoint, ``latest`` in its workspace, and its MLflow model (``models:/<id>``,
``runs:/<run_id>/model``). The scans are a synthetic CT-RATE-like volume (``synthetic.make_case``) written as a
NIfTI file in HU and as a DICOM series with pydicom (uint16 pixels, RescaleIntercept -1024 and a RescaleSlope of
1 or 0.5 slice by slice, files named in shuffled slice order). The job runs in-process through ``main(argv)``;
one subprocess checks the exit code and the one-line error of the real script. The batch job runs in-process on
the session's Ray, over the workspace's shards and over its CT-RATE-layout source.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
pytestmark = pytest.mark.timeout(1800)  # the module fixture is a real training job; the batch job runs Ray Data

TEXT = "The heart is enlarged. Cardiomegaly is present. No pleural effusion."


def _embed_main():
    import embed  # jobs/embed.py

    return embed.main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``jobs/embed.py ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = _embed_main()(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------------------
# fixtures: one trained run, the scans


@pytest.fixture(scope="module")
def workspace(trained_tiny_workspace) -> Path:
    return trained_tiny_workspace[0]  # the session's trained tiny run (conftest), run name "tiny"


@pytest.fixture(scope="module")
def checkpoint(workspace) -> Path:
    (ckpt,) = [p for p in (workspace / "ray_results" / "tiny").glob("checkpoint_*") if (p / "export").is_dir()]
    return ckpt


@pytest.fixture(scope="module")
def export(checkpoint) -> Path:
    return checkpoint / "export"


@pytest.fixture(scope="module")
def model(export):
    from volvlp_ray.models import VLP

    return VLP.from_pretrained(export)


def write_dicom_series(hu: np.ndarray, affine: np.ndarray, folder: Path, series_uid: str | None = None) -> Path:
    """HU (X, Y, Z) ints with a RAS affine -> one CT DICOM file per slice (the geometry in LPS, as DICOM has it).
    Stored uint16 with RescaleIntercept -1024 and RescaleSlope 1 (even slices) or 0.5 (odd ones); files are named
    in a shuffled slice order, so a reader must sort by ImagePositionPatient."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    zooms = np.sqrt((lps[:3, :3] ** 2).sum(0))
    row_dir, col_dir = lps[:3, 0] / zooms[0], lps[:3, 1] / zooms[1]
    series_uid = series_uid or generate_uid()
    for n, k in enumerate(np.random.default_rng(0).permutation(hu.shape[2])):
        slope, intercept = (1.0, -1024.0) if k % 2 == 0 else (0.5, -1024.0)
        stored = np.rint((hu[:, :, k].T.astype(np.float64) - intercept) / slope)
        assert stored.min() >= 0 and stored.max() < 65536
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, "1.2.826.0.1.3680043.2.1125.1"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [f"{zooms[1]:.6f}", f"{zooms[0]:.6f}"]
        ds.SliceThickness = f"{zooms[2]:.6f}"
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.InstanceNumber = int(k) + 1
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """The same synthetic volume as a NIfTI file in HU, as stored values (HU + 1024) for --intercept, and as a
    DICOM series; the series mirrored left-right (header unchanged: a wrong orientation); and unusable scans."""
    import nibabel as nib

    from volvlp_ray.data.synthetic import make_case

    d = tmp_path_factory.mktemp("scans")
    case = make_case(0, "valid", 3)
    hu = np.clip(case["stored"].astype(np.float64) * case["slope"] + case["intercept"], -1024, 3000).astype(np.int16)
    affine = case["affine"]
    nib.save(nib.Nifti1Image(hu, affine), d / "ct.nii.gz")
    nib.save(nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.int16), affine), d / "ct_raw.nii.gz")
    write_dicom_series(hu, affine, d / "series")
    write_dicom_series(hu[::-1].copy(), affine, d / "mirrored")
    (d / "notes.txt").write_text("not a scan\n")
    (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(2000))
    (d / "empty_dir").mkdir()
    (d / "empty_dir" / "readme.txt").write_text("no DICOM here")
    nib.save(nib.Nifti1Image(hu[:, :, :4].copy(), affine), d / "short.nii.gz")  # 16 mm: 2 slices at 8 mm < z patch 4
    nib.save(nib.Nifti1Image(hu[38:41, 38:41, :].copy(), affine), d / "narrow.nii.gz")  # 14 mm in-plane
    write_dicom_series(hu[:, :, :20], affine, d / "two_series", series_uid="1.2.3.4")
    shifted = affine.copy()
    shifted[2, 3] += 300.0  # a second series 30 cm further along z
    write_dicom_series(hu[:, :, 20:40], shifted, d / "two_series_b", series_uid="1.2.3.5")
    for p in (d / "two_series_b").iterdir():
        p.rename(d / "two_series" / f"B{p.name}")
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "weights.bin").write_bytes(b"x")
    (d / "broken_export").mkdir()
    (d / "broken_export" / "vlp_config.json").write_text("{}")
    (d / "broken_export" / "model.safetensors").write_bytes(b"garbage")
    return {"dir": d, "nifti": d / "ct.nii.gz", "raw": d / "ct_raw.nii.gz", "dicom": d / "series",
            "mirrored": d / "mirrored"}


def by_hand(model, nifti: Path, text: str | None = None) -> dict:
    """What the job should print for ``nifti``, computed from the model and the training chain directly: the
    run's preprocessing, the volume padded with air to a multiple of the z patch (as evaluation's collate does)
    and ``VLP.embed_volume``; the run's prompts embedded with ``VLP.embed_text``; softmax over each pair."""
    from volvlp_ray.data.ctrate import LABELS
    from volvlp_ray.data.transforms import normalise, preprocess_volume

    data, prompts = model.run_config["data"], model.run_config["eval"]["prompts"]
    window = tuple(data["hu_window"])
    res = preprocess_volume(str(nifti), 1.0, 0.0, tuple(data["spacing"]), data["in_plane_size"], window)
    x = normalise(res.volume, window)
    pz = model.vision.patch[0]
    x = np.concatenate([x, np.full(((-x.shape[0]) % pz, *x.shape[1:]), -1.0, np.float32)])
    e = model.embed_volume(x).numpy().astype(np.float64)
    pos = model.embed_text([prompts[0].format(label=n) for n in LABELS], max_length=data["max_text_length"]).numpy()
    neg = model.embed_text([prompts[1].format(label=n) for n in LABELS], max_length=data["max_text_length"]).numpy()
    scale = float(model.logit_scale.exp())
    p = 1 / (1 + np.exp(-scale * (pos @ e - neg @ e)))
    out = {"embedding": e, "probabilities": dict(zip(LABELS, p)), "depth": res.volume.shape[0]}
    if text is not None:
        t = model.embed_report(text).numpy().astype(np.float64)
        out["similarity"] = float(e @ t / np.linalg.norm(e) / np.linalg.norm(t))
    return out


# --------------------------------------------------------------------------------------------------------
# one scan


def test_nifti_scan_json_equals_the_model_by_hand(capsys, export, model, scans, tmp_path) -> None:
    from volvlp_ray.data.ctrate import LABELS

    out = tmp_path / "one.npz"
    rc, stdout, err = run(capsys, "--model", str(export), str(scans["nifti"]), "--json", "--report", TEXT,
                          "--out", str(out))
    assert rc == 0, err
    result = json.loads(stdout)  # stdout is the JSON alone; progress lines went to stderr
    assert "[embed] model:" in err
    (s,) = result["scans"]
    want = by_hand(model, scans["nifti"], TEXT)
    assert result["label_names"] == list(LABELS) and list(s["probabilities"]) == list(LABELS)
    assert result["prompts"] == model.run_config["eval"]["prompts"]
    assert all(0.0 <= p <= 1.0 for p in s["probabilities"].values())
    np.testing.assert_allclose([s["probabilities"][n] for n in LABELS], [want["probabilities"][n] for n in LABELS],
                               atol=1e-5)
    emb = np.asarray(s["embedding"])
    np.testing.assert_allclose(emb, want["embedding"], atol=1e-5)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    assert s["format"] == "nifti" and s["shape"][0] == want["depth"] and s["shape"][1:] == [64, 64]
    assert s["report_similarity"] == pytest.approx(want["similarity"], abs=1e-5)
    saved = np.load(out)
    assert saved["embeddings"].shape == (1, emb.size) and saved["embeddings"].dtype == np.float32
    np.testing.assert_allclose(saved["embeddings"][0], emb, atol=1e-7)
    assert saved["names"].tolist() == [str(scans["nifti"])]


def test_dicom_series_equals_the_nifti_file(capsys, export, model, scans, tmp_path) -> None:
    """The same volume as a DICOM series (per-slice rescale, LPS geometry, files out of order) embeds as the NIfTI
    file does; the series mirrored left-right does not (the check would catch a wrong orientation)."""
    from volvlp_ray.serving.scan import ScanEmbedder, embed_config

    out = tmp_path / "three.npy"
    rc, stdout, err = run(capsys, "--model", str(export), str(scans["nifti"]), str(scans["dicom"]),
                          str(scans["mirrored"]), "--json", "--out", str(out))
    assert rc == 0, err
    nifti, dicom, mirrored = json.loads(stdout)["scans"]
    assert dicom["format"] == "dicom" and dicom["shape"] == nifti["shape"]
    np.testing.assert_allclose(dicom["source_spacing"], nifti["source_spacing"], rtol=1e-5)
    np.testing.assert_allclose(dicom["embedding"], nifti["embedding"], atol=1e-5)
    assert np.abs(np.subtract(mirrored["embedding"], nifti["embedding"])).max() > 100 * 1e-5
    saved = np.load(out)
    assert saved.shape == (3, len(nifti["embedding"]))
    np.testing.assert_allclose(saved, [nifti["embedding"], dicom["embedding"], mirrored["embedding"]], atol=1e-7)
    # the preprocessed arrays themselves are identical (HU from each slice's slope/intercept, RAS, resampled)
    embedder = ScanEmbedder(model, embed_config(model.run_config))
    assert np.array_equal(embedder.load(scans["dicom"]).volume, embedder.load(scans["nifti"]).volume)
    assert not np.array_equal(embedder.load(scans["mirrored"]).volume, embedder.load(scans["nifti"]).volume)


def test_table_slope_intercept_and_safetensors(capsys, export, model, scans, tmp_path) -> None:
    from safetensors.numpy import load_file
    from safetensors import safe_open

    from volvlp_ray.data.ctrate import LABELS

    out = tmp_path / "e.safetensors"
    rc, stdout, err = run(capsys, "--model", str(export), str(scans["raw"]), "--intercept", "-1024", "--report", TEXT,
                          "--out", str(out))
    assert rc == 0, err
    want = by_hand(model, scans["nifti"], TEXT)  # stored + 1024 with --intercept -1024: the same HU
    lines = stdout.splitlines()
    assert lines[0].startswith("[embed] model:") and any("zero-shot p(present)" in l for l in lines)
    for name in LABELS:
        (row,) = [l for l in lines if l.startswith(name + " ")]
        assert float(row.split()[-1]) == pytest.approx(want["probabilities"][name], abs=6e-4)  # 3 decimals
    (sim,) = [l for l in lines if l.startswith("report similarity")]
    assert float(sim.split()[-1]) == pytest.approx(want["similarity"], abs=6e-4)
    emb = load_file(str(out))["embeddings"]
    np.testing.assert_allclose(emb[0], want["embedding"], atol=1e-5)
    with safe_open(str(out), "np") as f:
        assert json.loads(f.metadata()["names"]) == [str(scans["raw"])]


@pytest.mark.parametrize("case, message", [
    ("notes.txt", "is neither a NIfTI file"),
    ("corrupt.nii.gz", "not a readable NIfTI file"),
    ("empty_dir", "no DICOM image files"),
    ("two_series", "holds 2 DICOM series"),
    ("short.nii.gz", "fewer than the model's z patch of 4"),
    ("narrow.nii.gz", "smaller than the model's in-plane patch 16 x 16"),
    ("missing.nii.gz", "does not exist"),
    ("model:not_a_model", "neither a VLP export"),
    ("model:broken_export", "not a loadable VLP export"),
    ("out:e.parquet", "give a .npy, .npz or .safetensors file"),
])
def test_clear_errors(capsys, export, scans, case, message) -> None:
    d = scans["dir"]
    model, scan, extra = str(export), str(scans["nifti"]), []
    if case.startswith("model:"):
        model = str(d / case[6:])
    elif case.startswith("out:"):
        extra = ["--out", str(d / case[4:])]
    else:
        scan = str(d / case)
    rc, stdout, err = run(capsys, "--model", model, scan, *extra)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and "zero-shot" not in stdout


def test_error_exit_code_of_the_script(scans, export) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "embed.py"), "--model", str(export),
                        str(scans["dir"] / "corrupt.nii.gz")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: scan ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_model_as_checkpoint_latest_and_mlflow_uris(capsys, workspace, checkpoint, model, scans, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    want = by_hand(model, scans["nifti"])["embedding"]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (mlrun,) = client.search_runs([exp.experiment_id], filter_string="tags.`volvlp.run_name` = 'tiny'")
    model_uri = mlrun.data.tags["volvlp.model_uri"]
    assert model_uri.startswith("models:/")
    forms = [(str(checkpoint), [], "ray_checkpoint"), ("latest", [f"workspace={workspace}"], "latest"),
             (model_uri, [f"workspace={workspace}"], "mlflow"),
             (f"runs:/{mlrun.info.run_id}/model", [f"workspace={workspace}"], "mlflow")]
    for spec, overrides, kind in forms:
        rc, stdout, err = run(capsys, "--model", spec, str(scans["nifti"]), "--json", *overrides)
        assert rc == 0, (spec, err)
        result = json.loads(stdout)
        assert result["model"]["kind"] == kind and result["model"]["run_name"] == "tiny", result["model"]
        np.testing.assert_allclose(result["scans"][0]["embedding"], want, atol=1e-5, err_msg=spec)
    # the tracking URI from the environment; no workspace (./workspace has no mlflow.db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    monkeypatch.chdir(scans["dir"])
    rc, stdout, err = run(capsys, "--model", model_uri, str(scans["nifti"]), "--json")
    assert rc == 0, err
    np.testing.assert_allclose(json.loads(stdout)["scans"][0]["embedding"], want, atol=1e-5)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    rc, _, err = run(capsys, "--model", model_uri, str(scans["nifti"]))
    assert rc == 2 and "no MLflow store at" in err
    rc, _, err = run(capsys, "--model", "models:/m-00000000000000000000000000000000", str(scans["nifti"]),
                     f"workspace={workspace}")
    assert rc == 2 and err.strip().startswith("error: --model models:/m-0000") and "not found" in err


# --------------------------------------------------------------------------------------------------------
# a dataset


def _shard_samples(split_dir: Path) -> dict[str, dict]:
    """Every sample of a split's shards, read from the tar files directly."""
    out = {}
    for tar in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t.getmembers()}
            for name in members:
                if name.endswith(".volume.npy"):
                    key = name[: -len(".volume.npy")]
                    out[key] = {
                        "volume": np.load(io.BytesIO(t.extractfile(members[name]).read())),
                        "report": t.extractfile(members[f"{key}.report.txt"]).read().decode(),
                        "labels": json.loads(t.extractfile(members[f"{key}.meta.json"]).read())["labels"],
                    }
    return out


@pytest.fixture(scope="module")
def parquet(workspace, tmp_path_factory):
    """The batch job over the workspace's shards (train and valid) with `latest`, in this process."""
    out = tmp_path_factory.mktemp("batch") / "embeddings.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        rc = _embed_main()(["--model", "latest", "--data", str(workspace / "shards"), "--out", str(out),
                            "--batch-size", "4", f"workspace={workspace}"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_batch_job_over_shards(parquet, workspace, model) -> None:
    import pandas as pd

    from volvlp_ray.data.transforms import normalise

    df = pd.read_parquet(parquet)
    assert list(df.columns) == ["key", "split", "volume_embedding", "report_embedding", "labels"]
    samples = {s: _shard_samples(workspace / "shards" / s) for s in ("train", "valid")}
    assert sorted(df["key"]) == sorted([*samples["train"], *samples["valid"]]) and df["key"].is_unique
    assert len(df) == 24
    manifest = json.loads((parquet / "_embed.json").read_text())
    assert manifest["complete"] and manifest["last_run"]["written"] == 24 and manifest["embed_dim"] == 128
    window = tuple(model.run_config["data"]["hu_window"])
    pz = model.vision.patch[0]
    for row in df.itertuples():
        s = samples[row.split][row.key]
        v = normalise(s["volume"], window)
        padded = np.concatenate([v, np.full(((-v.shape[0]) % pz, *v.shape[1:]), -1.0, np.float32)])
        np.testing.assert_allclose(row.volume_embedding, model.embed_volume(padded).numpy(), atol=1e-4,
                                   err_msg=row.key)
        if v.shape[0] % pz == 0:  # nothing to pad: VLP.embed_volume of the volume itself
            np.testing.assert_allclose(row.volume_embedding, model.embed_volume(v).numpy(), atol=1e-4)
        np.testing.assert_allclose(row.report_embedding, model.embed_reports([s["report"]])[0].numpy(), atol=1e-4)
        assert np.linalg.norm(row.volume_embedding) == pytest.approx(1.0, abs=1e-5)
        assert list(row.labels) == [int(x) for x in s["labels"]]


@pytest.mark.slow
def test_batch_job_restarts_without_duplicates(capsys, parquet, workspace, tmp_path) -> None:
    import shutil

    import pandas as pd

    out = tmp_path / "restart.parquet"
    shutil.copytree(parquet, out)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = pd.read_parquet(parts[0])
    parts[0].unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts[1:]}
    rc, stdout, err = run(capsys, "--model", "latest", "--data", str(workspace / "shards"), "--out", str(out),
                          f"workspace={workspace}", "--json")
    assert rc == 0, err
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["written"] == len(lost) and summary["already"] == 24 - len(lost) and summary["rows"] == 24
    df = pd.read_parquet(out)
    assert len(df) == 24 and df["key"].is_unique
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in kept} == kept
    again = df.set_index("key").loc[lost["key"]]
    np.testing.assert_allclose(np.stack(again["volume_embedding"]), np.stack(lost["volume_embedding"]), atol=1e-6)
    # a folder another model's embeddings started is refused; data that is no data too
    other = json.loads((out / "_embed.json").read_text())
    (out / "_embed.json").write_text(json.dumps({**other, "model_identity": "0" * 16}))
    rc, _, err = run(capsys, "--model", "latest", "--data", str(workspace / "shards"), "--out", str(out),
                     f"workspace={workspace}")
    assert rc == 2 and "holds embeddings of another model" in err
    rc, _, err = run(capsys, "--model", "latest", "--data", str(tmp_path), "--out", str(tmp_path / "x.parquet"),
                     f"workspace={workspace}")
    assert rc == 2 and "neither shards" in err and "CT-RATE-layout" in err
    # CPU actors that would hold every CPU (the read tasks would never run): refused, not a hang
    rc, _, err = run(capsys, "--model", "latest", "--data", str(workspace / "shards"), "--out",
                     str(tmp_path / "y.parquet"), "--concurrency", "64", f"workspace={workspace}")
    assert rc == 2 and "lower --concurrency or --cpus-per-actor" in err


@pytest.mark.slow
def test_batch_job_over_a_ctrate_layout_folder(capsys, parquet, workspace, tmp_path) -> None:
    """The CT-RATE-layout source (NIfTI + metadata slope/intercept + reports) embeds as its shards do."""
    import pandas as pd

    out = tmp_path / "layout.parquet"
    rc, _, err = run(capsys, "--model", "latest", "--data", str(workspace / "data" / "synthetic"), "--split", "valid",
                     "--out", str(out), f"workspace={workspace}")
    assert rc == 0, err
    got = pd.read_parquet(out).set_index("key").sort_index()
    ref = pd.read_parquet(parquet).set_index("key").loc[got.index]
    assert len(got) == 8 and set(got["split"]) == {"valid"}
    for col in ("volume_embedding", "report_embedding"):
        np.testing.assert_allclose(np.stack(got[col]), np.stack(ref[col]), atol=1e-4)
    assert np.array_equal(np.stack(got["labels"]), np.stack(ref["labels"]))


@pytest.mark.slow
def test_query_ranks_by_cosine(capsys, parquet, export, model) -> None:
    import pandas as pd

    rc, stdout, err = run(capsys, "--model", str(export), "--query", str(parquet), "--text", TEXT, "--top", "5",
                          "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    df = pd.read_parquet(parquet).set_index("key")
    q = model.embed_report(TEXT).numpy()
    scores = {k: float(np.dot(v, q) / np.linalg.norm(v) / np.linalg.norm(q)) for k, v in df["volume_embedding"].items()}
    best = sorted(scores, key=scores.get, reverse=True)[:5]
    assert res["n"] == 24 and [r["key"] for r in res["results"]] == best
    for r in res["results"]:
        assert r["score"] == pytest.approx(scores[r["key"]], abs=1e-5)
    rc, stdout, _ = run(capsys, "--model", str(export), "--query", str(parquet), "--text", TEXT, "--top", "2")
    assert rc == 0 and best[0] in stdout.splitlines()[1]
