"""DeepSpeed wiring: Muon/AdamW routing, the engine config, and every ZeRO stage x optimizer under Ray Train.

The Ray test is one ``TorchTrainer.fit`` with 2 CPU workers (gloo) whose loop trains the six combinations
(ZeRO 1/2/3 x AdamW/Muon) one after another in the same worker group, each with a fresh tiny VLP, the
project's sigmoid loss (features gathered across both workers) and ``deepspeed_config``; for ZeRO-3 it
round-trips a checkpoint into a fresh engine through the weights-only loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from volvlp_ray.config import Config, ModelConfig
from volvlp_ray.models import build_model, build_tokenizer
from volvlp_ray.train.deepspeed import compile_blocks, deepspeed_config, param_groups, routes_to_muon

CORPUS = [
    "No pleural effusion. Mild cardiomegaly is present.",
    "A lung nodule in the right upper lobe; emphysema in both lungs.",
    "Coronary artery wall calcification. Hiatal hernia.",
    "Bronchiectasis and peribronchial thickening in the lower lobes.",
] * 3
COMBINATIONS = [(stage, opt) for stage in (1, 2, 3) for opt in ("adamw", "muon")]
STEPS = 5  # DeepSpeed's WarmupCosineLR gives lr 0 to the first two steps; three steps then update


@pytest.mark.parametrize("pool", ["cls", "attn"])
def test_muon_gets_hidden_matrices_and_adamw_the_rest(pool):
    model = build_model(ModelConfig(pool=pool), build_tokenizer(CORPUS, 200))
    named = dict(model.named_parameters())
    adamw = {
        "vision.patch_embed.weight", "vision.patch_embed.bias",  # 5-D Conv3d kernel and its bias
        "vision.blocks.0.norm1.weight", "vision.blocks.0.attn.qkv.bias", "vision.norm.weight",
        "logit_scale", "logit_bias",
        "text.model.embeddings.word_embeddings.weight", "text.model.embeddings.position_embeddings.weight",
        "text.model.embeddings.LayerNorm.weight", "text.model.encoder.layer.0.attention.self.query.bias",
    }
    adamw.add("vision.cls_embed" if pool == "cls" else "vision.attn_pool.query_embed")
    muon = {
        "vision.blocks.0.attn.qkv.weight", "vision.blocks.0.attn.proj.weight", "vision.blocks.0.mlp.0.weight",
        "vision.blocks.2.mlp.2.weight", "vision_proj.weight", "text_proj.weight",
        "text.model.encoder.layer.1.attention.self.query.weight", "text.model.encoder.layer.1.output.dense.weight",
    }
    if pool == "attn":
        muon.add("vision.attn_pool.kv.weight")
    assert named["vision.patch_embed.weight"].ndim == 5
    assert not (adamw | muon) - set(named), (adamw | muon) - set(named)
    assert not [n for n in adamw if routes_to_muon(n, named[n])]
    assert all(routes_to_muon(n, named[n]) for n in muon)
    # the rule: every Muon parameter is a 2-D Linear weight; nothing >= 2-D outside "embed" goes to AdamW
    for name, p in named.items():
        assert routes_to_muon(name, p) == (p.ndim >= 2 and "embed" not in name.lower()), name
    decay, no_decay = param_groups(model, 0.05)
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in named.items() if routes_to_muon(n, p)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_frozen_parameters_are_left_out_of_the_groups():
    model = build_model(ModelConfig(freeze_text_layers=1), build_tokenizer(CORPUS, 200))
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not grouped & {id(p) for p in frozen}


def test_deepspeed_config_per_stage_and_optimizer():
    cfg = Config()
    for stage, opt in COMBINATIONS:
        cfg.train.zero_stage, cfg.train.optimizer = stage, opt
        ds = deepspeed_config(cfg, use_gpu=False)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["optimizer"]["type"] == {"adamw": "AdamW", "muon": "Muon"}[opt]
        assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == cfg.train.grad_clip
        assert ds["zero_optimization"].get("reduce_scatter", True) is not (stage == 3 and opt == "muon")
        assert ds["scheduler"]["type"] == "WarmupCosineLR"
    cfg.train.zero_stage = 4
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(cfg, use_gpu=False)


def test_compile_blocks_keeps_names_and_outputs():
    tokenizer = build_tokenizer(CORPUS, 200)
    torch.manual_seed(0)
    model = build_model(ModelConfig(pool="mean"), tokenizer).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 1, 8, 32, 32)
    with torch.no_grad():
        ref = model.vision(x, torch.tensor([8, 4]))
    assert compile_blocks(model, backend="eager") == len(model.vision.blocks) == 3
    assert list(model.state_dict()) == keys  # checkpoints, exports and Muon routing see the same names
    with torch.no_grad():
        torch.testing.assert_close(model.vision(x, torch.tensor([8, 4])), ref)
    with pytest.raises(ValueError, match="no vision transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dynamic, distinct_lengths, graphs", [(True, None, 4), (False, 3, 12)],
                         ids=["dynamic", "a-graph-per-length"])
def test_compiled_blocks_serve_varying_depth_within_the_recompile_limit(capsys, dynamic, distinct_lengths, graphs):
    """Three chunk depths, each with and without a padding mask, with and without grad: the compiled blocks give
    the eager outputs and gradients, and dynamo never gives up at its recompile limit (it would silently run the
    block uncompiled from then on). Backend "eager": this checks dynamo's guards and recompiles; inductor on two
    CPU cores is too slow for a unit test."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from volvlp_ray.models import ViT3D

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    vit = ViT3D(dim=48, depth=3, heads=2, patch=(4, 16, 16), pool="mean", grad_checkpointing="selective").train()
    ref = copy.deepcopy(vit)
    # torch's default limit (8 graphs per function; compile_blocks may raise it), restored afterwards
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        assert compile_blocks(vit, distinct_lengths=distinct_lengths, backend="eager", dynamic=dynamic) == 3
        assert "recompile_limit" in capsys.readouterr().out
        for d in (8, 16, 20):  # 2, 4, 5 z-patches: 8, 16, 20 tokens
            x = torch.randn(3, 1, d, 32, 32)
            for depths in (None, torch.tensor([d, d - 4, d])):
                out, expected = vit(x, depths), ref(x, depths)
                torch.testing.assert_close(out, expected)
                out.pow(2).sum().backward()
                expected.pow(2).sum().backward()
                with torch.no_grad():
                    torch.testing.assert_close(vit(x, depths), ref(x, depths))
        with pytest.raises(ValueError, match="distinct_lengths"):
            compile_blocks(vit, dynamic=False)
    for (name, p), q in zip(ref.named_parameters(), vit.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0  # no frame fell back to eager
    assert counters["stats"]["unique_graphs"] == graphs  # dynamic: one per variant (mask x grad), not per depth
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------
# every combination under Ray Train


def _gathered(engine) -> dict[str, torch.Tensor]:
    """Full copies of every parameter (ZeRO-3 partitions gathered)."""
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None,
                                           enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone().float() for n, p in params}


def _digest(params: dict[str, torch.Tensor]) -> str:
    """One hash of every parameter's name, shape and bytes: equal on two ranks iff their replicas are identical."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _combinations_loop(config: dict) -> None:
    """Ray Train worker: train every (stage, optimizer) for a few steps; write what happened to a JSON file."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from volvlp_ray.losses import build_loss
    from volvlp_ray.train.checkpoint import use_safe_loading

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    tokenizer = build_tokenizer(CORPUS, 200)
    loss_fn = build_loss("sigmoid")
    g = torch.Generator().manual_seed(100 + rank)  # each worker its own batch
    volume = torch.randn(4, 1, 8, 32, 32, generator=g)
    depths = torch.tensor([8, 8, 5, 3])  # padded samples: the masked attention path
    enc = tokenizer(CORPUS[rank * 4:rank * 4 + 4], padding=True, return_tensors="pt")
    batch = (volume, depths, enc["input_ids"], enc["attention_mask"])

    def engine_for(stage: int, opt: str, seed: int):
        cfg = Config()
        cfg.model.patch = [4, 16, 16]
        cfg.train.zero_stage, cfg.train.optimizer = stage, opt
        cfg.train.batch_size, cfg.train.steps, cfg.train.warmup_steps = 4, STEPS, 1
        torch.manual_seed(seed)
        model = build_model(cfg.model, tokenizer)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05),
                                               config=deepspeed_config(cfg, use_gpu=False), dist_init_required=False)
        use_safe_loading(engine)
        return engine

    def step(engine) -> float:
        out = engine(*batch)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        engine.backward(loss)
        engine.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        return float(global_loss) / dist.get_world_size()

    results = []
    for stage, opt in COMBINATIONS:
        engine = engine_for(stage, opt, seed=0)
        routing = {n: bool(getattr(p, "use_muon", False)) for n, p in engine.module.named_parameters()}
        mismatched = [n for n, p in engine.module.named_parameters()
                      if opt == "muon" and routing[n] != routes_to_muon(n, p)]
        before = _gathered(engine)
        losses = [step(engine) for _ in range(STEPS)]
        after = _gathered(engine)
        changed = {n: float((after[n] - before[n]).abs().max()) for n in before}
        row = {"stage": stage, "optimizer": opt, "losses": losses, "mismatched_routing": mismatched,
               "params_before": _digest(before), "params_after": _digest(after),
               "n_muon": sum(routing.values()), "changed": changed, "optimizer_class": type(engine.optimizer).__name__}
        if stage == 3:
            ckpt = os.path.join(config["ckpt_dir"], f"zero3_{opt}")
            engine.save_checkpoint(ckpt, tag="t", client_state={"step": STEPS})
            fresh = engine_for(stage, opt, seed=1)  # other initial weights
            differs_before = max(float((v - after[n]).abs().max()) for n, v in _gathered(fresh).items())
            path, client = fresh.load_checkpoint(ckpt, tag="t")
            loaded = _gathered(fresh)
            row.update(
                load_path=path, client_step=client["step"], fresh_differs_before_load=differs_before,
                max_param_diff_after_load=max(float((loaded[n] - after[n]).abs().max()) for n in after),
                next_loss_original=step(engine), next_loss_loaded=step(fresh),
            )
            row["max_param_diff_after_next_step"] = max(
                float((a - b).abs().max()) for a, b in zip(_gathered(engine).values(), _gathered(fresh).values()))
            del fresh
        results.append(row)
        del engine
        dist.barrier()
    Path(config["out_dir"], f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_every_zero_stage_and_optimizer_trains_under_ray_train(ray_session, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder

    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    trainer = TorchTrainer(
        _combinations_loop,
        train_loop_config={"out_dir": str(tmp_path), "ckpt_dir": str(tmp_path / "ckpt")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="deepspeed_combinations", storage_path=str(tmp_path / "ray_results"),
                             worker_runtime_env=env),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["stage"], r["optimizer"]) for r in ranks[0]] == COMBINATIONS
    for row, other in zip(*ranks):
        what = f"ZeRO-{row['stage']} {row['optimizer']}"
        losses = row["losses"]
        assert all(map(lambda x: x == x and abs(x) < 1e6, losses)), (what, losses)
        # the replicas (ZeRO-3: the gathered partitions) are identical after training, and training changed them
        assert row["params_before"] == other["params_before"], (what, "replicas differ at the start")
        assert row["params_after"] == other["params_after"] != row["params_before"], (what, "replicas differ")
        assert losses[-1] < losses[0] - 0.05, (what, losses)  # the updated steps lowered the loss
        unchanged = [n for n, d in row["changed"].items() if d == 0.0]
        assert not unchanged, (what, "parameters never updated", unchanged)
        if row["optimizer"] == "muon":
            assert row["n_muon"] > 0 and not row["mismatched_routing"], (what, row["mismatched_routing"])
        else:
            assert row["n_muon"] == 0
        if row["stage"] == 3:
            assert row["load_path"] and row["client_step"] == STEPS, row
            assert row["fresh_differs_before_load"] > 1e-3, row
            assert row["max_param_diff_after_load"] == 0.0, row
            assert row["next_loss_loaded"] == row["next_loss_original"], row
            assert row["max_param_diff_after_next_step"] == 0.0, row  # optimizer state came back too


def test_cpu_config_keeps_deepspeed_from_building_its_shm_comm_op():
    """A CPU run's engine never JIT-builds DeepSpeed's shared-memory comm op (unused by training; a C++ build of a
    minute or more per process on a small machine): after ``deepspeed_config(..., use_gpu=False)`` DeepSpeed's own
    builder returns nothing, and its comm backend falls back to torch.distributed."""
    import importlib

    from volvlp_ray.config import Config
    from volvlp_ray.train.deepspeed import SHM_COMM_OP, deepspeed_config

    deepspeed_config(Config(), use_gpu=False)
    import deepspeed.ops

    assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
    # (``import deepspeed.comm.torch as m`` would give torch: deepspeed.comm has an attribute named torch)
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
