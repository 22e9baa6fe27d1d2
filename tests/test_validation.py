"""Validation during pre-training (``eval/validation.py``): read without Ray Data tasks, one batch of voxels at a
time, sharded across ranks; the same embeddings (and so the same metrics) as the Ray Data read it replaced, on one
rank or two, under ZeRO-3 too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[1]


def _cfg(ws: Path, *overrides: str):
    from volvlp_ray.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={ws}", "eval.batch_size=3", *overrides])


def _tokenizer_dir(ws: Path) -> str:
    (tok,) = [p for p in (Path(ws) / "tokenizers").iterdir() if (p / "tokenizer_config.json").is_file()]
    return str(tok)


def _model(cfg, tokenizer_dir: str):
    from transformers import AutoTokenizer

    from volvlp_ray.models import build_model

    torch.manual_seed(cfg.seed)  # the same random model in every process
    return build_model(cfg.model, AutoTokenizer.from_pretrained(tokenizer_dir)).eval()


def _ray_data_rows(cfg, tokenizer_dir: str, n: int) -> list[dict]:
    """What the validator read before: the subset through Ray Data (``split_dataset(...).take_all()``), by key."""
    from volvlp_ray.eval.run import split_dataset

    return sorted(split_dataset(cfg, "valid", tokenizer_dir, max_volumes=n).take_all(), key=lambda r: str(r["key"]))


@torch.no_grad()
def _ray_data_embeddings(model, cfg, rows: list[dict]):
    """...and how it embedded them: batched, ``collate``d to float volumes, batch by batch."""
    from volvlp_ray.data.pipeline import collate
    from volvlp_ray.eval.embed import encode_volumes

    e, vols, texts = cfg.eval, [], []
    for i in range(0, len(rows), e.batch_size):
        part = rows[i : i + e.batch_size]
        volumes = np.empty(len(part), dtype=object)
        volumes[:] = [r["volume"] for r in part]
        batch = {"volume": volumes, **{k: np.array([r[k] for r in part]) for k in
                                       ("input_ids", "attention_mask", "labels", "study_id", "z_center_mm")}}
        b = collate(batch, cfg.model.patch[0], tuple(cfg.data.hu_window))
        vols.append(encode_volumes(model, b["volume"], b["depths"], e.volume_mode, e.chunk_depth, e.chunk_stride,
                                   e.chunk_pool, e.batch_size))
        texts.append(model.encode_text(b["input_ids"], b["attention_mask"]))
    return [str(r["key"]) for r in rows], torch.cat(vols).numpy(), torch.cat(texts).numpy()


def _held_bytes(obj, depth: int = 0) -> int:
    """Bytes of the arrays and tensors an object holds (attributes, lists, dicts, a few levels down)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth > 4:
        return 0
    if isinstance(obj, dict):
        return sum(_held_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return _held_bytes(vars(obj), depth + 1)
    return 0


def test_validator_reads_without_ray_data_and_equals_the_ray_data_read(tiny_workspace, ray_session):
    from volvlp_ray.eval.validation import Validator, _Counted

    torch.set_num_threads(1)
    tok = _tokenizer_dir(tiny_workspace)
    rows = _ray_data_rows(_cfg(tiny_workspace), tok, 7)
    for mode in (["eval.volume_mode=whole"], ["eval.volume_mode=sliding", "eval.chunk_depth=8", "eval.chunk_stride=4"]):
        cfg = _cfg(tiny_workspace, *mode)
        model = _model(cfg, tok)
        v = Validator(cfg, tok, max_volumes=7)  # 7 of the 8 held-out volumes: batches of 3, 3, 1
        keys, vol, txt = _ray_data_embeddings(model, cfg, rows)
        assert v.keys == keys
        counted = _Counted(model)
        got_vol, got_txt, pos, neg = v.embed(counted)
        assert np.array_equal(got_vol, vol) and np.array_equal(got_txt, txt), mode  # bitwise the same
        assert counted.calls == v.vision_passes(0), (counted.calls, v.vision_passes(0))  # as planned
        assert (counted.calls == 3) == ("whole" in mode[0]), counted.calls  # sliding: several passes per batch
        assert pos.shape == neg.shape == (len(v.label_names), cfg.model.embed_dim)
        # nothing of the volumes is kept between runs: less than one volume's voxels in all
        one_volume = int(np.prod(v._batches[0][0]["volume_shape"])) * 2
        assert _held_bytes(v) < one_volume, (_held_bytes(v), one_volume)
        m = v.run(model)
        assert m["val/n"] == 7 and 0 <= m["val/t2v/mrr"] <= 1


def _sharded_loop(config: dict) -> None:
    """Ray Train worker: a ZeRO-3 engine around the seeded random model; each validator mode run sharded over the
    two ranks (forward passes are collectives) and on one rank (every rank all batches), embeddings saved."""
    import deepspeed
    import ray.train

    from volvlp_ray.config import config_from_dict
    from volvlp_ray.eval.validation import Validator
    from volvlp_ray.train.deepspeed import deepspeed_config, param_groups

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = {}
    for name, values in config["configs"].items():
        cfg = config_from_dict(values)
        model = _model(cfg, config["tokenizer_dir"])
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0),
                                          config=deepspeed_config(cfg, use_gpu=False), dist_init_required=False)
        sharded = Validator(cfg, config["tokenizer_dir"], max_volumes=7, rank=rank, world=world,
                            collective_forward=True, timeout_s=120)
        vol, txt, _, _ = sharded.embed(engine.module)
        metrics = sharded.run(engine.module)
        one = Validator(cfg, config["tokenizer_dir"], max_volumes=7)
        vol1, txt1, _, _ = one.embed(engine.module)
        out[name] = {"mine": sharded._mine, "vol": vol.tolist(), "txt": txt.tolist(), "vol1": vol1.tolist(),
                     "txt1": txt1.tolist(), "metrics": {k: v for k, v in metrics.items() if k != "val/seconds"}}
    Path(config["out_dir"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_sharded_validation_under_zero3_equals_one_rank(tiny_workspace, ray_session, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from volvlp_ray.config import config_to_dict
    from volvlp_ray.eval.validation import Validator

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder
    tok = _tokenizer_dir(tiny_workspace)
    configs = {"whole": _cfg(tiny_workspace, "train.zero_stage=3"),
               # sliding: the ranks' batches make different numbers of vision passes (padded with dummy passes)
               "sliding": _cfg(tiny_workspace, "train.zero_stage=3", "eval.volume_mode=sliding", "eval.chunk_depth=8",
                               "eval.chunk_stride=4")}
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    TorchTrainer(
        _sharded_loop,
        train_loop_config={"configs": {k: config_to_dict(c) for k, c in configs.items()}, "tokenizer_dir": tok,
                           "out_dir": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo", timeout_s=120),  # a pass-count mismatch fails, never hangs
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="sharded_validation", storage_path=str(tmp_path / "ray_results"),
                             worker_runtime_env=env),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    torch.set_num_threads(1)
    for name, cfg in configs.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        assert (r0["mine"], r1["mine"]) == ([0, 2], [1])  # batches of 3, 3, 1 dealt out: uneven work
        for key in ("vol", "txt"):
            assert r0[key] == r1[key] == r0[key + "1"] == r1[key + "1"], (name, key)  # 2 ranks == 1 rank, bitwise
        assert r0["metrics"] == r1["metrics"]
        local = Validator(cfg, tok, max_volumes=7)  # one rank here, no DeepSpeed: the same model's numbers
        model = _model(cfg, tok)
        vol, txt, _, _ = local.embed(model)
        np.testing.assert_allclose(np.asarray(r0["vol"]), vol, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(r0["txt"]), txt, rtol=0, atol=1e-6)
        here = {k: v for k, v in local.run(model).items() if k != "val/seconds"}
        assert r0["metrics"] == pytest.approx(here, abs=1e-6)


def test_evaluation_reads_small_splits_directly_with_the_ray_data_read_s_results(tiny_workspace, ray_session):
    """``eval.reader``: the held-out evaluation and the probe's training split, read in this process (``direct``,
    what ``auto`` picks for a small split) give the Ray Data read's keys, labels and embeddings; ``auto`` switches
    to Ray Data above ``eval.direct_max_volumes``."""
    from volvlp_ray.config import ConfigError
    from volvlp_ray.eval.run import embed_split, reads_directly

    torch.set_num_threads(1)
    tok = _tokenizer_dir(tiny_workspace)
    for split, n in (("valid", 0), ("train", 5)):
        got = {}
        for reader in ("direct", "ray_data"):
            cfg = _cfg(tiny_workspace, f"eval.reader={reader}")
            got[reader] = embed_split(_model(cfg, tok), cfg, split, tok, max_volumes=n)
        d, r = got["direct"], got["ray_data"]
        assert len(d["keys"]) == (n or 8) and list(d["keys"]) == list(r["keys"]), split
        np.testing.assert_array_equal(d["labels"], r["labels"])
        # batches are cut from key order here, from shard order there: the same numbers up to padding's rounding
        np.testing.assert_allclose(d["volume"], r["volume"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(d["text"], r["text"], rtol=0, atol=1e-5)
        assert d["volume"].dtype == r["volume"].dtype == np.float32
    cfg = _cfg(tiny_workspace)
    assert cfg.eval.reader == "auto" and reads_directly(cfg, 8) and not reads_directly(cfg, 513)
    assert not reads_directly(_cfg(tiny_workspace, "eval.reader=ray_data"), 8)
    with pytest.raises(ConfigError, match="eval.reader"):
        _cfg(tiny_workspace, "eval.reader=sometimes")
