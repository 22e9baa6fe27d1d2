"""jobs/prepare_data.py with source and out on a real S3 endpoint (moto's server, in this process, over HTTP):
the manifest and every sample equal those of the same job on local paths. The Ray workers run in other
processes that were started without the credentials: the job hands them over (runtime_env)."""

import hashlib
import io
import json
import os
import socket
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segutil import ground_truth, multilabel_segmentation, volume_extent_mm

from volvlp_ray.data import storage, synthetic
from volvlp_ray.data.ctrate import read_split, volume_relpath

from jobutil import load_job

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "volvlp-test"


@pytest.fixture
def s3(ray_session, monkeypatch):
    """A moto S3 server on a free port; credentials only in this process's environment, set after Ray started."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the S3 endpoint")
    boto3 = pytest.importorskip("boto3")
    worker_secret = ray_session.get(ray_session.remote(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).remote())
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"client": client, "endpoint": f"127.0.0.1:{port}", "worker_secret": worker_secret}
    finally:
        server.stop()


def _job_main():
    return load_job("prepare_data").main


def _samples(read, split: str) -> tuple[dict, dict]:
    """(manifest, {key: (volume, report, meta)}) of a split, ``read(relpath) -> bytes``."""
    manifest = json.loads(read(f"{split}/manifest.json"))
    samples = {}
    for spec in manifest["shards"]:
        data = read(f"{split}/{spec['name']}")
        assert len(data) == spec["bytes"] and hashlib.sha256(data).hexdigest() == spec["sha256"]
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in t.getmembers():
                key, kind = m.name.split(".", 1)
                members.setdefault(key, {})[kind] = t.extractfile(m).read()
        for key, parts in members.items():
            samples[key] = (np.load(io.BytesIO(parts["volume.npy"]), allow_pickle=False),
                            parts["report.txt"].decode(), json.loads(parts["meta.json"]))
    return manifest, samples


def test_prepare_job_on_s3_equals_the_local_job(s3, tmp_path, capsys):
    """Source, shards, markers and manifest on S3 (URIs carrying the endpoint); local job for reference."""
    src = tmp_path / "src"
    synthetic.generate_dataset(src, 3, 1, seed=0, processes=1, progress=False)
    recs = {r.volume_name: r for r in read_split(src, "train")[0]}
    first = sorted(recs)[0]
    (src / "segmentations").mkdir()  # a segmentation and organ-wise findings, to be read from S3 too
    nib.save(multilabel_segmentation(ground_truth(src, "train")[first], volume_extent_mm(recs[first].path)),
             src / "segmentations" / first)
    (src / "metadata" / "train_organ_findings.json").write_text(json.dumps({first: {"heart": "Heart of one."}}))
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        s3["client"].upload_file(str(path), BUCKET, f"src/{path.relative_to(src).as_posix()}")

    overrides = ["data.shard_max_bytes=150000", "data.in_plane_size=32", "data.prepare_parallelism=2",
                 f"workspace={tmp_path / 'ws'}"]
    query = f"endpoint_override={s3['endpoint']}&scheme=http&region=us-east-1"
    s3_src, s3_out = f"s3://{BUCKET}/src?{query}", f"s3://{BUCKET}/shards?{query}"
    main = _job_main()
    assert main(["--source", str(src), "--out", str(tmp_path / "local"), *overrides]) == 0
    assert main(["--source", s3_src, "--out", s3_out, *overrides]) == 0
    out = capsys.readouterr()
    assert "[prepare] train: 3 samples in" in out.out, out

    def read_s3(rel: str) -> bytes:
        return s3["client"].get_object(Bucket=BUCKET, Key=f"shards/{rel}")["Body"].read()

    for split, n in (("train", 3), ("valid", 1)):
        man_local, local = _samples(lambda rel: (tmp_path / "local" / rel).read_bytes(), split)
        man_s3, remote = _samples(read_s3, split)
        assert man_local["num_samples"] == man_s3["num_samples"] == n
        # the same manifest, less what names the source: its id, and the shards' bytes (their meta names the file)
        assert man_s3["source_id"] == f"s3://{BUCKET}/src?{query}"
        strip = {"source_id", "shards", "total_bytes"}
        assert {k: v for k, v in man_s3.items() if k not in strip} == {k: v for k, v in man_local.items()
                                                                       if k not in strip}
        shards = [[(s["name"], s["samples"]) for s in m["shards"]] for m in (man_s3, man_local)]
        assert shards[0] == shards[1]
        assert sorted(remote) == sorted(local) and len(local) == n
        for key, (vol, report, meta) in local.items():
            rvol, rreport, rmeta = remote[key]
            assert rvol.dtype == vol.dtype and np.array_equal(rvol, vol), key
            assert rreport == report
            rel = volume_relpath(f"{key}.nii.gz")
            assert meta.pop("source") == str(src / rel) and rmeta.pop("source") == f"s3://{BUCKET}/src/{rel}?{query}"
            assert rmeta == meta, key
        q = json.loads(read_s3(f"{split}/quarantine.json"))
        assert q == json.loads((tmp_path / "local" / split / "quarantine.json").read_text())
    _, remote_train = _samples(read_s3, "train")
    assert remote_train[first.removesuffix(".nii.gz")][2]["organs_from"] == "segmentation"
    assert remote_train[first.removesuffix(".nii.gz")][2]["organ_findings"] == {"heart": "Heart of one."}

    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="shards/")["Contents"]]
    assert not [k for k in keys if k.endswith(".tmp") or "/." in k], keys  # no temporary objects left behind
    assert s3["worker_secret"] != "testing"  # Ray's worker processes never had these credentials themselves

    # a second run on S3 finds the shards up to date
    assert main(["--source", s3_src, "--out", s3_out, *overrides]) == 0
    assert "nothing to do" in capsys.readouterr().out

    # training and evaluation read the shards from S3 (read tasks get the credentials): the same rows as local
    from volvlp_ray.config import load_config
    from volvlp_ray.data.pipeline import build_dataset, shard_files
    from volvlp_ray.eval.job import resolve_data
    from volvlp_ray.train.trainer import ensure_tokenizer

    cfg_s3 = load_config(None, [*overrides, f"data.shards_dir={s3_out}"])
    cfg_local = load_config(None, [*overrides, f"data.shards_dir={tmp_path / 'local'}"])
    tokenizer = ensure_tokenizer(cfg_s3)  # built from the reports on S3
    assert "tokenizer built from 3 reports" in capsys.readouterr().out
    assert shard_files(cfg_s3, "train") == [f"s3://{BUCKET}/shards/train/{s['name']}?{query}"
                                            for s in json.loads(read_s3("train/manifest.json"))["shards"]]

    def rows(cfg, split):
        return {r["key"]: r for r in build_dataset(cfg, split, tokenizer, training=False).iter_rows()}

    cfg_wds = load_config(None, [*overrides, f"data.shards_dir={s3_out}", "data.reader=webdataset",
                                       "data.volume_transport=object_store"])
    for split, n in (("train", 3), ("valid", 1)):
        local = rows(cfg_local, split)
        assert len(local) == n
        for remote in (rows(cfg_s3, split), rows(cfg_wds, split)):  # our reader, and Ray's read_webdataset
            assert sorted(remote) == sorted(local)
            for key, row in local.items():
                assert np.array_equal(remote[key]["volume"], row["volume"])
                assert np.array_equal(remote[key]["input_ids"], row["input_ids"])
    # the training stream (data.volume_transport=direct) carries where the voxels lie on S3; the step's cut
    # (StepBatcher: whole z patches, data.sampler=equal) moves the reference and collate reads the slices
    from volvlp_ray.data.pipeline import StepBatcher, collate
    from volvlp_ray.data.sampler import Plan

    batcher = StepBatcher(cfg_s3, None)

    local = rows(cfg_local, "train")
    direct = list(build_dataset(cfg_s3, "train", tokenizer, training=True).iter_rows())
    assert sorted(r["key"] for r in direct) == sorted(local)
    for r in direct:
        assert "volume" not in r and r["volume_location"].startswith(f"s3://{BUCKET}/shards/train/shard-")
        assert r["volume_location"].endswith(f"?{query}")
        z = r["depth"] // 4
        start = (r["depth"] - 4 * z) // 2
        cut = batcher(Plan([{k: np.asarray(v) if k == "volume_shape" else v for k, v in r.items()}], z, [start], "exact"))
        batch = collate(cut, 4, (-1000, 1000), hu=True)
        assert batch["volume"].shape[2] == 4 * z
        assert np.array_equal(batch["volume"][0, 0].numpy(), local[r["key"]]["volume"][start:start + 4 * z])
    assert resolve_data(cfg_local, s3_out, "valid")[0].data.shards_dir == s3_out  # jobs/evaluate.py --data s3://...
    assert resolve_data(cfg_local, storage.child(s3_out, "valid"), "test")[1:] == ("valid", "shards_valid")

    # a shard that lost its tail on the object store is left out with an error; the other shards stay
    train_shards = [s["name"] for s in json.loads(read_s3("train/manifest.json"))["shards"]]
    s3["client"].put_object(Bucket=BUCKET, Key=f"shards/train/{train_shards[0]}",
                            Body=read_s3(f"train/{train_shards[0]}")[:-1024])
    assert shard_files(cfg_s3, "train") == [f"s3://{BUCKET}/shards/train/{name}?{query}" for name in train_shards[1:]]


def test_locations_keep_their_query_and_never_show_credentials(tmp_path):
    from volvlp_ray.data.prepare import source_id

    uri = "s3://AKIA1:s3cr3t@bucket/ct-rate?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert storage.child(uri, "train", "a.nii.gz") == (
        "s3://AKIA1:s3cr3t@bucket/ct-rate/train/a.nii.gz?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    assert storage.redact(uri) == source_id(uri) == (
        "s3://bucket/ct-rate?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    fs, path = storage.resolve(storage.child(uri, "train", "a.nii.gz"))
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/ct-rate/train/a.nii.gz"
    assert storage.resolve(storage.child(uri, "x"))[0] is fs  # one filesystem per bucket and options
    assert storage.normalise(f"file://{tmp_path}/a") == storage.normalise(tmp_path / "a") == str(tmp_path / "a")
    assert storage.child(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b") and not storage.is_uri(tmp_path)
