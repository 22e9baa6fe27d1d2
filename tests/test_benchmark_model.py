"""The model benchmark (``python jobs/benchmark.py model``): a real DeepSpeed training step, timed, without Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volvlp_ray.benchmarks.model import run
from volvlp_ray.models import TEXT_PRESETS, text_flops_per_sample, vit3d_flops_per_sample

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--size", "32", "--depth", "8", "--batch-size", "2", "--text-length", "16", "--steps", "2", "--warmup", "1",
         "--threads", "1"]


def test_benchmark_job_reports_a_sane_step_without_ray(tmp_path):
    out = tmp_path / "model.json"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['benchmark.py', 'model', '--out', {str(out)!r}, '--peak-tflops', '0.5', *{SMALL!r}]\n"
        "try:\n"
        "    runpy.run_path('jobs/benchmark.py', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('RAY_IMPORTED', 'ray' in sys.modules)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "RAY_IMPORTED False" in p.stdout, p.stdout[-2000:]
    printed = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])

    report = json.loads(out.read_text())
    d = report["direct"]
    assert report["benchmark"] == "model" and "ray_train" not in report
    cfg = report["config"]
    assert (cfg["preset"], cfg["device"], cfg["bf16"], cfg["zero"], cfg["optimizer"]) == ("tiny", "cpu", False, 2, "adamw")
    assert d["engine"] == {"optimizer": "DeepSpeedZeroOptimizer", "bf16": False, "zero_stage": 2}
    # 8 x 32 x 32 voxels in 4 x 16 x 16 patches
    assert d["vision_tokens_per_sample"] == 2 * 2 * 2
    assert d["samples_per_s"] > 0 and math.isfinite(d["final_loss"])
    assert d["samples_per_s"] == pytest.approx(2 / d["step_time_s"]["mean"])
    assert d["vision_tokens_per_s"] == pytest.approx(8 * d["samples_per_s"])
    assert d["text_tokens_per_s"] == pytest.approx(16 * d["samples_per_s"])
    assert d["step_time_s"]["min"] <= d["step_time_s"]["median"] <= d["step_time_s"]["max"]
    assert 1e6 < d["peak_memory_bytes"] < 4 * 2**30 and "RSS" in d["memory_method"]
    # FLOPs: the analytic counts of the two towers, 3x forward for the training step
    f = d["flops_per_sample"]
    assert f["vision_forward"] == pytest.approx(vit3d_flops_per_sample(dict(dim=96, depth=3, patch=(4, 16, 16)), 8))
    from transformers import BertConfig

    assert f["text_forward"] == pytest.approx(text_flops_per_sample(BertConfig(**TEXT_PRESETS["scratch-tiny"]), 16))
    assert f["train_step"] == pytest.approx(3 * f["forward"])
    assert f["forward"] == pytest.approx(f["vision_forward"] + f["text_forward"] + f["heads_and_logits_forward"])
    assert d["achieved_tflops"] == pytest.approx(f["train_step"] * d["samples_per_s"] / 1e12)
    assert d["mfu"] == pytest.approx(d["achieved_tflops"] / 0.5)
    assert printed["samples_per_s"] == pytest.approx(d["samples_per_s"])


def test_padded_zero3_and_no_mfu_without_a_peak(tmp_path):
    report = run(out=str(tmp_path / "m.json"), size=32, depth=8, batch_size=2, text_length=16, steps=2, warmup=1,
                 threads=1, zero=3, padded=True, pool="attn", grad_checkpointing=True)
    d = report["direct"]
    assert d["engine"]["zero_stage"] == 3 and d["engine"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    assert d["mfu"] is None and d["peak_tflops"] is None
    assert d["samples_per_s"] > 0 and math.isfinite(d["final_loss"])
    assert json.loads((tmp_path / "m.json").read_text())["direct"]["parameters"] == d["parameters"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_gpu_requests_without_cuda_are_clear_errors(tmp_path, capsys, monkeypatch):
    import runpy

    with pytest.raises(ValueError, match="bf16 needs a CUDA GPU"):
        run(bf16=True)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run(device="cuda")
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        run(size=40)
    # the job: exit status 2 and the message, no traceback, no report
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "model", "--bf16", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "jobs" / "benchmark.py"), run_name="__main__")
    assert exc.value.code == 2
    assert "bf16 needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_the_same_step_through_ray_train_reports_its_overhead(ray_session, tmp_path):
    report = run(out=str(tmp_path / "r.json"), size=32, depth=8, batch_size=2, text_length=16, steps=3, warmup=1,
                 threads=1, ray=True)
    direct, via_ray = report["direct"], report["ray_train"]
    assert via_ray["world_size"] == direct["world_size"] == 1
    assert via_ray["engine"] == direct["engine"] and via_ray["flops_per_sample"] == direct["flops_per_sample"]
    assert via_ray["final_loss"] == pytest.approx(direct["final_loss"], rel=1e-4)  # the same seeded step
    assert via_ray["samples_per_s"] > 0 and via_ray["fit_wall_s"] > 0
    assert report["ray_overhead_pct"] == pytest.approx(100 * (1 - via_ray["samples_per_s"] / direct["samples_per_s"]))
