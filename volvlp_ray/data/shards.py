"""WebDataset shards: writing (byte-sized tars, atomic), the manifest, and safe decoding of one sample.

A sample is three tar members sharing a key (the VolumeName without ``.nii.gz``):

    {key}.volume.npy   int16 HU, (D, H, W) = (z, y, x), RAS; saved with ``np.save`` (no pickle)
    {key}.report.txt   UTF-8 report text (findings, then impressions)
    {key}.meta.json    spacing, z origin, labels, organ z-extents (mm), organ-wise findings (and where each came
                       from: ``organs_from``, ``organ_findings_from``), source file

Each split folder holds ``shard-GGGGG-KK.tar`` files, ``manifest.json`` (every shard with its sample count,
bytes and sha256) and ``quarantine.json`` (what was left out, and why). The folder is local or any pyarrow
filesystem URI (``storage.py``): a tar bound for an object store is written to a local temporary file and
uploaded once complete, so no reader sees part of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from volvlp_ray.data import storage

__all__ = [
    "DecodeError",
    "ShardSpec",
    "VolumeRef",
    "decode_sample",
    "encode_sample",
    "intact_shards",
    "npy_header",
    "npy_view",
    "read_manifest",
    "write_group_shards",
]


class DecodeError(ValueError):
    """A shard sample that cannot be used (undecodable array, bad text, missing member)."""


log = logging.getLogger(__name__)

ShardSpec = dict  # {"name": str, "samples": int, "bytes": int, "sha256": str}


CORE_MEMBERS: tuple[str, ...] = ("meta.json", "report.txt", "volume.npy")
"""The members every sample has (what training, evaluation and validation read)."""
LABELMAP_MEMBER = "labelmap.npy"
"""The optional organ label map member: uint8 (D, H, W) class indices (``labelmaps.SEG_CLASSES``), the volume's
grid; read only by the segmentation job (other readers skip it with a seek)."""


def encode_sample(key: str, volume: np.ndarray, report: str, meta: dict,
                  labelmap: np.ndarray | None = None) -> list[tuple[str, bytes]]:
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.'")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(volume, dtype=np.int16), allow_pickle=False)
    members = [
        (f"{key}.meta.json", json.dumps(meta).encode("utf-8")),
        (f"{key}.report.txt", report.encode("utf-8")),
        (f"{key}.volume.npy", buf.getvalue()),
    ]
    if labelmap is not None:
        if labelmap.shape != volume.shape:
            raise ValueError(f"{key}: label map shape {labelmap.shape} differs from the volume's {volume.shape}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(labelmap, dtype=np.uint8), allow_pickle=False)
        members.append((f"{key}.{LABELMAP_MEMBER}", buf.getvalue()))
    return members


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_group_shards(
    out_dir: str | os.PathLike,
    group: int,
    samples: Iterable[list[tuple[str, bytes]]],
    max_bytes: int,
) -> list[ShardSpec]:
    """Write encoded samples into ``shard-{group:05d}-{k:02d}.tar`` files of about ``max_bytes`` each.

    Every tar is written under a temporary name and renamed into place when complete, so a reader (or a
    rerun after a crash) never sees a partial shard. ``out_dir`` may be a URI: the tar is then written to a
    local temporary folder and uploaded in one piece when complete.
    """
    remote = storage.is_uri(out_dir)
    if remote:
        staging = Path(tempfile.mkdtemp(prefix=f"shard-{group:05d}-"))
    else:
        out_dir = staging = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".shard-{group:05d}-*.tmp"):
            stale.unlink()
    specs: list[ShardSpec] = []
    state: dict[str, Any] = {"tar": None}

    def close() -> None:
        if state["tar"] is None:
            return
        state["tar"].close()
        state["file"].close()
        done = state["tmp"]
        spec = {"name": state["name"], "samples": state["n"], "bytes": done.stat().st_size, "sha256": _sha256(done)}
        if remote:
            storage.upload_file(done, storage.child(str(out_dir), state["name"]))
            done.unlink()
        else:
            os.replace(done, out_dir / state["name"])
        specs.append(spec)
        state["tar"] = None

    try:
        for members in samples:
            if state["tar"] is not None and state["bytes"] >= max_bytes:
                close()
            if state["tar"] is None:
                name = f"shard-{group:05d}-{len(specs):02d}.tar"
                tmp = staging / f".shard-{group:05d}-{len(specs):02d}.{uuid.uuid4().hex[:8]}.tmp"
                f = open(tmp, "wb")
                state.update(tar=tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT), file=f, tmp=tmp,
                             name=name, n=0, bytes=0)
            for fname, data in members:
                info = tarfile.TarInfo(fname)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                state["tar"].addfile(info, io.BytesIO(data))
                state["bytes"] += len(data) + 1024
            state["n"] += 1
        close()
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)
    return specs


def read_manifest(split_dir: str | os.PathLike) -> dict:
    """The split's ``manifest.json`` (``split_dir`` local or a URI)."""
    path = storage.child(str(split_dir), "manifest.json")
    if not storage.is_file(path):
        raise FileNotFoundError(f"no shard manifest at {storage.redact(path)}; run jobs/prepare_data.py first")
    return storage.read_json(path)


def intact_shards(split_dir: str | os.PathLike) -> list[str]:
    """Locations of the manifest's shards that exist with the size the manifest records (``split_dir`` local
    or a URI; the shards' locations keep the URI's options).

    A missing or truncated tar would make the reader fail the whole stream (a tar read error is no bad
    sample), so each one is logged as an error and left out; the samples of every other shard stay. One
    ``stat`` per shard (one listing on an object store): a full sha256 check is ``prepare_data``'s business,
    not every training start's.
    """
    split_dir = storage.normalise(split_dir)
    sizes = storage.file_sizes(split_dir)
    good = []
    for spec in read_manifest(split_dir)["shards"]:
        path = storage.child(split_dir, spec["name"])
        size = sizes.get(spec["name"])
        if size is None or ("bytes" in spec and size != spec["bytes"]):
            found = "missing" if size is None else f"{size} bytes"
            log.error("skipping shard %s: %s, the manifest says %s bytes (%s samples lost); rerun "
                      "jobs/prepare_data.py to rebuild it", storage.redact(path), found, spec.get("bytes"),
                      spec.get("samples"))
            continue
        good.append(path)
    if not good:
        raise FileNotFoundError(f"no intact shard in {storage.redact(split_dir)}: every shard is missing or "
                                "truncated")
    return good


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """``(shape, fortran_order, dtype, payload offset)`` of an ``.npy`` file that starts with ``data``, or None
    for a format version other than 1.0 and 2.0. ``ValueError`` for anything that is no ``.npy`` header or
    declares an object dtype (nothing is unpickled)."""
    fmt = np.lib.format
    head = io.BytesIO(data[:65536 + 16])
    version = fmt.read_magic(head)
    if version not in ((1, 0), (2, 0)):
        return None
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran_order, dtype = read_header(head)
    if dtype.hasobject:
        raise ValueError("object arrays are not loaded (they would be unpickled)")
    return tuple(shape), fortran_order, dtype, head.tell()


def npy_view(data: bytes) -> np.ndarray:
    """The array of an ``.npy`` payload as a read-only view of ``data`` (``np.load`` copies it).

    ``np.load``'s checks: the format version, no object dtype (nothing is unpickled), and a payload as long
    as the header's shape says (``ValueError`` otherwise). A Fortran-ordered or version-3 file goes through
    ``np.load(..., allow_pickle=False)`` instead."""
    header = npy_header(data)
    if header is None or header[1]:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape, _, dtype, offset = header
    count = _check_payload(len(data) - offset, shape, dtype)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _check_payload(payload: int, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The element count of ``shape``; ``ValueError`` when ``payload`` bytes are fewer than it needs."""
    count = int(np.prod(shape, dtype=np.int64))
    if payload < count * dtype.itemsize:
        raise ValueError(f"payload has {payload} bytes, shape {shape} of {dtype} needs {count * dtype.itemsize}")
    return count


class VolumeRef:
    """Where an int16 (D, H, W) volume lies in a shard, without its bytes (``data.volume_transport=direct``):
    ``location`` (a local path or URI, ``storage.py``), ``offset`` (the byte of voxel [0, 0, 0]) and ``shape``.
    Slicing the depth (``ref[a:b]``) gives the reference of those slices; ``reader.read_volumes`` reads them."""

    __slots__ = ("location", "offset", "shape")
    dtype = np.dtype("<i2")

    def __init__(self, location: str, offset: int, shape: tuple[int, int, int]):
        self.location, self.offset, self.shape = location, int(offset), tuple(int(n) for n in shape)

    def __getitem__(self, index: slice) -> "VolumeRef":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"a VolumeRef takes a contiguous depth slice, not {index!r}")
        start, stop, _ = index.indices(self.shape[0])
        stop = max(start, stop)
        d, h, w = self.shape
        return VolumeRef(self.location, self.offset + start * h * w * self.dtype.itemsize, (stop - start, h, w))

    def __repr__(self) -> str:
        return f"VolumeRef({storage.redact(self.location)!r}, offset={self.offset}, shape={self.shape})"


def _volume_ref(row: dict[str, Any], location: str) -> VolumeRef:
    """The :class:`VolumeRef` of a row whose ``volume.npy`` member was read as its header only (``reader``'s
    ``refs``: ``volume.npy`` holds the member's first bytes, ``volume.npy.offset``/``.size`` where it lies)."""
    header = npy_header(row["volume.npy"])
    if header is None or header[1]:
        raise ValueError("direct volume reads need a C-ordered .npy of format 1.0 or 2.0 (as prepare_data writes)")
    shape, _, dtype, start = header
    if dtype != VolumeRef.dtype:
        raise ValueError(f"direct volume reads need int16 volumes (as prepare_data writes), got {dtype}")
    _check_payload(int(row["volume.npy.size"]) - start, shape, dtype)  # the shape is checked by decode_sample
    return VolumeRef(location, int(row["volume.npy.offset"]) + start, shape)


def decode_sample(row: dict[str, Any], location: str | None = None) -> dict[str, Any]:
    """Raw tar members (bytes) -> ``volume`` (int16 ndarray), ``report`` (str), ``meta`` (dict).

    Never unpickles (``npy_view``); the volume is a read-only view of the member's bytes, or, for a row read
    with ``volume.npy`` as a reference (``volume.npy.offset`` present), a :class:`VolumeRef` into the shard at
    ``location`` (default the row's ``__url__``). Raises :class:`DecodeError` with the key and the reason for
    anything unusable.
    """
    key = row.get("__key__", "?")
    for member in ("volume.npy", "report.txt", "meta.json"):
        if row.get(member) is None:
            raise DecodeError(f"{key}: missing member {member}")
    try:
        if "volume.npy.offset" in row:
            volume = _volume_ref(row, location or row["__url__"])
        else:
            volume = npy_view(row["volume.npy"])
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad sample
        raise DecodeError(f"{key}: undecodable volume.npy ({type(exc).__name__}: {exc})") from exc
    if len(volume.shape) != 3 or 0 in volume.shape:
        raise DecodeError(f"{key}: volume has shape {volume.shape}, expected (D>0, H, W)")
    if not np.issubdtype(volume.dtype, np.integer):
        if not np.isfinite(volume).all():
            raise DecodeError(f"{key}: volume has non-finite voxels")
    try:
        report = row["report.txt"].decode("utf-8") if isinstance(row["report.txt"], bytes) else str(row["report.txt"])
        meta = json.loads(row["meta.json"]) if isinstance(row["meta.json"], (bytes, str)) else dict(row["meta.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"{key}: undecodable text member ({exc})") from exc
    if not report.strip():
        raise DecodeError(f"{key}: empty report")
    return {"key": key, "volume": volume, "report": report, "meta": meta}
