"""The data benchmark (``python jobs/benchmark.py data``) on a handful of synthetic volumes: every part runs, and
the padding fraction is the one the shards' depths imply."""

import json
import math
import tarfile

from volvlp_ray.benchmarks.data import run


def test_data_benchmark_measures_all_three_paths_and_the_padding(ray_session, tmp_path):
    out = tmp_path / "data.json"
    report = run(out=str(out), volumes=8, val_volumes=2, workspace=str(tmp_path / "ws"), batch_size=8,
                 baseline_volumes=3)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    raw, base, loader = report["raw_read"], report["nifti_baseline"], report["loader"]
    split = tmp_path / "ws" / "shards" / "train"
    shard_files = sorted(split.glob("*.tar"))
    assert raw["bytes"] == sum(p.stat().st_size for p in shard_files) and raw["mb_per_s"] > 0
    assert base["volumes"] == 3 and base["volumes_per_s"] > 0
    assert report["config"]["volume_transport"] == "direct"
    for p in (loader, report["loader_first_pass"], report["loader_object_store"]):
        assert p["volumes"] == 8 and p["batches"] == 1
    assert math.isclose(report["ratios"]["loader_vs_raw_mbps"], loader["shard_mb_per_s"] / raw["mb_per_s"])
    assert math.isclose(report["ratios"]["loader_vs_nifti_volumes_per_s"],
                        loader["volumes_per_s"] / base["volumes_per_s"])
    # one batch of all 8 volumes: depth is padded to the deepest one, rounded up to the z patch
    depths = []
    for p in shard_files:
        with tarfile.open(p) as t:
            depths += [json.loads(t.extractfile(m).read())["depth"] for m in t.getmembers()
                       if m.name.endswith(".meta.json")]
    pz = report["config"]["patch"][0]
    real = [-(-d // pz) for d in depths]
    expected = 1 - sum(real) / (len(real) * max(real))
    assert len(set(depths)) > 1 and expected > 0
    assert math.isclose(loader["vision_padding_fraction"], expected)
    assert math.isclose(loader["vision_padding_fraction_unbucketed"], expected)  # one batch either way
    assert report["loader_object_store"]["vision_padding_fraction"] == loader["vision_padding_fraction"]
    assert loader["depth_slices"] == {"min": min(depths), "median": float(sorted(depths)[3] + sorted(depths)[4]) / 2,
                                      "max": max(depths)}
    assert 0 < loader["text_padding_fraction"] < 1
    assert set(report["meets_target"]) == set(report["targets"])
    assert {k: v["rows"] for k, v in report["loader_stages"].items()} == {"read": 8, "rows": 8, "rows_direct": 8,
                                                                          "read_webdataset": 8}
