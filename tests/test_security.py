"""Secure defaults, each pinned by a test that would fail if it went away.

- Ray token authentication stays on (every cluster config; the live head's answers are in test_job_submit.py).
- The MLflow server binds to loopback unless told otherwise (the live socket is checked in test_job_submit.py).
- Report text and voxels reach MLflow only when the config opts in.
- Shards are never unpickled: a pickled object array in a shard is a bad sample, its payload never runs.
- Checkpoints load with ``weights_only=True``; exports are safetensors + JSON, a pickle in their place is refused.

Payloads here create a marker directory when unpickled; each test shows that its payload is live (it does run
under an unsafe load) and that the project's load path refuses it without running it.
"""

from __future__ import annotations

import ast
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobutil import load_job

ROOT = Path(__file__).parents[1]
SOURCES = sorted([*(ROOT / "volvlp_ray").rglob("*.py"), *(ROOT / "jobs").glob("*.py")])


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickled_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Ray token authentication, MLflow server binding


def test_ray_token_auth_is_on_in_every_cluster_config():
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("RAY_AUTH_MODE=token" in c for c in aws[key] if "ray start" in c), key
    for path in (ROOT / "cluster" / "kuberay").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token", path.name
    # nothing the project ships turns it off
    shipped = [*SOURCES, *(ROOT / "cluster").rglob("*.yaml"), *(ROOT / "configs").glob("*.yaml"), ROOT / "README.md",
               *(ROOT / ".ci").glob("*")]
    off = re.compile(r"RAY_AUTH_MODE\W{1,4}disabled|mode:\s*disabled|--disable-security-middleware", re.I)
    offenders = [str(p.relative_to(ROOT)) for p in shipped if p.is_file() and off.search(p.read_text(errors="ignore"))]
    assert not offenders, offenders


def test_mlflow_server_launcher_binds_loopback_unless_told_otherwise():
    from mlflow.cli import server

    mod = load_job("mlflow_server")
    default = server.make_context("server", mod.build_command([], {})[4:]).params
    assert default["host"] == "127.0.0.1"
    assert not default["disable_security_middleware"]
    told = server.make_context("server", mod.build_command(["--host", "0.0.0.0"], {})[4:]).params
    assert told["host"] == "0.0.0.0"


# ---------------------------------------------------------------------------------------------------------------
# patient data and MLflow


def test_patient_data_opt_ins_are_off_by_default():
    from volvlp_ray.config import Config, load_config

    assert not Config().tracking.log_text and not Config().tracking.log_volumes
    for path in (ROOT / "configs").glob("*.yaml"):
        cfg = load_config(path)
        assert not cfg.tracking.log_text and not cfg.tracking.log_volumes, path.name


def test_report_text_reaches_mlflow_only_with_the_opt_in(tmp_path):
    from mlflow.tracking import MlflowClient

    from volvlp_ray.config import load_config
    from volvlp_ray.tracking import PrivacyError, log_text_artifact, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"workspace={tmp_path}", f"tracking.tracking_uri={uri}"])
    run_id = start_run(cfg, "privacy")
    report = "Cardiomegaly is present. A 12 mm nodule in the right upper lobe."
    with pytest.raises(PrivacyError, match="tracking.log_text"):
        log_text_artifact(cfg, run_id, report, "report.txt")
    client = MlflowClient(uri)
    assert "report.txt" not in {a.path for a in client.list_artifacts(run_id)}
    opted = load_config(None, [f"workspace={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.log_text=true"])
    log_text_artifact(opted, run_id, report, "report.txt")  # the opt-in works: the guard is not a blanket refusal
    assert "report.txt" in {a.path for a in client.list_artifacts(run_id)}


def test_voxels_reach_mlflow_only_with_the_opt_in(tmp_path):
    import numpy as np
    from mlflow.tracking import MlflowClient

    from volvlp_ray.config import load_config
    from volvlp_ray.tracking import PrivacyError, log_volume_artifact, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"workspace={tmp_path}", f"tracking.tracking_uri={uri}"])
    run_id = start_run(cfg, "privacy-voxels")
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    with pytest.raises(PrivacyError, match="tracking.log_volumes"):
        log_volume_artifact(cfg, run_id, volume, "volumes/case.npy")
    client = MlflowClient(uri)
    assert not client.list_artifacts(run_id, "volumes")
    opted = load_config(None, [f"workspace={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.log_volumes=true"])
    log_volume_artifact(opted, run_id, volume, "volumes/case.npy")
    local = client.download_artifacts(run_id, "volumes/case.npy", str(tmp_path))
    np.testing.assert_array_equal(np.load(local, allow_pickle=False), volume)


# ---------------------------------------------------------------------------------------------------------------
# shards: never unpickled


def test_pickled_shard_member_is_refused_without_running_it(tmp_path):
    from volvlp_ray.data.shards import DecodeError, decode_sample

    marker = tmp_path / "pwned"
    row = {"__key__": "train_1_a_1", "volume.npy": pickled_npy(marker), "report.txt": b"No acute findings.",
           "meta.json": b'{"spacing": [8, 6, 6], "labels": []}'}
    with pytest.raises(DecodeError, match=r"train_1_a_1: undecodable volume\.npy"):
        decode_sample(row)
    assert not marker.exists()
    np.load(io.BytesIO(row["volume.npy"]), allow_pickle=True)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_pickled_sample_is_dropped_by_the_training_stream(ray_session, tmp_path):
    """Through the real read path (Ray Data read_webdataset -> decode -> tokenise): the good sample of the shard
    comes out, the pickled one is skipped, and its payload runs in no Ray worker."""
    from volvlp_ray.config import load_config
    from volvlp_ray.data.ctrate import LABELS
    from volvlp_ray.data.pipeline import build_dataset
    from volvlp_ray.data.shards import encode_sample, write_group_shards
    from volvlp_ray.data.storage import write_json
    from volvlp_ray.models.text import build_tokenizer

    marker = tmp_path / "pwned"
    meta = {"spacing": [8.0, 6.0, 6.0], "z_origin_mm": 0.0, "labels": [0] * len(LABELS)}
    good = encode_sample("train_1_a_1", np.zeros((8, 64, 64), np.int16), "No pleural effusion.", meta)
    bad = [(name, pickled_npy(marker) if name.endswith(".npy") else data)
           for name, data in encode_sample("train_2_a_1", np.zeros((8, 64, 64), np.int16), "Cardiomegaly.", meta)]
    split = tmp_path / "shards" / "train"
    specs = write_group_shards(split, 0, [bad, good], max_bytes=1 << 30)
    write_json(split / "manifest.json", {"shards": specs})
    tok_dir = tmp_path / "tokenizer"
    build_tokenizer(["No pleural effusion.", "Cardiomegaly."], 50).save_pretrained(str(tok_dir))
    cfg = load_config(None, [f"workspace={tmp_path}", f"data.shards_dir={tmp_path / 'shards'}"])
    rows = build_dataset(cfg, "train", str(tok_dir), training=False).take_all()
    assert [r["key"] for r in rows] == ["train_1_a_1"]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and exports


UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                  ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
                  ("pandas", "read_pickle")}


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that can unpickle: torch.load without weights_only=True, np.load without
    allow_pickle=False, pickle-family loaders, read_webdataset without decoder=None."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        attr = node.func.attr
        kw = {k.arg: k.value for k in node.keywords}

        def const(name, value):
            return name in kw and isinstance(kw[name], ast.Constant) and kw[name].value is value

        where = f"line {node.lineno}: {ast.unparse(node.func)}"
        if owner == "torch" and attr == "load" and not const("weights_only", True):
            found.append(where)
        elif owner in ("np", "numpy") and attr == "load" and not const("allow_pickle", False):
            found.append(where)
        elif (owner, attr) in UNSAFE_LOADERS:
            found.append(where)
        elif attr == "read_webdataset" and not const("decoder", None):
            found.append(where)
    return found


def test_unsafe_load_scanner_finds_what_it_looks_for():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(b)\nnp.load(b, allow_pickle=True)\n"
           "pickle.loads(b)\nray.data.read_webdataset(files)\n")
    assert len(unsafe_loads(bad)) == 6
    good = ("torch.load(p, weights_only=True, map_location='cpu')\nnp.load(b, allow_pickle=False)\n"
            "ray.data.read_webdataset(files, decoder=None)\njson.loads(s)\n")
    assert unsafe_loads(good) == []


def test_every_load_in_the_project_is_pickle_free():
    """Every torch.load passes weights_only=True, every np.load allow_pickle=False, no pickle-family loader,
    every read_webdataset decoder=None (raw bytes, decoded by shards.decode_sample)."""
    assert len(SOURCES) > 20
    offenders = {str(p.relative_to(ROOT)): hits for p in SOURCES if (hits := unsafe_loads(p.read_text()))}
    assert not offenders, offenders


def test_torch_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    import torch

    marker, path = tmp_path / "pwned", tmp_path / "model_states.pt"
    torch.save({"step": 6, "module": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        torch.load(path, weights_only=True, map_location="cpu")
    assert not marker.exists()
    torch.load(path, weights_only=False, map_location="cpu")  # the payload is live
    assert marker.exists()


def test_export_with_pickled_weights_is_refused(tmp_path):
    """``VLP.from_pretrained`` reads safetensors + JSON only: a pickle where the weights belong is an error, and its
    payload never runs (nor does it for a ``pytorch_model.bin`` left beside the export)."""
    import torch

    from volvlp_ray.config import ModelConfig
    from volvlp_ray.models import VLP
    from volvlp_ray.models.text import build_tokenizer
    from volvlp_ray.models.vlp import WEIGHTS_NAME, build_model

    tok = build_tokenizer(["Cardiomegaly is present.", "No pleural effusion."], 60)
    export = build_model(ModelConfig(), tok).save_pretrained(tmp_path / "export")
    VLP.from_pretrained(export)  # the clean export loads
    marker = tmp_path / "pwned"
    torch.save({"extra": Payload(marker)}, export / "pytorch_model.bin")
    VLP.from_pretrained(export)  # a stray pickle beside the weights is ignored
    assert not marker.exists()
    torch.save({"extra": Payload(marker)}, export / WEIGHTS_NAME)
    with pytest.raises(Exception):
        VLP.from_pretrained(export)
    assert not marker.exists()
