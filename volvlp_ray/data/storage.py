"""Files on local disk or on any pyarrow filesystem (s3://, gs://, hdfs://, ...), each named by one string.

A *location* is a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands. Filesystem options
ride in the URI's query and are kept by every child location, so one string is enough to reach a file from
any process:

    s3://bucket/ct-rate                                              AWS S3, region looked up from the bucket
    s3://bucket/ct-rate?region=eu-west-1                             no lookup
    s3://bucket/ct-rate?endpoint_override=minio:9000&scheme=http     MinIO / Ceph / any S3-compatible store

    child("s3://b/x?scheme=http", "train", "a.nii.gz") == "s3://b/x/train/a.nii.gz?scheme=http"

Credentials are not part of a location: each process finds them the way pyarrow does (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, the instance role). ``credential_env()`` lists the
ones the driver has, for the ``runtime_env`` of Ray tasks that run in other processes. A URI that carries
``user:secret@`` still works, and ``redact`` removes it wherever a location is written down or logged.

Writes are whole-file: on local disk under a temporary name and renamed into place (atomic); on an object
store one upload, which becomes visible only when complete. NIfTI files are read with ``nibabel.load`` from
local disk, and from a URI as bytes (gunzipped when compressed) parsed in memory.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import uuid
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = [
    "child",
    "credential_env",
    "delete_dir",
    "exists",
    "file_sizes",
    "is_dir",
    "is_file",
    "is_uri",
    "list_dir",
    "list_files",
    "load_nifti",
    "nifti_shape",
    "normalise",
    "parent",
    "open_input",
    "read_bytes",
    "read_json",
    "redact",
    "resolve",
    "size",
    "task_runtime_env",
    "upload_file",
    "write_bytes",
    "write_json",
]

# What a Ray worker in another process needs to reach the same object store as the driver.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED", "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
)


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalise(location: str | os.PathLike) -> str:
    """A local path made absolute (``file://`` stripped); a URI unchanged."""
    text = str(location)
    if is_uri(text):
        return text
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(os.path.expanduser(text))


def child(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query."""
    text = str(location)
    if not is_uri(text):
        return os.path.join(text, *parts)
    s = urlsplit(text)
    path = "/".join([s.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def parent(location: str | os.PathLike) -> tuple[str, str]:
    """``(parent location, last name)``, keeping a URI's query: ``parent("s3://b/x/train?q") ==
    ("s3://b/x?q", "train")``."""
    text = str(location)
    if not is_uri(text):
        path = normalise(text).rstrip(os.sep) or os.sep
        return os.path.dirname(path), os.path.basename(path)
    s = urlsplit(text)
    head, _, name = s.path.rstrip("/").rpartition("/")
    return urlunsplit((s.scheme, s.netloc, head, s.query, s.fragment)), name


def redact(location: str | os.PathLike) -> str:
    """The location without ``user:secret@`` credentials (for logs, manifests and shard metadata)."""
    text = str(location)
    if not is_uri(text):
        return text
    s = urlsplit(text)
    netloc = s.netloc.rsplit("@", 1)[-1]
    return urlunsplit((s.scheme, netloc, s.path, s.query, s.fragment))


@lru_cache(maxsize=32)
def _filesystem(base_uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(base_uri)


def resolve(location: str | os.PathLike):
    """``(pyarrow FileSystem, path inside it)``. One filesystem object per bucket and options, per process
    (S3's region lookup is done once, not once per file)."""
    import pyarrow.fs

    text = str(location)
    if not is_uri(text):
        return pyarrow.fs.LocalFileSystem(), normalise(text)
    s = urlsplit(text)
    fs, root = _filesystem(urlunsplit((s.scheme, s.netloc, "", s.query, "")))
    if not root:  # a filesystem whose paths do not start with the authority (hdfs://host:port/path)
        return fs, unquote(s.path)
    return fs, f"{root.rstrip('/')}/{unquote(s.path).strip('/')}".rstrip("/")  # s3://bucket/key -> bucket/key


def _info(location: str | os.PathLike):
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs

    if not is_uri(location):
        return os.path.exists(normalise(location))
    return _info(location).type != pyarrow.fs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs

    if not is_uri(location):
        return os.path.isfile(normalise(location))
    return _info(location).type == pyarrow.fs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A folder (on an object store: a prefix with at least one object under it)."""
    import pyarrow.fs

    if not is_uri(location):
        return os.path.isdir(normalise(location))
    return _info(location).type == pyarrow.fs.FileType.Directory


def size(location: str | os.PathLike) -> int | None:
    """Bytes of a file, or None when there is none."""
    import pyarrow.fs

    if not is_uri(location):
        path = normalise(location)
        return os.stat(path).st_size if os.path.isfile(path) else None
    info = _info(location)
    return info.size if info.type == pyarrow.fs.FileType.File else None


def open_input(location: str | os.PathLike):
    """A binary file object for reading (no decompression)."""
    if not is_uri(location):
        return open(normalise(location), "rb")
    fs, path = resolve(location)
    return fs.open_input_stream(path, compression=None)


def read_bytes(location: str | os.PathLike) -> bytes:
    with open_input(location) as f:
        return f.read()


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location).decode("utf-8"))


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically: a temporary file renamed into place on local disk, one upload elsewhere."""
    if not is_uri(location):
        path = normalise(location)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def write_json(location: str | os.PathLike, obj: Any) -> None:
    write_bytes(location, json.dumps(obj, indent=1, sort_keys=False).encode("utf-8"))


def upload_file(local_path: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy a finished local file to ``location`` in one upload (or one rename, for a local destination)."""
    if not is_uri(location):
        dest = normalise(location)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(str(local_path), dest)
        return
    fs, path = resolve(location)
    with open(local_path, "rb") as src, fs.open_output_stream(path, compression=None) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


def list_dir(location: str | os.PathLike) -> dict[str, str]:
    """Direct entries of a folder, ``{name: "file" | "dir"}``; empty when the folder does not exist."""
    import pyarrow.fs

    if not is_uri(location):
        path = normalise(location)
        if not os.path.isdir(path):
            return {}
        return {e.name: "dir" if e.is_dir() else "file" for e in os.scandir(path)}
    fs, path = resolve(location)
    sel = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)
    out = {}
    for info in fs.get_file_info(sel):
        if info.type in (pyarrow.fs.FileType.File, pyarrow.fs.FileType.Directory):
            out[info.base_name] = "dir" if info.type == pyarrow.fs.FileType.Directory else "file"
    return out


def file_sizes(location: str | os.PathLike) -> dict[str, int]:
    """``{name: bytes}`` of the files directly in a folder (one listing; not cached); empty when none."""
    import pyarrow.fs

    if not is_uri(location):
        path = normalise(location)
        if not os.path.isdir(path):
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(path) if e.is_file()}
    fs, path = resolve(location)
    sel = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)
    return {info.base_name: info.size for info in fs.get_file_info(sel) if info.type == pyarrow.fs.FileType.File}


def list_files(location: str | os.PathLike, suffix: str = "") -> list[str]:
    """Paths relative to ``location`` ("/"-separated) of every file under it ending in ``suffix``, sorted."""
    import pyarrow.fs

    fs, path = resolve(location)
    sel = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True)
    base = path.rstrip("/") + "/"
    out = [info.path[len(base):] for info in fs.get_file_info(sel)
           if info.type == pyarrow.fs.FileType.File and info.path.endswith(suffix)]
    return sorted(out)


def delete_dir(location: str | os.PathLike) -> None:
    """Remove a folder and everything under it (nothing when it does not exist)."""
    if not is_uri(location):
        if os.path.isdir(normalise(location)):
            shutil.rmtree(normalise(location))
        return
    fs, path = resolve(location)
    if is_dir(location):
        fs.delete_dir(path)


# ------------------------------------------------------------------------------------------------ NIfTI

_GZIP_MAGIC = b"\x1f\x8b"


def _image_class(header_start: bytes):
    """NIfTI-1 or NIfTI-2 from ``sizeof_hdr`` (348 or 540, either byte order)."""
    import nibabel as nib

    if len(header_start) < 4:
        raise ValueError("not a NIfTI file: fewer than 4 bytes")
    for order in ("little", "big"):
        n = int.from_bytes(header_start[:4], order)
        if n == 348:
            return nib.Nifti1Image
        if n == 540:
            return nib.Nifti2Image
    raise ValueError("not a NIfTI file: sizeof_hdr is neither 348 nor 540")


def load_nifti(location: str | os.PathLike):
    """A nibabel image from a local path (``nibabel.load``) or a URI (read into memory, gunzipped, parsed)."""
    import nibabel as nib

    if not is_uri(location):
        return nib.load(location)
    data = read_bytes(location)
    try:
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
        return _image_class(data[:4]).from_bytes(data)
    except Exception as exc:  # noqa: BLE001 - name the file, as nibabel does for local ones
        raise ValueError(f"{redact(location)}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc


def nifti_shape(location: str | os.PathLike) -> tuple[int, ...]:
    """The array shape from the header alone (for a URI only the first bytes are read and unzipped)."""
    import nibabel as nib

    if not is_uri(location):
        return nib.load(location).shape
    fs, path = resolve(location)
    with fs.open_input_stream(path, compression=None) as f:
        gz = f.read(2) == _GZIP_MAGIC
    with fs.open_input_stream(path, compression="gzip" if gz else None) as f:
        data = f.read(540)
    return _image_class(data[:4]).header_class.from_fileobj(io.BytesIO(data)).get_data_shape()


def credential_env() -> dict[str, str]:
    """The storage credential variables set in this process (forwarded to Ray tasks' ``runtime_env``)."""
    return {k: os.environ[k] for k in _CREDENTIAL_VARS if os.environ.get(k)}


def task_runtime_env(*locations: str | os.PathLike) -> dict[str, Any] | None:
    """The ``runtime_env`` for Ray tasks that reach ``locations`` from their own processes (other nodes): the
    driver's storage credentials when any location is a URI; None when none is, or there is nothing to pass (a
    cluster with instance roles)."""
    env = credential_env() if any(is_uri(loc) for loc in locations) else {}
    return {"env_vars": env} if env else None
