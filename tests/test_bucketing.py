"""Depth bucketing: every row once, same batch count as drop_last, less padding, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from volvlp_ray.data.bucketing import bucket_by_depth, padding_fraction, rebatch


def stream(n_rows: int, pool_rows: int, seed: int = 0, equal_shapes: bool = False):
    rng = np.random.default_rng(seed)
    depths = rng.integers(25, 42, size=n_rows)
    for start in range(0, n_rows, pool_rows):
        d = depths[start:start + pool_rows]
        vols = np.empty(len(d), dtype=object)
        for i, x in enumerate(d):
            vols[i] = np.full((8 if equal_shapes else int(x), 2, 2), start + i, dtype=np.int16)
        yield {"volume": vols, "depth": d, "key": np.asarray([f"k{start + i}" for i in range(len(d))]),
               "input_ids": np.arange(start, start + len(d))[:, None].repeat(3, 1)}


@pytest.mark.parametrize("n_rows", [512, 500, 13])
def test_every_row_once_and_drop_last_batch_count(n_rows):
    b, pool = 16, 4
    out = list(bucket_by_depth(stream(n_rows, b * pool), b, np.random.default_rng(1)))
    assert len(out) == n_rows // b and all(len(x["depth"]) == b for x in out)
    keys = np.concatenate([x["key"] for x in out]) if out else np.array([])
    assert len(set(keys)) == len(keys) == n_rows // b * b
    for x in out:  # columns stay aligned row by row
        ids = x["input_ids"][:, 0]
        assert [k for k in x["key"]] == [f"k{i}" for i in ids]
        assert all(v[0, 0, 0] == i and v.shape[0] == d for v, i, d in zip(x["volume"], ids, x["depth"]))


def test_bucketing_cuts_padding():
    b, pool, pz = 16, 4, 4
    plain = [padding_fraction(p["depth"][i:i + b], pz) for p in stream(2048, b * pool) for i in range(0, b * pool, b)]
    bucketed = [padding_fraction(x["depth"], pz) for x in bucket_by_depth(stream(2048, b * pool), b,
                                                                           np.random.default_rng(0))]
    assert np.mean(plain) > 0.12 and np.mean(bucketed) < 0.08  # 7 to 11 z tokens, 4 batches per pool


def test_deterministic_and_order_shuffled():
    a = [x["key"].tolist() for x in bucket_by_depth(stream(256, 64), 16, np.random.default_rng(7))]
    b = [x["key"].tolist() for x in bucket_by_depth(stream(256, 64), 16, np.random.default_rng(7))]
    c = [x["key"].tolist() for x in bucket_by_depth(stream(256, 64), 16, np.random.default_rng(8))]
    assert a == b and a != c
    # within a pool, batches do not come out shallowest-first every time
    first_depth = [np.median(x["depth"]) for x in bucket_by_depth(stream(1024, 64), 16, np.random.default_rng(7))]
    assert any(first_depth[i] > first_depth[i + 1] for i in range(0, len(first_depth), 4))


def test_equal_shapes_and_errors():
    out = list(bucket_by_depth(stream(64, 64, equal_shapes=True), 16, np.random.default_rng(0)))
    assert len(out) == 4
    with pytest.raises(KeyError, match="depth"):
        list(bucket_by_depth([{"volume": np.zeros((4, 2))}], 2, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="batch_size"):
        list(bucket_by_depth([], 0, np.random.default_rng(0)))


def _irregular(n_rows: int, seed: int):
    """Batches of random sizes (as iter_batches with a local shuffle buffer yields them), some with volumes of one
    shape (a regular array, as Ray Data gives them then), the others object arrays."""
    rng = np.random.default_rng(seed)
    start = 0
    while start < n_rows:
        n = min(int(rng.integers(1, 70)), n_rows - start)
        same = bool(rng.integers(0, 2))
        d = rng.integers(25, 42, size=n)
        if same:
            vols = np.stack([np.full((8, 2, 2), start + i, np.int16) for i in range(n)])
        else:
            vols = np.empty(n, dtype=object)
            for i, x in enumerate(d):
                vols[i] = np.full((int(x), 2, 2), start + i, dtype=np.int16)
        yield {"volume": vols, "depth": d, "key": np.asarray([f"k{start + i}" for i in range(n)]),
               "input_ids": np.arange(start, start + n)[:, None].repeat(3, 1)}
        start += n


@pytest.mark.parametrize("n_rows", [500, 512, 37])
def test_rebatch_gives_exact_sizes_so_equal_shares_give_equal_step_counts(n_rows):
    b, pool = 16, 4
    for seed in range(5):  # workers whose streams come in different batch sizes
        pools = list(rebatch(_irregular(n_rows, seed), b * pool))
        assert [len(p["depth"]) for p in pools] == [b * pool] * (n_rows // (b * pool)) + (
            [n_rows % (b * pool)] if n_rows % (b * pool) else [])
        keys = np.concatenate([p["key"] for p in pools])
        assert keys.tolist() == [f"k{i}" for i in range(n_rows)]  # every row once, in order
        for p in pools:
            for key, vol, ids in zip(p["key"], p["volume"], p["input_ids"]):  # columns stay aligned
                assert vol.flat[0] == ids[0] == int(key[1:])
        steps = len(list(bucket_by_depth(iter(pools), b, np.random.default_rng(0))))
        assert steps == n_rows // (b * pool) * pool + n_rows % (b * pool) // b
    exact = list(rebatch(_irregular(n_rows, 0), b, drop_last=True))
    assert len(exact) == n_rows // b and all(len(x["key"]) == b for x in exact)
    with pytest.raises(ValueError):
        list(rebatch(_irregular(5, 0), 0))
