"""Depth bucketing: every row once, same batch count as drop_last, less padding, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from volvlp_ray.data.bucketing import bucket_by_depth, padding_fraction


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
