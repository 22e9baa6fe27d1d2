"""``.ci/cpu_by_process.py``, the tool that measured where the suite's CPU goes (README: "The test suite's time")."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / ".ci" / "cpu_by_process.py"


def _tool():
    spec = importlib.util.spec_from_file_location("cpu_by_process", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_titles_fall_in_their_groups():
    tool = _tool()
    cases = {
        ("ray::RayTrainWorker.run_train_fn", "ray::RayTrainWo"): "Ray Train training workers",
        ("ray::TrainController.__init__", ""): "Ray Train / Ray Data control actors",
        ("ray::IDLE", ""): "Ray worker processes starting or idle",
        (".venv/bin/python ray/_private/workers/default_worker.py --node-ip-address=1", "python"):
            "Ray worker processes starting or idle",
        (".venv/lib/ray/core/src/ray/gcs/gcs_server --log_dir=x", "gcs_server"): "Ray services",
        ("ray::ReadShard->FlatMap(_ToRow)", ""): "Ray Data tasks",
        ("python -m pytest -q", "python"): "pytest and the job processes it starts",
        ("python jobs/pretrain.py train.steps=2", "python"): "pytest and the job processes it starts",
        ("python -m pip install -q torch", "python"): "install (pip)",
        ("/usr/bin/java -jar meteor.jar", "java"): "other",
    }
    for (cmdline, comm), group in cases.items():
        assert tool.group_of(tool.title(cmdline, comm)) == group, (cmdline, tool.title(cmdline, comm))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_child_process_cpu_is_counted(tmp_path):
    """A command whose child spins for 1.5 CPU-seconds: that CPU time is attributed (the sampler sees the child while
    it runs) and no more than the machine's busy time."""
    spin = "import time\nwhile time.process_time() < 1.5: pass\n"  # 1.5 CPU-seconds, however busy the machine
    out = tmp_path / "cpu.json"
    p = subprocess.run([sys.executable, str(TOOL), "--every", "0.1", "--json", str(out), "--",
                        sys.executable, "-c",
                        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    record = json.loads(out.read_text())
    spun = sum(v for k, (v, n) in record["titles"].items() if k.startswith("python"))
    # CPU spent after the last sample before the child exits (< 0.1 s here) is missed; counting a total instead of
    # the increase since the last sample would give many times 1.5
    assert 1.2 <= spun <= 3.0, record["titles"]
    assert record["attributed_cpu_s"] <= record["busy_cpu_s"] + 0.5, record
    assert "attributed" in p.stderr and "other" in p.stderr, p.stderr
    bad = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "give the command to run after --" in bad.stderr
