"""Organ classification of z-chunks (``volvlp_ray.eval.organs``): targets from extents, AP with volume-bootstrap
CIs against scikit-learn and hand-made cases, zero-shot and probe on embeddings whose answer is known, the radar
chart. The evaluate job's organ section on a trained model is tested in ``test_evaluate.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from volvlp_ray.eval.organs import (ORGAN_GROUPS, average_precision_with_ci, chunk_targets, flatten_organ_metrics,
                                    organ_classification, plot_organ_radar)


def test_chunk_targets_follow_the_overlap_rule():
    ext = {"heart": [100.0, 200.0], "lung": [50.0, 400.0], "airways": [300.0, 310.0]}
    groups = ("heart", "lung", "airways", "aorta")
    # chunk [150, 250]: overlaps the heart by 50 = half of the chunk (the shorter): present at 0.5, not at 0.6
    assert chunk_targets(ext, (150.0, 250.0), 0.5, groups).tolist() == [1, 1, 0, -1]
    assert chunk_targets(ext, (150.0, 250.0), 0.6, groups).tolist() == [0, 1, 0, -1]
    # a small organ wholly inside the chunk is present (the organ is the shorter); a graze of 1 mm is not
    assert chunk_targets(ext, (250.0, 350.0), 0.5, groups).tolist() == [0, 1, 1, -1]
    assert chunk_targets(ext, (199.0, 299.0), 0.5, groups).tolist() == [0, 1, 0, -1]
    # touching ends only: no overlap, absent even at the smallest fraction
    assert chunk_targets(ext, (200.0, 300.0), 1e-6, groups).tolist() == [0, 1, 0, -1]
    # the range may come reversed
    assert chunk_targets(ext, (250.0, 150.0), 0.5, groups).tolist() == [1, 1, 0, -1]


def test_average_precision_against_sklearn_and_by_hand():
    scores, y = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    r = average_precision_with_ci(scores, y, np.arange(4), n_bootstrap=0)
    assert r["ap"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # precision at each positive, averaged
    assert r["prevalence"] == 0.5 and r["n_pos"] == 2 and r["n_neg"] == 2 and math.isnan(r["ap_ci_low"])
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=200), rng.integers(0, 2, 200)
    assert average_precision_with_ci(s, t, np.arange(200), 0)["ap"] == pytest.approx(average_precision_score(t, s))
    one_class = average_precision_with_ci(s, np.ones(200, int), np.arange(200), 50)
    assert math.isnan(one_class["ap"]) and one_class["prevalence"] == 1.0


def test_bootstrap_resamples_volumes_not_chunks():
    """Every chunk of a volume goes in or out with it: with volumes whose chunks are all positive or all negative
    and scored perfectly, every resample is perfect (CI [1, 1]); resampling chunks independently could not tell the
    difference, so also a case where the grouping decides the CI: a negative volume of 5 chunks ranked on top is
    absent from ~35 % of volume resamples (0.9^10; those are perfect, so the CI reaches 1), but from only ~0.5 % of
    chunk resamples (0.9^50: the CI would stop below 1)."""
    groups = np.repeat(np.arange(10), 5)
    y = (groups % 2).astype(int)
    perfect = average_precision_with_ci(y + 0.1 * np.random.default_rng(1).random(50), y, groups, 200)
    assert [perfect[k] for k in ("ap", "ap_ci_low", "ap_ci_high")] == pytest.approx([1.0, 1.0, 1.0])
    # one volume's chunks all ranked on top although negative: how often it is drawn sets the spread
    scores = np.where(groups == 0, 10.0, 0.0) + y
    r = average_precision_with_ci(scores, y, groups, 400, seed=3)
    assert r["ap_ci_low"] < r["ap"] < r["ap_ci_high"] and r["ap_ci_high"] == pytest.approx(1.0)
    again = average_precision_with_ci(scores, y, groups, 400, seed=3)
    assert again == r  # deterministic by seed
    assert 350 < r["n_bootstrap_used"] <= 400  # resamples of one class (all positive volumes) are dropped


def _chunks(rng, n_vol=12, per=4, dim=16, known=True):
    g = len(ORGAN_GROUPS)
    targets = rng.integers(0, 2, (n_vol * per, g)).astype(np.int8)
    targets[:, ORGAN_GROUPS.index("bones")] = 1  # always present: AP undefined (skipped)
    if not known:
        targets[: per * 2, ORGAN_GROUPS.index("heart")] = -1  # two volumes without a heart extent
    basis = np.eye(dim)[:g]  # organ j lives on axis j
    emb = targets.clip(0).astype(np.float32) @ basis + 0.05 * rng.normal(size=(n_vol * per, dim))
    return {"emb": emb.astype(np.float32), "targets": targets, "volume": np.repeat(np.arange(n_vol), per),
            "keys": np.asarray([f"v{i}" for i in range(n_vol)])}, basis


def test_zero_shot_and_probe_find_organs_the_embeddings_encode():
    rng = np.random.default_rng(0)
    test, basis = _chunks(rng, known=False)
    train, _ = _chunks(rng, n_vol=30)
    res = organ_classification(test, basis, train=train, n_bootstrap=50, seed=0)
    for kind in ("zeroshot", "probe"):
        r = res[kind]
        assert r["skipped"] == ["bones"] and "bones" not in r["evaluated"]
        assert all(r["per_organ"][g]["ap"] == pytest.approx(1.0) for g in r["evaluated"]), kind
        assert r["mean"]["ap"] == pytest.approx(1.0)
    heart = res["zeroshot"]["per_organ"]["heart"]
    assert heart["n_unknown"] == 8 and heart["n_pos"] + heart["n_neg"] == 40  # unknown chunks left out
    # prompts that point elsewhere (each organ's prompt on the next organ's axis): AP near the prevalence
    shifted = organ_classification(test, np.roll(basis, 1, axis=0), n_bootstrap=0)
    assert shifted["zeroshot"]["mean"]["ap"] < 0.8 and "probe" not in shifted
    metrics = flatten_organ_metrics(res, "evaluate/valid/")
    assert metrics["evaluate/valid/organ/zeroshot/mean/ap"] == pytest.approx(1.0)
    assert "evaluate/valid/organ/probe/heart/ap_ci_low" in metrics
    assert not any("bones/ap" in k for k in metrics) and all(math.isfinite(v) for v in metrics.values())
    fig = plot_organ_radar(res)
    assert fig is not None and len(fig.axes[0].lines) == 3  # zero-shot, probe, random


def test_no_chunks_and_one_class_training_organs():
    rng = np.random.default_rng(0)
    empty = {"emb": np.zeros((0, 4), np.float32), "targets": np.zeros((0, len(ORGAN_GROUPS)), np.int8),
             "volume": np.zeros(0, np.int64), "keys": np.asarray([])}
    assert "skipped" in organ_classification(empty, np.eye(4)[:1])
    test, basis = _chunks(rng)
    train, _ = _chunks(rng, n_vol=20)
    train["targets"][:, ORGAN_GROUPS.index("heart")] = 0  # the probe cannot be fitted for the heart
    res = organ_classification(test, None, train=train)
    assert "zeroshot" not in res and "heart" in res["probe"]["skipped"]
    assert "not fitted" in res["probe"]["per_organ"]["heart"]["skipped"]
