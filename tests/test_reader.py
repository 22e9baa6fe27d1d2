"""The shard reader (``data/reader.py``) against references: ``tarfile`` for the tar parsing, Ray Data's own
``read_webdataset`` for the rows, ``np.load`` for the ``.npy`` views."""

import io
import tarfile

import numpy as np
import pytest

from volvlp_ray.data.reader import MemberRef, ShardReadError, iter_members, iter_samples, read_shards
from volvlp_ray.data.shards import npy_view


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("a_dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]


MEMBERS = [
    ("s1.volume.npy", bytes(range(256)) * 5),
    ("s1.report.txt", "Findings: none.".encode()),
    ("s1.meta.json", b"{}"),
    ("s2.volume.npy", b""),  # empty member
    ("s2.report.txt", b"x" * 512),  # exactly one record, no padding
    ("deep/" + "d" * 120 + "/s3.report.txt", "Ünïcode näme".encode()),  # a name past ustar's 100 + 155 split
    ("s4.report.txt", b"y" * 1000),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_equal_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    data = _tar(members, fmt)
    got = list(iter_members(io.BytesIO(data), "t.tar"))
    assert got == _reference(data) == members


class _Trickle(io.BytesIO):
    """A stream that returns at most 300 bytes per read, as a network stream may."""

    def read(self, n=-1):
        return super().read(min(n, 300) if n and n > 0 else n)


def test_short_reads_are_completed():
    data = _tar(MEMBERS[:5])
    assert list(iter_members(_Trickle(data))) == _reference(data)


def test_pax_size_and_global_headers_are_applied():
    """A pax ``size`` record overrides the ustar field (as for members past 8 GiB); a global header is skipped."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as t:
        info = tarfile.TarInfo("k.report.txt")
        info.size = 700
        info.pax_headers = {"size": "700", "comment": "per file"}
        t.addfile(info, io.BytesIO(b"z" * 700))
    assert list(iter_members(io.BytesIO(buf.getvalue()))) == [("k.report.txt", b"z" * 700)]


def test_damaged_tars_raise_with_the_offset():
    data = _tar(MEMBERS[:3])
    with pytest.raises(ShardReadError, match=r"t\.tar: truncated tar: member 's1\.volume\.npy' at byte 512"):
        list(iter_members(io.BytesIO(data[:900]), "t.tar"))
    with pytest.raises(ShardReadError, match="truncated tar: header at byte"):
        list(iter_members(io.BytesIO(data[:2048 + 100]), "t.tar"))
    bad = bytearray(data)
    bad[2048 + 10] ^= 0xFF  # a byte of the second header's name: its checksum no longer matches
    with pytest.raises(ShardReadError, match="bad tar header at byte 2048"):
        list(iter_members(io.BytesIO(bytes(bad)), "t.tar"))
    # a tar cut exactly after a member (no end-of-archive records) is read to there, as tarfile does
    assert [n for n, _ in iter_members(io.BytesIO(data[:2048]))] == ["s1.volume.npy"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_by_reference_point_at_their_bytes(fmt):
    """``refs``: a member comes as where its data lies (and its first bytes), the others as they are."""
    big = ("deep/" + "e" * 120 + "/s5.volume.npy", bytes(range(7, 250)) * 40)  # a long name, > 4096 bytes
    members = [m for m in [*MEMBERS, big] if fmt != tarfile.USTAR_FORMAT or len(m[0]) < 100]
    data = _tar(members, fmt)
    got = list(iter_members(io.BytesIO(data), "t.tar", refs=("volume.npy",)))
    assert [n for n, _ in got] == [n for n, _ in members]
    for (name, value), (_, ref_bytes) in zip(got, members):
        if name.endswith(".volume.npy"):
            assert isinstance(value, MemberRef) and value.size == len(ref_bytes)
            assert data[value.offset:value.offset + value.size] == ref_bytes
            assert value.head == ref_bytes[:4096]
        else:
            assert value == ref_bytes
    sample = next(iter_samples(io.BytesIO(data), "t.tar", refs=("volume.npy",)))
    assert sample["volume.npy"] == MEMBERS[0][1] and sample["volume.npy.size"] == len(MEMBERS[0][1])
    assert data[sample["volume.npy.offset"]:][:len(MEMBERS[0][1])] == MEMBERS[0][1]
    # a member cut short is an error here too, although its bytes are not read
    with pytest.raises(ShardReadError, match=r"truncated tar: member 's1\.volume\.npy' at byte 512 .* ends at byte 900"):
        list(iter_members(io.BytesIO(data[:900]), "t.tar", refs=("volume.npy",)))


def test_samples_group_adjacent_members():
    data = _tar(MEMBERS[:5])
    samples = list(iter_samples(io.BytesIO(data), "u"))
    assert samples == [
        {"__key__": "s1", "volume.npy": MEMBERS[0][1], "report.txt": MEMBERS[1][1], "meta.json": b"{}", "__url__": "u"},
        {"__key__": "s2", "volume.npy": b"", "report.txt": b"x" * 512, "__url__": "u"},
    ]
    assert [s.keys() for s in iter_samples(io.BytesIO(data), "u", suffixes=["report.txt"])] == [
        {"__key__", "report.txt", "__url__"}] * 2
    with pytest.raises(ValueError, match="'s1' are not adjacent"):
        list(iter_samples(io.BytesIO(_tar([MEMBERS[0], MEMBERS[3], MEMBERS[1]])), "u"))
    with pytest.raises(ValueError, match="'s1' has two 'report.txt' members"):
        list(iter_samples(io.BytesIO(_tar([MEMBERS[1], MEMBERS[1]])), "u"))


@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 1000,
    np.linspace(-1, 1, 30, dtype=np.float32).reshape(5, 6),
    np.zeros((0, 4, 4), dtype=np.int16),
    np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)),
    np.array(7, dtype=np.uint8),
])
def test_npy_view_equals_np_load(array):
    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    view = npy_view(data)
    ref = np.load(io.BytesIO(data), allow_pickle=False)
    assert view.dtype == ref.dtype and view.shape == ref.shape and np.array_equal(view, ref)
    if array.flags.c_contiguous and array.size:
        assert not view.flags.writeable and np.shares_memory(view, np.frombuffer(data, np.uint8))  # no copy


def test_npy_view_refuses_what_np_load_refuses():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        npy_view(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), np.int16))
    with pytest.raises(ValueError, match="payload has 24 bytes"):
        npy_view(buf.getvalue()[:-8])
    with pytest.raises(ValueError):
        npy_view(b"not an npy file at all")


def test_read_shards_gives_read_webdatasets_rows(ray_session, tmp_path):
    """Ray Data rows from real shards: the same as ``ray.data.read_webdataset(decoder=None)``, with and without
    a suffix filter, across several read tasks."""
    import ray.data

    from volvlp_ray.data.shards import encode_sample

    files = []
    rng = np.random.default_rng(0)
    for s in range(3):
        members = []
        for i in range(4):
            key = f"train_{s}_{i}_a_1"
            vol = rng.integers(-1000, 1000, size=(int(rng.integers(2, 9)), 8, 8), dtype=np.int16)
            members += encode_sample(key, vol, f"report {s} {i}", {"s": s})
        path = tmp_path / f"shard-{s:05d}-00.tar"
        path.write_bytes(_tar(members))
        files.append(str(path))

    def rows(ds):
        return {r["__key__"]: {k: bytes(v) if isinstance(v, (bytes, bytearray)) else v for k, v in r.items()}
                for r in ds.iter_rows()}

    for suffixes in (None, ["report.txt"]):
        ours = rows(read_shards(files, suffixes=suffixes, override_num_blocks=3))
        ref = rows(ray.data.read_webdataset(files, decoder=None, suffixes=suffixes))
        assert len(ours) == 12 and ours == ref
