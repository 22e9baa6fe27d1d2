"""The equal-work sampler (``data/sampler.py``): every rank the same z-length in every step, no row lost or trained
twice, deterministic and resumable; ranks simulated as threads with the collectives training uses."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from volvlp_ray.data.sampler import EqualTokenSampler, ThreadComm, equal_token_steps, load_carry, save_carry

B, PZ = 4, 4
DIGEST_ORGAN = "628112a1862d3219"  # organ-mode plans of run_epochs(3, "organ", 3) before data.chunks_per_volume existed


def _rows(rank: int, epoch: int, n: int, lo: int = 17, hi: int = 60) -> list[dict]:
    rng = np.random.default_rng([rank, epoch, 1])
    return [{"key": f"r{rank}e{epoch}i{i}", "depth": int(d)} for i, d in enumerate(rng.integers(lo, hi + 1, n))]


def _samplers(world: int, mode: str, **kw) -> list[EqualTokenSampler]:
    args = dict(pool_rows=kw.get("pool", 4) * B, max_pool=kw.get("max_pool", 12) * B, seed=0,
                chunks_per_row=kw.get("k", 1), overlap=kw.get("overlap", True))
    return [EqualTokenSampler(B, PZ, mode, (3, 10), rank=r, **args) for r in range(world)]


def run_epochs(world: int, mode: str, epochs: int, rows_per_rank: int = 40, samplers=None, carry=None,
               first_epoch: int = 0, skip: int = 0) -> tuple[list[list[list]], list[list]]:
    """Plans per epoch per rank (``skip`` plans of the first epoch dropped, as a resumed run does), and the final
    carries."""
    samplers = samplers or _samplers(world, mode)
    carry = carry or [[] for _ in range(world)]
    out = []
    for epoch in range(first_epoch, first_epoch + epochs):
        comm = ThreadComm(world)
        plans: list[list] = [[] for _ in range(world)]

        def run(r: int, epoch=epoch, comm=comm, plans=plans, carry=carry) -> None:
            gen = equal_token_steps(samplers[r], iter(_rows(r, epoch, rows_per_rank)), comm.for_rank(r), epoch,
                                    carry[r])
            plans[r] = list(gen)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        if epoch == first_epoch and skip:
            plans = [p[skip:] for p in plans]
        out.append(plans)
        carry = [list(s.pool) for s in samplers]
    return out, carry


@pytest.mark.parametrize("mode", ["report", "organ"])
@pytest.mark.parametrize("world", [1, 3])
def test_every_rank_same_length_every_step_and_no_row_lost(mode, world):
    epochs, per = 3, 40
    plans, carry = run_epochs(world, mode, epochs, per)
    seen: dict[str, int] = {}
    lengths = set()
    for ep in plans:
        assert len({len(p) for p in ep}) == 1  # every rank takes as many steps
        for step in zip(*ep):
            assert len({p.z_patches for p in step}) == 1  # one z-length on every rank
            lengths.add(step[0].z_patches)
            for p in step:
                assert len(p.rows) == len(p.starts) == B
                n = p.z_patches * PZ
                for row, start in zip(p.rows, p.starts):
                    d = row["depth"]
                    assert 0 <= start and start + n <= d  # a cut inside the volume, never padding
                    if p.kind == "exact":  # report mode: only the remainder (< PZ slices) is cropped
                        assert d // PZ == p.z_patches and start == (d % PZ) // 2
                    if mode == "organ":
                        assert 3 <= p.z_patches <= 10 and p.kind == "chunk"
                    seen[row["key"]] = seen.get(row["key"], 0) + 1
    assert len(lengths) >= 3, lengths  # the z-extent still varies from step to step
    assert all(v == 1 for v in seen.values())  # no row trained twice
    left = {r["key"] for c in carry for r in c}
    assert not (left & set(seen))
    everything = {r["key"] for rank in range(world) for e in range(epochs) for r in _rows(rank, e, per)}
    assert set(seen) | left == everything  # no row lost: trained, or carried into the next epoch
    if mode == "organ":
        assert sum(len(c) for c in carry) < world * B


def test_report_mode_crops_only_at_the_pool_cap():
    """With a pool cap too small for any depth group to fill a step on every rank, the sampler crops deeper
    volumes to a common length (counted) rather than stalling; with room it never does."""
    plans, _ = run_epochs(3, "report", 2)
    assert all(p.kind == "exact" and p.cropped == 0 for ep in plans for r in ep for p in r)
    tight = _samplers(3, "report", pool=1, max_pool=1)
    plans, _ = run_epochs(3, "report", 2, samplers=tight)
    kinds = {p.kind for ep in plans for r in ep for p in r}
    assert "fallback" in kinds
    for ep in plans:
        for step in zip(*ep):
            assert len({p.z_patches for p in step}) == 1
            for p in step:
                if p.kind == "fallback":
                    assert all(r["depth"] // PZ >= p.z_patches for r in p.rows)
                    assert p.cropped == sum(r["depth"] - r["depth"] % PZ - p.z_patches * PZ for r in p.rows)


def _summary(plans):
    return [[(p.kind, p.z_patches, tuple(p.starts), tuple(r["key"] for r in p.rows)) for p in rank] for rank in plans]


@pytest.mark.parametrize("mode", ["report", "organ"])
def test_deterministic_and_resumes_from_a_saved_carry(tmp_path, mode):
    """The same streams give the same steps; an epoch replayed from its saved carry (a resumed run: the carry
    goes through np.savez and back) and skipped by k steps continues exactly as the uninterrupted run."""
    world = 2
    ref, _ = run_epochs(world, mode, 3)
    again, _ = run_epochs(world, mode, 3)
    assert [_summary(e) for e in ref] == [_summary(e) for e in again]
    # the carry at the start of epoch 2, as the checkpoint saves it
    samplers = _samplers(world, mode)
    _, carry = run_epochs(world, mode, 2, samplers=samplers)
    for r in range(world):
        save_carry(tmp_path / f"carry_{r}.npz", carry[r])
    loaded = [load_carry(tmp_path / f"carry_{r}.npz") for r in range(world)]
    assert [[r["key"] for r in c] for c in loaded] == [[r["key"] for r in c] for c in carry]
    k = 2
    resumed, _ = run_epochs(world, mode, 1, samplers=_samplers(world, mode), carry=loaded, first_epoch=2, skip=k)
    assert _summary(resumed[0]) == [rank[k:] for rank in _summary(ref[2])]


@pytest.mark.parametrize("overlap", [True, False])
def test_several_chunks_of_each_volume_in_one_step(overlap):
    """``data.chunks_per_volume=2``: a rank's step holds B / 2 volumes, each as 2 consecutive chunks of the step's
    length (disjoint ones with ``overlap=False``), inside the volume, every rank the same length; every volume is
    trained in one step only, none lost; deterministic, and an epoch resumed from its saved carry continues
    exactly."""
    world, k, epochs, per = 3, 2, 3, 40
    plans, carry = run_epochs(world, "organ", epochs, per, samplers=_samplers(world, "organ", k=k, overlap=overlap))
    seen: dict[str, int] = {}
    disjoint_possible = False
    for ep in plans:
        assert len({len(p) for p in ep}) == 1
        for step in zip(*ep):
            assert len({p.z_patches for p in step}) == 1
            for p in step:
                assert len(p.rows) == len(p.starts) == B and p.kind == "chunk"
                n = p.z_patches * PZ
                for i in range(0, B, k):
                    group, starts = p.rows[i:i + k], p.starts[i:i + k]
                    assert all(r is group[0] for r in group)  # one volume, k chunks, consecutive
                    d = group[0]["depth"]
                    assert all(0 <= s0 and s0 + n <= d for s0 in starts)
                    if not overlap:
                        assert d >= k * n and all(b0 + n <= a0 for b0, a0 in zip(sorted(starts), sorted(starts)[1:]))
                    disjoint_possible |= len(set(starts)) == k
                    seen[group[0]["key"]] = seen.get(group[0]["key"], 0) + 1
    assert disjoint_possible
    assert all(v == 1 for v in seen.values())
    left = {r["key"] for c in carry for r in c}
    everything = {r["key"] for rank in range(world) for e in range(epochs) for r in _rows(rank, e, per)}
    assert not (left & set(seen)) and set(seen) | left == everything
    again, _ = run_epochs(world, "organ", epochs, per, samplers=_samplers(world, "organ", k=k, overlap=overlap))
    assert [_summary(e) for e in plans] == [_summary(e) for e in again]
    samplers = _samplers(world, "organ", k=k, overlap=overlap)
    _, carry = run_epochs(world, "organ", 2, per, samplers=samplers)
    resumed, _ = run_epochs(world, "organ", 1, per, samplers=_samplers(world, "organ", k=k, overlap=overlap),
                            carry=carry, first_epoch=2, skip=3)
    assert _summary(resumed[0]) == [rank[3:] for rank in _summary(plans[2])]


def test_one_chunk_per_volume_is_the_sampler_it_was():
    """``chunks_per_row=1`` (the default) draws what it drew before the option existed: the same rows, lengths and
    starts (a digest of the plans of 3 epochs on 3 ranks, recorded before the change)."""
    import hashlib

    plans, _ = run_epochs(3, "organ", 3)
    digest = hashlib.sha256(repr([_summary(e) for e in plans]).encode()).hexdigest()[:16]
    assert digest == DIGEST_ORGAN, digest


def test_carry_round_trip_without_pickle(tmp_path):
    rows = [{"key": "a_1", "depth": 12, "volume_location": "/s/x.tar", "volume_offset": 512,
             "volume_shape": np.array([12, 8, 8]), "input_ids": np.arange(5, dtype=np.int32), "organ_json": "{}",
             "volume": np.zeros((12, 8, 8), np.int16)},
            {"key": "b_22", "depth": 20, "volume_location": "/s/y.tar", "volume_offset": 1024,
             "volume_shape": np.array([20, 8, 8]), "input_ids": np.arange(5, 10, dtype=np.int32),
             "organ_json": '{"organs": {}}', "volume": np.ones((20, 8, 8), np.int16)}]
    save_carry(tmp_path / "c.npz", rows)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:  # every member is a plain array
        assert all(z[name].dtype != object for name in z.files)
    back = load_carry(tmp_path / "c.npz")
    assert len(back) == 2
    for a, b in zip(rows, back):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    save_carry(tmp_path / "e.npz", [])
    assert load_carry(tmp_path / "e.npz") == []


def test_sampler_rejects_rows_shallower_than_a_patch():
    s = _samplers(1, "report")[0]
    with pytest.raises(ValueError, match="fewer than the z patch"):
        s.add([{"key": "x", "depth": PZ - 1}])


class _Shard:
    """What ``TrainStream`` reads: ``iter_batches`` of an epoch (the epoch from the shuffle seed, as the loop
    passes ``seed + epoch + 1000 * rank``); whole-volume rows in report mode, voxels in the row."""

    def __init__(self, n: int = 37):
        self.n = n

    def iter_batches(self, batch_size, local_shuffle_seed, **_):
        epoch = local_shuffle_seed
        rng = np.random.default_rng([epoch, 5])
        depths = rng.integers(9, 30, self.n)
        rows = [{"key": f"e{epoch}_{i}", "volume": np.full((d, 2, 2), i, np.int16), "depth": int(d),
                 "labels": np.zeros(2, np.float32), "study_id": i, "z_origin_mm": np.float32(0),
                 "z_spacing_mm": np.float32(1.5), "input_ids": np.arange(3, dtype=np.int32),
                 "attention_mask": np.ones(3, np.int8), "text_truncated": False} for i, d in enumerate(depths)]
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            out = {k: np.array([r[k] for r in part]) for k in part[0] if k != "volume"}
            out["volume"] = np.empty(len(part), dtype=object)
            out["volume"][:] = [r["volume"] for r in part]
            yield out


def test_train_stream_resumes_from_any_step_with_the_carry_it_reports():
    """The loop saves the carry that comes with a batch when it checkpoints after it, while the producer thread may
    already be epochs ahead; a stream built from that carry, epoch and position continues with exactly the
    batches the uninterrupted stream gave. Also with epochs of a step or two (a small split), where the producer
    runs several epochs ahead."""
    from volvlp_ray.config import load_config
    from volvlp_ray.train.loop import TrainStream
    from volvlp_ray.train.producer import BatchProducer

    cfg = load_config(None, ["train.batch_size=4", "train.steps=30", "loss.negation_pairs=0", "data.shuffle_buffer=0",
                             "data.pool_batches=2", "data.max_pool_batches=4", "model.patch=[4,16,16]"])

    def batches(stream, record=None):
        out = []
        prod = BatchProducer(stream, lambda item: item, depth=2)
        for epoch, n, step, b, carry in prod:
            time.sleep(0.002)  # let the producer run ahead, into the next epochs
            out.append((epoch, n, step, tuple(b["key"]), b["volume"][0].shape[0]))
            if record is not None:
                record.append((epoch, n, [dict(r) for r in carry]))
        return out

    for rows_per_epoch in (37, 6):
        record: list = []
        shard = _Shard(rows_per_epoch)
        ref = batches(TrainStream(cfg, shard, None, None, 0, 1, first_step=0, epoch=0, skip=0, carry=None), record)
        assert len(ref) == 30 and len({e for e, *_ in ref}) >= 3
        for k in range(1, 30):
            epoch, n, carry = record[k - 1]  # a checkpoint after step k
            resumed = batches(TrainStream(cfg, shard, None, None, 0, 1, first_step=k, epoch=epoch, skip=n,
                                          carry=carry))
            assert resumed == ref[k:], (rows_per_epoch, k)
