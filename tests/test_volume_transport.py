"""``data.volume_transport=direct``: the rows carry where each volume's slices lie in its shard, and ``collate``
reads them into a reused batch buffer. Checked against the object-store path (``object_store``), which carries
the voxels through Ray Data: the same batches, bitwise."""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch

from volvlp_ray.config import ConfigError, load_config
from volvlp_ray.data import pipeline
from volvlp_ray.data.ctrate import LABELS
from volvlp_ray.data.pipeline import _ToRow, collate, normalise_tensor
from volvlp_ray.data.reader import ShardReadError, iter_samples, read_volumes
from volvlp_ray.data.shards import VolumeRef, encode_sample
from volvlp_ray.models import build_tokenizer

REPORT = "The heart is enlarged. No pleural effusion. Liver normal."
WINDOW = (-160.0, 240.0)
# per-row chunks (data.sampler=bucket); test_equal_sampler_batches_* covers the cut at batch time
COMMON = ["model.patch=[4,16,16]", "data.in_plane_size=16", f"data.hu_window=[{WINDOW[0]},{WINDOW[1]}]",
          "data.chunk_depth=[4,12]", "data.sampler=bucket"]


def _write_shard(path, depths, seed=0, dtype=np.int16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    volumes = {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for i, d in enumerate(depths):
            key = f"train_{seed * 10 + i}_a_1"
            vol = rng.integers(-1500, 2500, size=(d, 16, 16)).astype(np.int16)
            volumes[key] = vol
            meta = {"labels": [i % 2] * len(LABELS), "spacing": [1.5, 6.0, 6.0], "z_origin_mm": -10.0 * i,
                    "organs": {"heart": [0.0, 9.0], "liver": [12.0, 30.0]},
                    "organ_findings": {"heart": "The heart is enlarged.", "liver": "Liver normal."},
                    "impressions": "Cardiomegaly."}
            for name, data in encode_sample(key, vol, REPORT, meta):
                if name.endswith(".npy") and dtype != np.int16:
                    buf = io.BytesIO()
                    np.save(buf, vol.astype(dtype))
                    data = buf.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return volumes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    build_tokenizer([REPORT] * 10, vocab_size=120).save_pretrained(path)
    return str(path)


def _rows(shard: str, cfg, tokenizer: str, refs: bool) -> list[dict]:
    pipeline._counter = itertools.count()  # organ mode draws its chunks from (seed, key, row count)
    to_row = _ToRow(cfg, tokenizer, training=True, locations={shard: shard} if refs else None)
    with open(shard, "rb") as f:
        return [r for s in iter_samples(f, shard, refs=("volume.npy",) if refs else ()) for r in to_row(s)]


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        if k == "volume":
            out[k] = np.empty(len(rows), dtype=object)
            out[k][:] = [r[k] for r in rows]
        else:
            out[k] = np.array([r[k] for r in rows])
    return out


@pytest.mark.parametrize("text_mode", ["report", "organ"])
def test_direct_batches_equal_object_store_batches(tmp_path, tokenizer, text_mode):
    shard = str(tmp_path / "shard-00000-00.tar")
    volumes = _write_shard(shard, (9, 13, 4, 21, 16))
    cfg = load_config(None, [*COMMON, f"data.text_mode={text_mode}"])
    direct, carried = _rows(shard, cfg, tokenizer, refs=True), _rows(shard, cfg, tokenizer, refs=False)
    assert len(direct) == len(carried) == 5
    assert "volume" not in direct[0] and {"volume_location", "volume_offset", "volume_shape"} <= set(direct[0])
    if text_mode == "organ":  # chunks: the reference points at the chunk's first slice
        assert any(r["depth"] < len(volumes[r["key"]]) for r in direct)
    for hu in (True, False):
        for part in (slice(0, 2), slice(2, 5)):
            a, b = collate(_batch(direct[part]), 4, WINDOW, hu=hu), collate(_batch(carried[part]), 4, WINDOW, hu=hu)
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (k, hu)
            if hu:
                assert a["volume"].dtype == torch.int16
                assert torch.equal(normalise_tensor(a["volume"], WINDOW),
                                   collate(_batch(carried[part]), 4, WINDOW)["volume"])
    # and the slices are the stored ones (not only equal between the two paths)
    for r in direct:
        ref = VolumeRef(shard, r["volume_offset"], tuple(r["volume_shape"]))
        out = np.zeros((1, *ref.shape), np.int16)
        read_volumes([ref], out)
        vol = volumes[r["key"]]
        assert any(np.array_equal(vol[z:z + ref.shape[0]], out[0]) for z in range(len(vol) - ref.shape[0] + 1))


@pytest.mark.parametrize("text_mode", ["report", "organ"])
def test_equal_sampler_batches_direct_equal_object_store(tmp_path, tokenizer, text_mode):
    """data.sampler=equal: whole-volume rows, cut at batch time (``StepBatcher``) to the step's length; the two
    transports give the same batches bitwise, the slices are the stored ones at the planned offsets, nothing is
    padded, and organ mode's text is the chunk's organ-wise text."""
    from transformers import AutoTokenizer

    from volvlp_ray.data.organs import chunk_text
    from volvlp_ray.data.pipeline import StepBatcher
    from volvlp_ray.data.sampler import EqualTokenSampler, LocalComm, equal_token_steps

    shard = str(tmp_path / "shard-00000-00.tar")
    volumes = _write_shard(shard, (9, 13, 14, 21, 16, 15, 12, 8))
    cfg = load_config(None, [*COMMON, "data.sampler=equal", f"data.text_mode={text_mode}"])
    direct, carried = _rows(shard, cfg, tokenizer, refs=True), _rows(shard, cfg, tokenizer, refs=False)
    assert [r["depth"] for r in direct] == [len(v) for v in volumes.values()]  # whole volumes
    batcher = StepBatcher(cfg, AutoTokenizer.from_pretrained(tokenizer))

    def plans(rows):
        s = EqualTokenSampler(2, 4, text_mode, (1, 3), pool_rows=8, max_pool=8, seed=0, rank=0)
        return list(equal_token_steps(s, iter(rows), LocalComm(), 0))

    pd, pc = plans(direct), plans(carried)
    assert len(pd) == len(pc) >= 3
    for a_plan, b_plan in zip(pd, pc):
        a_np, b_np = batcher(a_plan), batcher(b_plan)
        a, b = collate(a_np, 4, WINDOW, hu=True), collate(b_np, 4, WINDOW, hu=True)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        n = a_plan.z_patches * 4
        assert a["volume"].shape[2] == n and (a["depths"] == n).all()  # no padding
        for i, (row, start) in enumerate(zip(a_plan.rows, a_plan.starts)):
            assert np.array_equal(a["volume"][i, 0].numpy(), volumes[row["key"]][start:start + n])
            if text_mode == "organ":
                z0, sz = -10.0 * int(row["key"].split("_")[1]), 1.5
                want = chunk_text({"heart": "The heart is enlarged.", "liver": "Liver normal."},
                                  {"heart": [0.0, 9.0], "liver": [12.0, 30.0]},
                                  (z0 + (start - 0.5) * sz, z0 + (start + n - 0.5) * sz))
                ids = batcher.tokenizer(want, max_length=cfg.data.max_text_length, truncation=True,
                                        padding="max_length")["input_ids"]
                assert a["input_ids"][i].tolist() == ids
                assert float(a_np["z_center_mm"][i]) == pytest.approx(z0 + (start + n / 2 - 0.5) * sz)


def test_volume_ref_slices_and_reads(tmp_path):
    shard = str(tmp_path / "s.tar")
    volumes = _write_shard(shard, (10, 7))
    with open(shard, "rb") as f:
        samples = list(iter_samples(f, shard, refs=("volume.npy",)))
    from volvlp_ray.data.shards import decode_sample

    refs = [decode_sample(s)["volume"] for s in samples]
    assert [r.shape for r in refs] == [(10, 16, 16), (7, 16, 16)] and all(isinstance(r, VolumeRef) for r in refs)
    out = np.full((2, 12, 16, 16), 99, np.int16)
    read_volumes([refs[0][3:8], refs[1][5:]], out)
    assert np.array_equal(out[0, :5], volumes["train_0_a_1"][3:8]) and (out[0, 5:] == 99).all()
    assert np.array_equal(out[1, :2], volumes["train_1_a_1"][5:]) and (out[1, 2:] == 99).all()
    assert refs[0][4:2].shape == (0, 16, 16)
    with pytest.raises(TypeError):
        refs[0][::2]
    with pytest.raises(ValueError, match="does not fit"):
        read_volumes([refs[0]], np.zeros((1, 9, 16, 16), np.int16))


def test_batch_buffer_is_reused_only_once_nothing_refers_to_it(tmp_path, tokenizer):
    shard = str(tmp_path / "shard.tar")
    _write_shard(shard, (8, 8, 8, 8))
    cfg = load_config(None, COMMON)
    rows = _rows(shard, cfg, tokenizer, refs=True)
    batch = _batch(rows[:2])
    pipeline._buffers = pipeline._BatchBuffers(keep=2)
    first = collate(batch, 4, WINDOW, hu=True)["volume"]
    expected = first.clone()
    second = collate(batch, 4, WINDOW, hu=True)["volume"]
    assert second.data_ptr() != first.data_ptr()  # the first batch is alive: not overwritten
    view = first[1]
    del first
    third = collate(_batch(rows[2:]), 4, WINDOW, hu=True)["volume"]  # a view of the first is alive, too
    assert third.data_ptr() not in (view.data_ptr() - view.stride(0) * 2, second.data_ptr())
    assert torch.equal(view, expected[1])
    ptr = view.data_ptr() - expected[1].numel() * 2
    del view, third
    again = collate(batch, 4, WINDOW, hu=True)["volume"]
    assert again.data_ptr() == ptr and torch.equal(again, expected)  # free again: reused, and refilled


def test_a_shard_shorter_than_its_rows_say_is_an_error(tmp_path, tokenizer):
    shard = tmp_path / "shard.tar"
    _write_shard(shard, (8, 8))
    rows = _rows(str(shard), load_config(None, COMMON), tokenizer, refs=True)
    data = shard.read_bytes()
    shard.write_bytes(data[: rows[1]["volume_offset"] + 100])  # rewritten, shorter, during the run
    with pytest.raises(ShardReadError, match="shard.tar: a volume at byte .* wants 4096 bytes, the shard gave 100"):
        collate(_batch(rows[1:]), 4, WINDOW, hu=True)
    with pytest.raises(ShardReadError, match="truncated tar"):  # and the reader sees the member cut short
        with open(shard, "rb") as f:
            list(iter_samples(f, str(shard), refs=("volume.npy",)))


def test_a_volume_that_is_not_int16_is_skipped_with_a_reason(tmp_path, tokenizer, caplog):
    shard = str(tmp_path / "shard.tar")
    _write_shard(shard, (8,), dtype=np.float32)
    with caplog.at_level("WARNING"):
        assert _rows(shard, load_config(None, COMMON), tokenizer, refs=True) == []
    assert "direct volume reads need int16 volumes" in caplog.text
    assert len(_rows(shard, load_config(None, COMMON), tokenizer, refs=False)) == 1  # the object-store path reads it


def test_direct_needs_the_shard_reader_and_device_normalisation():
    assert load_config(None, []).data.volume_transport == "direct"
    for other in ("data.reader=webdataset", "data.normalise_in=loader"):
        with pytest.raises(ConfigError, match="volume_transport=direct"):
            load_config(None, [other])
        load_config(None, [other, "data.volume_transport=object_store"])
    with pytest.raises(ConfigError, match="volume_transport"):
        load_config(None, ["data.volume_transport=plasma"])




def test_the_training_stream_is_the_same_whatever_the_transport_and_task_grouping(ray_session, tmp_path, tokenizer):
    """Through Ray Data, deterministic, two passes (epochs): one read task per shard or a few shards per task,
    voxels carried or read by collate: the same rows in the same order, the same batches."""
    from volvlp_ray.data import storage
    from volvlp_ray.data.pipeline import build_dataset

    split = tmp_path / "shards" / "train"
    split.mkdir(parents=True)
    specs = []
    for g in range(5):
        path = split / f"shard-{g:05d}-00.tar"
        _write_shard(path, (5 + g, 9, 4 + 2 * g), seed=g)
        specs.append({"name": path.name, "samples": 3, "bytes": path.stat().st_size})
    storage.write_json(split / "manifest.json", {"shards": specs})
    streams = {}
    for name, extra in (("object_store", ["data.volume_transport=object_store"]),
                        ("direct, a task per shard", ["data.samples_per_read_task=0"]),
                        ("direct, 2 tasks", ["data.samples_per_read_task=8"])):
        cfg = load_config(None, [*COMMON, f"data.shards_dir={tmp_path / 'shards'}", "seed=3", *extra])
        ds = build_dataset(cfg, "train", tokenizer, training=True)
        ds.context.execution_options.preserve_order = True  # what data.deterministic sets (DataConfig)
        passes = []
        for _ in range(2):
            batches = [collate(b, 4, WINDOW, hu=True) for b in ds.iter_batches(batch_size=4, batch_format="numpy")]
            passes.append((torch.cat([b["study_id"] for b in batches]), [b["volume"].clone() for b in batches]))
        streams[name] = passes
    ref = streams.pop("object_store")
    assert not torch.equal(ref[0][0], ref[1][0])  # each pass has its own file order
    for name, passes in streams.items():
        for (ids, vols), (ref_ids, ref_vols) in zip(passes, ref):
            assert torch.equal(ids, ref_ids), name
            assert all(torch.equal(a, b) for a, b in zip(vols, ref_vols)), name
