"""Shared fixtures.

Every test runs without the caller's outside services: ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``, ``RAY_AUTH_*``
and ``AWS_*`` are removed from the environment for the whole session and again for each test (a test that
needs one sets it with ``monkeypatch`` or passes it to its subprocess).

The tiny workspace, built once per session (``configs/tiny.yaml``'s data: 16 + 8 synthetic volumes, their
WebDataset shards, the scratch tokenizer), for tests whose jobs run on that data::

    @pytest.fixture(scope="module")
    def workspace(tmp_path_factory, copy_tiny_workspace):
        return copy_tiny_workspace(tmp_path_factory.mktemp("ws"))   # data/, shards/, tokenizers/ inside

    def test_x(copy_tiny_workspace, tmp_path):
        ws = copy_tiny_workspace(tmp_path / "ws")
        # jobs/pretrain.py --config configs/tiny.yaml workspace=ws ...  prints "[data] shards ready" and builds
        # neither data, shards nor tokenizer (as long as no shard option differs from tiny.yaml's)

``tiny_workspace`` is the built original (read it, never write to it). It is made in this process, on the
session's Ray, by the job's own first stages (``ensure_shards``, ``ensure_tokenizer`` of
``volvlp_ray.train.trainer``), and its MLflow database is made with its tables (no run). A copy
differs from the original only in the shard manifests' ``source_id``, which names the synthetic source by absolute
path: the copy's manifests name the copy's own ``data/synthetic`` (the folder a job on the copy generates its source
into), so the job finds its shards current instead of rebuilding them.

``mlflow_text_leaks(db, needles)`` scans everything an SQLite-backed MLflow store holds (every table of the
database and its raw bytes, every file under every experiment's, run's and logged model's artifact location as
the MLflow client reports them, inside zip/gzip files too) for the given texts; ``report_texts(ws)`` gives the
texts that would show a leak: every report of both splits of a workspace's synthetic data, whole and by
sentence (less what the repository's own source holds: template sentences, label names). Both are fixtures
returning the function.
"""

import gzip
import json
import os
import re
import shutil
import sqlite3
import sys
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_ENV = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")
OUTSIDE_ENV_PREFIXES = ("RAY_AUTH_", "AWS_")


def _outside_env_keys() -> list[str]:
    return [k for k in os.environ if k in OUTSIDE_ENV or k.startswith(OUTSIDE_ENV_PREFIXES)]


@pytest.fixture(scope="session", autouse=True)
def _no_outside_services_in_the_session():
    """Session fixtures (Ray, the tiny workspace) start without the caller's tracking server, cluster or keys."""
    with pytest.MonkeyPatch.context() as mp:
        for key in _outside_env_keys():
            mp.delenv(key)
        yield


@pytest.fixture(autouse=True, scope="module")
def _no_outside_services_in_the_module():
    """...and every module's fixtures (built before any function-scoped fixture of their first test runs)..."""
    with pytest.MonkeyPatch.context() as mp:
        for key in _outside_env_keys():
            mp.delenv(key)
        yield


@pytest.fixture(autouse=True)
def _no_outside_services(monkeypatch):
    """...and every test, whatever an earlier test left in ``os.environ``."""
    for key in _outside_env_keys():
        monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray in this process (sized and started as
    ``jobs/pretrain.py`` starts its own on this machine: 2 training workers + CPUs for Ray Data, the dashboard that
    serves the state API Ray Train's controller polls)."""
    import ray

    if not ray.is_initialized():
        from volvlp_ray.train.trainer import start_local_ray

        start_local_ray(num_cpus=4, include_dashboard=True, logging_level="WARNING")
    yield ray
    ray.shutdown()


class JobRun:
    """What :func:`pretrain_job` gives back: ``result`` (``run_pretraining``'s dict, None when it raised),
    ``error`` (the exception it raised, or None) and ``output`` (everything it and its Ray workers printed)."""

    def __init__(self, result, error, output: str):
        self.result, self.error, self.output = result, error, output

    def ok(self) -> "JobRun":
        assert self.error is None, f"{self.error!r}\n{self.output[-8000:]}"
        return self


def _captured(fn, *args, env: dict | None = None):
    """``fn(*args)`` with its output captured at the Python and file-descriptor level (Ray's worker lines included,
    those forwarded before the call returns), ``env`` set and the caller's outside services removed meanwhile:
    ``(result, error, output)``, the exception it raised as ``error`` (``result`` None then)."""
    import io
    import tempfile

    text = io.StringIO()
    result = error = None
    with tempfile.TemporaryFile() as fd_out, pytest.MonkeyPatch.context() as mp:
        for key in _outside_env_keys():
            mp.delenv(key)
        for key, value in (env or {}).items():
            mp.setenv(key, str(value))
        before = dict(os.environ)
        mp.setattr(sys, "stdout", text)
        mp.setattr(sys, "stderr", text)
        saved = os.dup(1), os.dup(2)
        os.dup2(fd_out.fileno(), 1)
        os.dup2(fd_out.fileno(), 2)
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            error = exc
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fd_out.seek(0)
        raw = fd_out.read().decode(errors="replace")
        # a job leaves this process's environment as it found it: a tracking URI or cluster address left
        # behind would send the next job in the process (a notebook's, a sweep driver's) to this one's
        left = {k: os.environ[k] for k in _outside_env_keys() if before.get(k) != os.environ[k]}
    assert not left, f"the job left {left} in os.environ"
    return result, error, text.getvalue() + raw


@pytest.fixture(scope="session")
def pretrain_job(ray_session):
    """``run(*overrides, config=configs/tiny.yaml, env=None) -> JobRun``: what ``python jobs/pretrain.py --config
    CONFIG OVERRIDES...`` does (``run_pretraining``), run in this process on the session's Ray instead of a new
    process starting its own Ray (about 30 s less per job on the 2-core machine: no Ray start and stop, no driver
    imports, Ray Data's task workers reused). ``env``: variables set for the run (``VOLVLP_*`` reach the workers as
    they do from a shell). Output is captured at the Python and file-descriptor level, Ray's worker lines included
    (those forwarded before the call returns). Tests about the process itself (kills, exit codes, Ray's start-up, a
    job submitted to a cluster) run the script instead."""
    from volvlp_ray.config import load_config
    from volvlp_ray.train.trainer import run_pretraining

    def run(*overrides: str, config=ROOT / "configs" / "tiny.yaml", env: dict | None = None) -> JobRun:
        cfg = load_config(config, list(overrides))
        return JobRun(*_captured(run_pretraining, cfg, env=env))

    return run


# --------------------------------------------------------------------------------------------------------
# the tiny workspace, built once

def _build_tiny(cfg) -> None:
    """The job's own first stages on ``cfg`` (``ensure_ray``: the session's Ray is there; ``ensure_shards``,
    ``ensure_tokenizer`` of ``volvlp_ray.train.trainer``), then the MLflow store's tables (MLflow's migrations take
    seconds; made once, not by every job on a copy)."""
    from mlflow.tracking import MlflowClient

    from volvlp_ray.tracking import resolve_tracking_uri
    from volvlp_ray.train.trainer import ensure_ray, ensure_shards, ensure_tokenizer

    ensure_ray(cfg)
    ensure_shards(cfg)
    ensure_tokenizer(cfg)
    MlflowClient(resolve_tracking_uri(cfg)).search_experiments()


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, ray_session) -> Path:
    """configs/tiny.yaml's synthetic data, shards and tokenizer, made once by the job's own code, in this process on
    the session's Ray (read only)."""
    from volvlp_ray.config import load_config

    ws = tmp_path_factory.mktemp("tiny-workspace")
    _, error, out = _captured(_build_tiny, load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={ws}"]))
    assert error is None, f"{error!r}\n{out[-6000:]}"
    assert "[prepare] valid:" in out and "[data] tokenizer built" in out, out[-3000:]
    return ws


@pytest.fixture(scope="session")
def copy_tiny_workspace(tiny_workspace):
    """``copy(dest) -> dest``: the tiny workspace copied into ``dest`` (created, or empty), ready for a job."""
    from volvlp_ray.data.ctrate import SPLITS
    from volvlp_ray.data.prepare import source_id

    original = source_id(tiny_workspace / "data" / "synthetic")

    def copy(dest) -> Path:
        dest = Path(dest)
        shutil.copytree(tiny_workspace, dest, dirs_exist_ok=True)
        moved = source_id(dest / "data" / "synthetic")
        for split in SPLITS:
            for name in ("manifest.json", "_plan.json"):
                path = dest / "shards" / split / name
                doc = json.loads(path.read_text())
                assert doc["source_id"] == original, (path, doc["source_id"])
                doc["source_id"] = moved
                path.write_text(json.dumps(doc, indent=1))
        return dest

    return copy


@pytest.fixture(scope="session")
def trained_tiny_workspace(tmp_path_factory, copy_tiny_workspace, pretrain_job) -> tuple[Path, str]:
    """``(workspace, output)``: a copy of the tiny workspace holding one finished pre-training run of
    configs/tiny.yaml (run name ``tiny``: 6 steps, checkpoints at steps 3 and 6, the last with ``export/``, the
    held-out evaluation, the MLflow model; the step trace of both ranks in ``trace/``), and what the job printed.
    One run for every module that only reads a finished run or adds to it (``test_embed.py``, ``test_evaluate.py``,
    ``test_pretrain_e2e.py``): they evaluate it, log downstream results to it and read its MLflow store, but never
    start another pre-training run in it (``latest`` stays this run's checkpoint). Run with this workspace as the
    working directory: should anything fall back to MLflow's default ``./mlruns``, it lands in the workspace."""
    ws = copy_tiny_workspace(tmp_path_factory.mktemp("trained"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        out = pretrain_job(f"workspace={ws}", "run_name=tiny", env={"VOLVLP_STEP_TRACE": str(ws / "trace")}).ok().output
    assert "[data] shards ready" in out and "[prepare]" not in out and "tokenizer built" not in out, out[-3000:]
    return ws, out


# --------------------------------------------------------------------------------------------------------
# what an MLflow store holds: a scan for report text


def _report_texts(workspace, splits=("train", "valid"), min_chars: int = 25) -> set[str]:
    """What would show that report text reached a store: each report's findings and impressions whole, and their
    sentences longer than ``min_chars``, of ``splits`` (both by default) of the workspace's synthetic data -- less
    the texts the repository itself holds (``volvlp_ray/``, ``jobs/``, ``configs/``): the synthetic generator's
    template sentences and the CT-RATE label names, which the MLflow model's code artifacts and the per-label
    metric names carry by design (none of them is specific to a report)."""
    import csv

    from volvlp_ray.data.ctrate import csv_paths

    texts = set()
    for split in splits:
        with open(csv_paths(Path(workspace) / "data" / "synthetic", split)["reports"], newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, split
        for row in rows:
            for text in (row["Findings_EN"], row["Impressions_EN"]):
                texts |= {text.strip()} | {s.strip() for s in text.split(".") if len(s.strip()) > min_chars}
    public = "\n".join(p.read_text(errors="ignore") for d in ("volvlp_ray", "jobs", "configs")
                       for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml"))
    return {t for t in texts if t and t not in public}


def _squash(data: bytes) -> bytes:
    return re.sub(rb"\s+", b" ", data)  # YAML folds long strings, JSON indents: compare with whitespace collapsed


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise AssertionError(f"artifacts at {uri}: this scan reads local artifact stores only")
    return Path(unquote(parsed.path))


def _blobs(path: Path, data: bytes, depth: int = 0):
    """(where, bytes) of a file and of what a zip or gzip file holds (a torch .pt file is a zip)."""
    yield str(path), data
    if depth > 2:
        return
    import io

    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        yield from _blobs(Path(f"{path}!{info.filename}"), z.read(info), depth + 1)
        except zipfile.BadZipFile:
            pass
    elif data[:2] == b"\x1f\x8b":
        try:
            yield from _blobs(Path(f"{path}!gunzip"), gzip.decompress(data), depth + 1)
        except (OSError, EOFError):
            pass


def _mlflow_text_leaks(db, needles) -> tuple[dict[str, list[str]], list[str]]:
    """Search an SQLite-backed MLflow store for ``needles`` (texts). Returns ({needle: [where found]} for the
    needles found, the list of places scanned). Scanned: every column of every row of every table of the database
    (params, tags, metric names, run names, inputs, logged-model params...), the database files' raw bytes (free
    pages, WAL), and every file under the artifact locations the MLflow client reports for every experiment, run and
    logged model (deleted ones too), with zip and gzip members. Whitespace runs compare equal to one space."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    db = Path(db)
    wanted = {n: _squash(n.encode()) for n in needles}
    found: dict[str, list[str]] = {}
    scanned: list[str] = []

    def search(where: str, data: bytes) -> None:
        scanned.append(where)
        data = _squash(data)
        for needle, b in wanted.items():
            if b in data:
                found.setdefault(needle, []).append(where)

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            cells = []
            for row in con.execute(f'select * from "{table}"'):
                cells += [v if isinstance(v, bytes) else str(v).encode() for v in row if v is not None]
            search(f"{db.name}:{table}", b"\n".join(cells))
    finally:
        con.close()
    for path in sorted(db.parent.glob(db.name + "*")):  # the database file, its -wal / -journal
        search(str(path), path.read_bytes())

    client = MlflowClient(f"sqlite:///{db}")
    experiments = client.search_experiments(view_type=ViewType.ALL)
    roots = {e.artifact_location for e in experiments}
    ids = [e.experiment_id for e in experiments]
    roots |= {r.info.artifact_uri for r in client.search_runs(ids, run_view_type=ViewType.ALL)}
    roots |= {m.artifact_location for m in client.search_logged_models(ids)}
    files = set()
    for root in roots:
        path = _local_path(root)
        if path.is_dir():
            files |= {p for p in path.rglob("*") if p.is_file()}
    for path in sorted(files):
        for where, data in _blobs(path, path.read_bytes()):
            search(where, data)
    return found, scanned


@pytest.fixture(scope="session")
def report_texts():
    return _report_texts


@pytest.fixture(scope="session")
def mlflow_text_leaks():
    return _mlflow_text_leaks
