"""Checkpoint state: weights-only loading of DeepSpeed's files (ZeRO 1/2/3), refusal of pickled code,
per-rank RNG round trip, and the export's one-call embedding of a report and a NIfTI file."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from volvlp_ray.train.checkpoint import load_worker_state, safe_load, save_worker_state

ROOT = Path(__file__).parents[1]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > '{self.marker}'",))


def test_safe_load_refuses_pickled_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        safe_load(path)
    assert not marker.exists()


def test_rng_and_position_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(2)
    save_worker_state(tmp_path, 1, step=7, epoch=2, batch_in_epoch=3)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_worker_state(tmp_path, 1)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (7, 2, 3)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == expected
    assert load_worker_state(tmp_path, 0) is None  # no state written by rank 0


# One process, world size 1 (gloo): train a step, save, load into a fresh engine with weights-only loading,
# and compare module and optimizer state; then plant a pickled payload in the optimizer file.
_DS_SCRIPT = textwrap.dedent("""
    import os, sys, glob, torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed
    from volvlp_ray.config import Config
    from volvlp_ray.train.checkpoint import use_safe_loading
    from volvlp_ray.train.deepspeed import deepspeed_config, param_groups

    stage, optimizer, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = Config()
    cfg.train.zero_stage, cfg.train.optimizer, cfg.train.warmup_steps = stage, optimizer, 1

    def engine():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        ds = deepspeed_config(cfg, False)
        ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
        e, _, _, _ = deepspeed.initialize(model=net, model_parameters=param_groups(net, 0.01), config=ds,
                                          dist_init_required=False)
        use_safe_loading(e)
        return e

    def train(e, n):
        g = torch.Generator().manual_seed(1)
        for _ in range(n):
            loss = e(torch.randn(4, 8, generator=g)).pow(2).mean()
            e.backward(loss)
            e.step()
        return float(loss)

    a = engine()
    train(a, 3)
    a.save_checkpoint(out, tag="t", client_state={"step": 3})
    after_a = train(a, 2)
    b = engine()
    _, client = b.load_checkpoint(out, tag="t")
    assert client["step"] == 3, client
    after_b = train(b, 2)
    assert after_a == after_b, (after_a, after_b)
    print("ROUNDTRIP_OK", after_a)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + out + "/pwned",))
    f = sorted(glob.glob(out + "/t/*optim_states.pt"))[0]
    sd = torch.load(f, weights_only=False)
    sd["evil"] = Payload()
    torch.save(sd, f)
    try:
        engine().load_checkpoint(out, tag="t")
        print("LOADED_PAYLOAD")
    except Exception as exc:
        print("REFUSED", type(exc).__name__)
    assert not os.path.exists(out + "/pwned")
""")


@pytest.mark.parametrize("stage,optimizer", [(1, "adamw"), (2, "muon"), (3, "adamw")])
def test_deepspeed_checkpoint_round_trip_weights_only(tmp_path, stage, optimizer):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(stage), optimizer, str(tmp_path), str(port)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "ROUNDTRIP_OK" in out, out[-4000:]
    assert "REFUSED" in out and "LOADED_PAYLOAD" not in out, out[-4000:]
