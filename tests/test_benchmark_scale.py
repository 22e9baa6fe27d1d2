"""``jobs/benchmark.py scale``: the real batching code dealing a stream to simulated ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from volvlp_ray.benchmarks.scale import _Stats

ROOT = Path(__file__).parents[1]


def test_useful_work_is_the_flop_ratio_of_the_slowest_rank():
    flops = {1: 1.0, 2: 3.0, 3: 7.0}.__getitem__  # by z patches (one token per patch here)
    s = _Stats(flops, tokens_per_patch=1, patch_z=4)
    # rank 0: two samples of 3 patches, no padding; rank 1: 1 and 3 patches, padded to 3
    s.step([(np.array([3, 3]), 3), (np.array([1, 3]), 3)])
    # rank 1 with 2 patches at most: the slowest rank is still rank 0 (2 x 7)
    s.step([(np.array([3, 3]), 3), (np.array([2, 2]), 2)])
    r = s.report()
    first = (7 + 7 + 1 + 7) / (2 * 2 * 7)
    second = (7 + 7 + 3 + 3) / (2 * 2 * 7)
    assert abs(r["useful_work_fraction"] - (first + second) / 2) < 1e-12
    assert r["masked_step_fraction"] == 0.5
    assert abs(r["padded_token_fraction"] - 2 / 22) < 1e-12
    assert r["distinct_token_lengths"] == 2


def test_scale_benchmark_through_the_job(tmp_path):
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "benchmark.py"), "scale", "--config",
                        str(ROOT / "configs" / "ctrate_vitb.yaml"), "--world", "1", "8", "--rows-per-rank", "96",
                        "--epochs", "2", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["setup"]["patch"] == [10, 20, 20] and r["setup"]["in_plane_size"] == 480
    cells = {(c["mode"], c["world"]): c for c in r["results"]}
    assert set(cells) == {(m, w) for m in ("report", "organ") for w in (1, 8)}
    for (mode, world), c in cells.items():
        eq, base = c["equal"], c["bucket"]
        assert eq["steps"] > 0 and base["steps"] > 0
        assert eq["useful_work_fraction"] >= 0.97 and eq["masked_step_fraction"] == 0
        assert eq["padded_token_fraction"] == 0 and eq["cropped_slice_fraction"] < 0.01
        assert eq["distinct_token_lengths"] >= 3  # depth still varies between steps
        if world == 8:  # per-rank bucketing: ranks wait for the deepest one
            assert base["useful_work_fraction"] < 0.9 and c["useful_work_ratio"] > 1.1
        if mode == "organ":
            assert base["masked_step_fraction"] > 0.5
    assert r["meets_target"] is True
