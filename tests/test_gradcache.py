"""GradCache: micro-batched embedding-gradient caching gives the full-batch parameter gradients.

World size 1 in this process; world size 2 on a real gloo group, where the data-parallel average of
the ranks' gradients must equal the single-process full-batch gradient over the global batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from volvlp_ray.losses import GradCache, build_loss
from volvlp_ray.losses.gradcache import split_batch

GLOBAL_BATCH, MICRO = 8, 3  # micro-batches of 3, 3, 2 per rank at world size 1
LOSSES = {
    "clip": {},
    "sigmoid": {},
    "sigmoid_ring": {"exchange": "ring"},
    "swca": {"alpha": 0.5, "intra_weight": 0.5},
}


class TinyVLP(nn.Module):
    """Two small towers; the text tower takes a dict (token ids + mask), like a tokenizer's output."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8))
        self.embed = nn.Embedding(20, 16)
        self.text_proj = nn.Linear(16, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(images), dim=-1)

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = text["mask"].unsqueeze(-1).float()
        pooled = (self.embed(text["ids"]) * mask).sum(1) / mask.sum(1)
        return F.normalize(self.text_proj(pooled), dim=-1)


def make_data(n: int = GLOBAL_BATCH) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[::2, 3:] = 0
    return {
        "images": torch.randn(n, 12, generator=g),
        "texts": {"ids": torch.randint(0, 20, (n, 5), generator=g), "mask": mask},
        "meta": {
            "study_id": torch.arange(n) // 2,
            "z_center_mm": torch.rand(n, generator=g) * 100,
            "labels": (torch.rand(n, 4, generator=g) < 0.5).float(),
        },
    }


def shard(data: dict, rank: int, world: int) -> dict:
    b = GLOBAL_BATCH // world
    return {
        k: v[rank * b : (rank + 1) * b] if isinstance(v, torch.Tensor) else shard(v, rank, world)
        for k, v in data.items()
    }


def param_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def full_batch_grads(model: TinyVLP, loss_fn: nn.Module, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn(
        model.encode_image(data["images"]),
        model.encode_text(data["texts"]),
        model.logit_scale.exp(),
        model.logit_bias,
        **data["meta"],
    )
    loss.backward()
    return loss.detach(), param_grads(model)


def cached_grads(model: TinyVLP, loss_fn: nn.Module, data: dict, micro: int = MICRO):
    model.zero_grad()
    cache = GradCache(model.encode_image, model.encode_text, loss_fn, micro)
    loss = cache.step(data["images"], data["texts"], model.logit_scale.exp(), model.logit_bias, **data["meta"])
    return loss, param_grads(model)


def assert_grads_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.mark.parametrize("kind", list(LOSSES))
def test_grad_cache_equals_full_batch(kind: str) -> None:
    torch.manual_seed(0)
    model, data = TinyVLP(), make_data()
    loss_fn = build_loss(kind.split("_")[0], **LOSSES[kind])
    ref_loss, ref = full_batch_grads(model, loss_fn, data)
    loss, grads = cached_grads(model, loss_fn, data)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_close(grads, ref, kind)
    assert ref["logit_scale"].abs() > 0 and (kind == "clip" or ref["logit_bias"].abs() > 0)


def test_grad_cache_replays_dropout() -> None:
    """Re-embedding sees the dropout masks of the no-grad pass (one micro-batch = the full batch)."""
    torch.manual_seed(0)
    model, data = TinyVLP(dropout=0.5), make_data()
    loss_fn = build_loss("sigmoid")
    torch.manual_seed(1)
    ref_loss, ref = full_batch_grads(model, loss_fn, data)
    torch.manual_seed(1)
    loss, grads = cached_grads(model, loss_fn, data, micro=GLOBAL_BATCH)
    torch.testing.assert_close(loss, ref_loss)
    assert_grads_close(grads, ref, "dropout")


def test_split_batch_nested() -> None:
    parts = split_batch({"a": torch.arange(5), "b": [torch.zeros(5, 2), "keep"]}, 2)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert [p["b"][0].shape[0] for p in parts] == [2, 2, 1] and all(p["b"][1] == "keep" for p in parts)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {}
        for kind, kwargs in LOSSES.items():
            torch.manual_seed(0)
            model, data = TinyVLP(), shard(make_data(), rank, world)
            loss_fn = build_loss(kind.split("_")[0], **kwargs)
            results[kind] = {
                "cached": cached_grads(model, loss_fn, data, micro=3),
                "direct": full_batch_grads(model, loss_fn, data),
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_grad_cache_distributed_world_2(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for kind, kwargs in LOSSES.items():
        torch.manual_seed(0)
        model = TinyVLP()
        ref_loss, ref = full_batch_grads(model, build_loss(kind.split("_")[0], **kwargs), make_data())
        for rank, res in enumerate(ranks):  # same as the distributed step without caching, rank by rank
            assert_grads_close(res[kind]["cached"][1], res[kind]["direct"][1], f"{kind} rank {rank}")
        # the data-parallel average is the single-process full-batch gradient
        averaged = {k: torch.stack([r[kind]["cached"][1][k] for r in ranks]).mean(0) for k in ref}
        assert_grads_close(averaged, ref, f"{kind} average")
        mean_loss = torch.stack([r[kind]["cached"][0] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, ref_loss)
