"""Losses: equal to a single-process computation over the global batch on real gloo groups.

One group per world size (1, 2, 4) is spawned once per module; every worker evaluates all loss cases on
its shard of a fixed global batch (float64, so that equalities can be tight) and saves loss and
gradients. The tests compare them with the same loss evaluated over the global batch in this process
(world size 1, no process group), with each other (ring vs gather, alpha = 1 reductions), and, for
world size 1, with naive reference formulas written from the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from volvlp_ray.benchmarks.loss import LiveTensorBytes
from volvlp_ray.losses import (
    ClipLoss,
    SigmoidLoss,
    SWCALoss,
    build_loss,
    concepts_from_reports,
    soft_targets,
    world_info,
)

WORLD_SIZES = (1, 2, 4)
GLOBAL_BATCH = 12  # local batches 12, 6, 3 (odd: unequal ring halves)
DIM, N_LABELS = 16, 5
SWCA = dict(alpha=0.4, spatial_weight=1.0, knowledge_weight=0.7, intra_weight=0.5, spatial_sigma_mm=30.0,
            norm="none")  # SCALE-VLP's formula (the cases below with "row" use the batch-independent targets)
ROW = {**SWCA, "norm": "row"}
SIGMA = 30.0


class WithoutBias(nn.Module):
    """Calls the wrapped loss with ``logit_bias=None``."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x, y, scale, bias, **meta):
        return self.loss(x, y, scale, None, **meta)


CASES: dict[str, Callable[[], nn.Module]] = {
    "clip": ClipLoss,
    "sigmoid_gather": SigmoidLoss,
    "sigmoid_ring": lambda: SigmoidLoss(exchange="ring"),
    "sigmoid_gather_no_bias": lambda: WithoutBias(SigmoidLoss()),
    "sigmoid_ring_no_bias": lambda: WithoutBias(SigmoidLoss(exchange="ring")),
    "swca_sigmoid_gather": lambda: SWCALoss(**SWCA),
    "swca_sigmoid_ring": lambda: SWCALoss(**SWCA, exchange="ring"),
    "swca_softmax": lambda: SWCALoss(**SWCA, form="softmax"),
    "swca_sigmoid_alpha1": lambda: SWCALoss(**{**SWCA, "alpha": 1.0}),
    "swca_sigmoid_ring_alpha1": lambda: SWCALoss(**{**SWCA, "alpha": 1.0}, exchange="ring"),
    "swca_softmax_alpha1": lambda: SWCALoss(**{**SWCA, "alpha": 1.0}, form="softmax"),
    "swca_sigmoid_no_terms": lambda: SWCALoss(alpha=0.3, spatial_weight=0.0, knowledge_weight=0.0),
    "swca_softmax_no_terms": lambda: SWCALoss(alpha=0.3, form="softmax", spatial_weight=0.0, knowledge_weight=0.0),
}
CASES.update({
    "swca_row_sigmoid_gather": lambda: SWCALoss(**ROW),
    "swca_row_sigmoid_ring": lambda: SWCALoss(**ROW, exchange="ring"),
    "swca_row_softmax": lambda: SWCALoss(**ROW, form="softmax"),
    "swca_row_softmax_no_intra": lambda: SWCALoss(**{**ROW, "intra_weight": 0.0}, form="softmax"),
})
# pairs of different chunks of one study (loss.same_study) in every loss kind and form, with both exchanges
for _mode in ("ignore", "soft"):
    CASES.update({
        f"clip_{_mode}": lambda m=_mode: ClipLoss(same_study=m, spatial_sigma_mm=SIGMA),
        f"sigmoid_gather_{_mode}": lambda m=_mode: SigmoidLoss(same_study=m, spatial_sigma_mm=SIGMA),
        f"sigmoid_ring_{_mode}": lambda m=_mode: SigmoidLoss(exchange="ring", same_study=m, spatial_sigma_mm=SIGMA),
    })
for _mode in ("ignore", "negative"):
    CASES.update({
        f"swca_row_sigmoid_gather_{_mode}": lambda m=_mode: SWCALoss(**ROW, same_study=m),
        f"swca_row_sigmoid_ring_{_mode}": lambda m=_mode: SWCALoss(**ROW, exchange="ring", same_study=m),
        f"swca_row_softmax_{_mode}": lambda m=_mode: SWCALoss(**ROW, form="softmax", same_study=m),
        f"swca_softmax_{_mode}": lambda m=_mode: SWCALoss(**SWCA, form="softmax", same_study=m),
    })
CASES["swca_sigmoid_alpha1_ignore"] = lambda: SWCALoss(**{**SWCA, "alpha": 1.0}, same_study="ignore")
# cases also run with one sample per rank (the second ring half is empty)
TINY_CASES = ("sigmoid_gather", "sigmoid_ring", "swca_sigmoid_gather", "swca_sigmoid_ring", "swca_row_sigmoid_gather",
              "swca_row_sigmoid_ring", "sigmoid_ring_soft", "swca_row_sigmoid_ring_ignore")


def make_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A global batch: features (n, DIM) float64, scale/bias, and SWCA meta (studies of 1-3 chunks)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    return {
        "image": x,
        "text": y,
        "scale": torch.tensor(8.0, dtype=torch.float64),
        "bias": torch.tensor(-4.0, dtype=torch.float64),
        "study_id": torch.arange(n) // 3 + 100 * (torch.arange(n) % 2),
        "z_center_mm": torch.rand(n, generator=g, dtype=torch.float64) * 120,
        "labels": (torch.rand(n, N_LABELS, generator=g) < 0.4).double(),
    }


def evaluate(case: str, data: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Loss and gradients of ``case`` on this rank's shard of ``data``."""
    b = data["image"].shape[0] // world
    part = {k: (v[rank * b : (rank + 1) * b] if v.dim() else v).clone() for k, v in data.items()}
    leaves = {k: part[k].requires_grad_() for k in ("image", "text", "scale", "bias")}
    meta = {k: part[k] for k in ("study_id", "z_center_mm", "labels")}
    loss = CASES[case]()(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"], **meta)
    loss.backward()
    grads = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
    return {"loss": loss.detach(), **grads}


def peak_loss_bytes(exchange: str, local_batch: int = 16, steps: int = 3) -> int:
    """Peak bytes of tensors allocated by a SigmoidLoss forward+backward on this rank (max over steps)."""
    x = F.normalize(torch.randn(local_batch, DIM), dim=1).requires_grad_()
    y = F.normalize(torch.randn(local_batch, DIM), dim=1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    peak = 0
    for _ in range(steps):
        with LiveTensorBytes() as tracker:
            SigmoidLoss(exchange=exchange)(x, y, scale, bias).backward()
        peak = max(peak, tracker.peak)
    return peak


def uneven_batch_errors(rank: int) -> list[str]:
    """Error messages of each loss when rank r holds 4 + r samples (no crash, no hang)."""
    x = F.normalize(torch.randn(4 + rank, DIM), dim=1)
    errors = []
    for make in (ClipLoss, SigmoidLoss, lambda: SigmoidLoss(exchange="ring"), lambda: SWCALoss(alpha=1.0)):
        try:
            make()(x, x, torch.tensor(10.0), torch.tensor(-10.0))
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    return errors


def true_pair_mass(rank: int, world: int, local: int = 3) -> dict[tuple[str, str], torch.Tensor]:
    """The target share of each of this rank's rows on its true pair, and on the other samples, for SWCA with
    either normalisation and form, with ``local`` samples per rank (the global batch grows with the world)."""
    d = make_batch(local * world, seed=2)
    part = {k: (v[rank * local : (rank + 1) * local] if v.dim() else v) for k, v in d.items()}
    meta = {k: part[k] for k in ("study_id", "z_center_mm", "labels")}
    out = {}
    for norm in ("row", "none"):
        for form in ("softmax", "sigmoid"):
            t = SWCALoss(**{**SWCA, "norm": norm}, form=form).target_rows(part["image"], part["text"], **meta)
            diag = t[torch.arange(local), rank * local + torch.arange(local)]
            out[norm, form] = torch.stack([diag, t.sum(1) - diag])
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {(case, GLOBAL_BATCH): evaluate(case, make_batch(GLOBAL_BATCH), rank, world) for case in CASES}
        results.update({(case, world): evaluate(case, make_batch(world, seed=1), rank, world) for case in TINY_CASES})
        results["peak_bytes"] = {exchange: peak_loss_bytes(exchange) for exchange in ("gather", "ring")}
        results["uneven_errors"] = uneven_batch_errors(rank)
        results["true_pair_mass"] = true_pair_mass(rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


_RESULTS: dict[int, list[dict]] = {}


def distributed(world: int, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Per-rank results of a real ``world``-process gloo group (spawned once per module)."""
    if world not in _RESULTS:
        tmp = tmp_path_factory.mktemp(f"gloo{world}")
        mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
        _RESULTS[world] = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
    return _RESULTS[world]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_single_process_over_global_batch(world: int, case: str, tmp_path_factory) -> None:
    ranks = distributed(world, tmp_path_factory)
    for n in (GLOBAL_BATCH, world) if case in TINY_CASES else (GLOBAL_BATCH,):
        ref = evaluate(case, make_batch(n, seed=0 if n == GLOBAL_BATCH else 1), 0, 1)
        results = [r[(case, n)] for r in ranks]
        b = n // world
        # the mean of the rank losses is the global loss
        assert_close(torch.stack([r["loss"] for r in results]).mean(), ref["loss"], f"{case} loss n={n}")
        for rank, res in enumerate(results):
            # feature gradients are those of sum_r L_r = world * global loss
            for key in ("image", "text"):
                assert_close(res[key], world * ref[key][rank * b : (rank + 1) * b], f"{case} d{key} rank {rank}")
        # replicated scale/bias: the data-parallel average of the rank gradients is the global gradient
        for key in ("scale", "bias"):
            assert_close(torch.stack([r[key] for r in results]).mean(), ref[key], f"{case} d{key}")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize(
    "case, same_as",
    [
        ("sigmoid_ring", "sigmoid_gather"),
        ("sigmoid_ring_no_bias", "sigmoid_gather_no_bias"),
        ("swca_sigmoid_ring", "swca_sigmoid_gather"),
        ("swca_sigmoid_alpha1", "sigmoid_gather"),
        ("swca_sigmoid_ring_alpha1", "sigmoid_ring"),
        ("swca_sigmoid_no_terms", "sigmoid_gather"),
        ("swca_softmax_alpha1", "clip"),
        ("swca_softmax_no_terms", "clip"),
        ("swca_row_sigmoid_ring", "swca_row_sigmoid_gather"),
        ("sigmoid_ring_ignore", "sigmoid_gather_ignore"),
        ("sigmoid_ring_soft", "sigmoid_gather_soft"),
        ("swca_row_sigmoid_ring_ignore", "swca_row_sigmoid_gather_ignore"),
        ("swca_row_sigmoid_ring_negative", "swca_row_sigmoid_gather_negative"),
        ("swca_sigmoid_alpha1_ignore", "sigmoid_gather_ignore"),
    ],
)
def test_same_per_rank(world: int, case: str, same_as: str, tmp_path_factory) -> None:
    """Ring equals gather, and SWCA with alpha = 1 (or no soft terms) is the hard loss, on every rank."""
    for rank, res in enumerate(distributed(world, tmp_path_factory)):
        other = res[(same_as, GLOBAL_BATCH)]
        for key, value in res[(case, GLOBAL_BATCH)].items():
            assert_close(value, other[key], f"{case} {key} rank {rank}")


def test_ring_memory_does_not_grow_with_world_size(tmp_path_factory) -> None:
    """Peak bytes allocated by the loss on a rank (see benchmarks/loss.py): ring flat, gather grows."""
    peak = {
        (e, w): max(r["peak_bytes"][e] for r in distributed(w, tmp_path_factory))
        for w in (2, 4)
        for e in ("gather", "ring")
    }
    assert peak["ring", 4] <= 1.1 * peak["ring", 2], peak
    assert peak["gather", 4] > 1.5 * peak["gather", 2], peak


def test_row_targets_give_the_true_pair_the_same_share_when_the_world_size_doubles(tmp_path_factory) -> None:
    """SWCA's targets with ``norm="row"``: at 3 samples per rank, the world size 2 -> 4 doubles the global batch; the
    true pair's share of a row (softmax form) stays alpha and the other samples' share 1 - alpha (sigmoid form: the
    true pair's target stays 1, the others' total 1 - alpha). SCALE-VLP's formula (``norm="none"``) gives the true
    pair less and the others more as the batch grows."""
    alpha = SWCA["alpha"]
    mass = {}
    for w in (2, 4):
        per_world = {key: torch.cat([r["true_pair_mass"][key] for r in distributed(w, tmp_path_factory)], dim=1)
                     for key in [("row", "softmax"), ("row", "sigmoid"), ("none", "softmax"), ("none", "sigmoid")]}
        true, other = per_world["row", "softmax"]
        assert_close(true, torch.full_like(true, alpha), f"softmax true-pair share, world {w}")
        assert_close(other, torch.full_like(other, 1 - alpha), f"softmax other share, world {w}")
        true, other = per_world["row", "sigmoid"]
        assert_close(true, torch.ones_like(true), f"sigmoid true-pair target, world {w}")
        assert_close(other, torch.full_like(other, 1 - alpha), f"sigmoid other total, world {w}")
        mass[w, "none"] = per_world["none", "softmax"]
        mass[w, "none_sigmoid"] = per_world["none", "sigmoid"]
    # the old formula: the true pair's share falls and the others' target mass grows with the batch
    assert mass[4, "none"][0].mean() < 0.85 * mass[2, "none"][0].mean(), (mass[2, "none"][0], mass[4, "none"][0])
    assert mass[4, "none_sigmoid"][1].mean() > 1.5 * mass[2, "none_sigmoid"][1].mean()


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_local_batches_raise_clearly(world: int, tmp_path_factory) -> None:
    for res in distributed(world, tmp_path_factory):
        assert all("local batch sizes differ" in e for e in res["uneven_errors"]), res["uneven_errors"]


# --- naive references written from the definitions (world size 1) ---------------------------------


def _kernel(d: dict[str, torch.Tensor], i: int, j: int, sigma: float) -> float:
    """SWCA's spatial kernel: chunks of one study by the distance of their z-centres, 0 across studies."""
    dz = float(d["z_center_mm"][i] - d["z_center_mm"][j])
    return math.exp(-(dz**2) / (2 * sigma**2)) if d["study_id"][i] == d["study_id"][j] else 0.0


def _same(d: dict[str, torch.Tensor], i: int, j: int) -> bool:
    return i != j and bool(d["study_id"][i] == d["study_id"][j])


def _naive_targets(d: dict[str, torch.Tensor], alpha: float, ws: float, wk: float, wf: float, sigma: float,
                   norm: str = "none", form: str = "sigmoid", same_study: str = "soft"):
    n = d["image"].shape[0]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j or (same_study != "soft" and _same(d, i, j)):
                continue
            li = {k for k in range(N_LABELS) if d["labels"][i, k]}
            lj = {k for k in range(N_LABELS) if d["labels"][j, k]}
            k = len(li & lj) / len(li | lj) if li | lj else 1.0
            f = 0.5 * (max(0.0, float(d["image"][i] @ d["image"][j])) + max(0.0, float(d["text"][i] @ d["text"][j])))
            w[i, j] = (ws * _kernel(d, i, j, sigma) + wk * k + wf * f) / (ws + wk + wf)
    a = (1 - alpha) * w
    for i in range(n):
        if norm == "row" and w[i].sum() > 0:  # the related samples share 1 - alpha; the true pair alpha / 1
            a[i] = (1 - alpha) * w[i] / w[i].sum()
            a[i, i] = alpha if form == "softmax" else 1.0
        else:
            a[i, i] = 1.0
    return a


def _naive_sigmoid(d: dict[str, torch.Tensor], same_study: str, sigma: float) -> torch.Tensor:
    n = d["image"].shape[0]
    logits = d["scale"] * d["image"] @ d["text"].T + d["bias"]
    total = 0.0
    for i in range(n):
        for j in range(n):
            l_ij = float(logits[i, j])
            if _same(d, i, j) and same_study == "ignore":
                continue
            if _same(d, i, j) and same_study == "soft":
                t = _kernel(d, i, j, sigma)
                total += t * math.log(1 + math.exp(-l_ij)) + (1 - t) * math.log(1 + math.exp(l_ij))
            else:
                total += math.log(1 + math.exp(-(1 if i == j else -1) * l_ij))
    return torch.tensor(total / n, dtype=torch.float64)


def _naive_softmax(d: dict[str, torch.Tensor], targets: torch.Tensor, ignore: bool) -> torch.Tensor:
    """Soft InfoNCE both ways over a target matrix (rows normalised here); ``ignore``: pairs of one study are not in
    the softmax."""
    n = d["image"].shape[0]
    logits = d["scale"] * d["image"] @ d["text"].T
    losses = []
    for lg in (logits, logits.T):
        total = 0.0
        for i in range(n):
            keep = [j for j in range(n) if not (ignore and _same(d, i, j))]
            norm = sum(float(targets[i, j]) for j in keep)
            lse = math.log(sum(math.exp(float(lg[i, j])) for j in keep))
            total -= sum(float(targets[i, j]) / norm * (float(lg[i, j]) - lse) for j in keep)
        losses.append(total / n)
    return torch.tensor(sum(losses) / 2, dtype=torch.float64)


def test_naive_references() -> None:
    d = make_batch(GLOBAL_BATCH)
    x, y, s, b, n = d["image"], d["text"], d["scale"], d["bias"], GLOBAL_BATCH
    meta = {k: d[k] for k in ("study_id", "z_center_mm", "labels")}
    logits = s * x @ y.T + b
    sig = sum(math.log(1 + math.exp(-(1 if i == j else -1) * float(logits[i, j]))) for i in range(n) for j in range(n))
    assert_close(SigmoidLoss()(x, y, s, b), torch.tensor(sig / n, dtype=torch.float64), "sigmoid")
    l_img = s * x @ y.T
    clip = 0.5 * (F.cross_entropy(l_img, torch.arange(n)) + F.cross_entropy(l_img.T, torch.arange(n)))
    assert_close(ClipLoss()(x, y, s), clip, "clip")
    a = _naive_targets(d, SWCA["alpha"], 1.0, 0.7, 0.5, 30.0)
    bce = F.binary_cross_entropy_with_logits(logits, a, reduction="sum") / n
    assert_close(SWCALoss(**SWCA)(x, y, s, b, **meta), bce, "swca sigmoid")
    p = a / a.sum(1, keepdim=True)
    soft = -0.5 * ((p * l_img.log_softmax(1)).sum(1).mean() + (p * l_img.T.log_softmax(1)).sum(1).mean())
    assert_close(SWCALoss(**SWCA, form="softmax")(x, y, s, b, **meta), soft, "swca softmax")


def test_naive_references_of_same_study_pairs_and_row_targets() -> None:
    """``loss.same_study`` in every loss kind and form, and SWCA's row-normalised targets, against loops written
    from the definitions (the batch has studies of 1-3 chunks, so same-study pairs are many)."""
    d = make_batch(GLOBAL_BATCH)
    x, y, s, b, n = d["image"], d["text"], d["scale"], d["bias"], GLOBAL_BATCH
    meta = {k: d[k] for k in ("study_id", "z_center_mm", "labels")}
    assert sum(_same(d, i, j) for i in range(n) for j in range(n)) >= 6
    eye = torch.eye(n, dtype=torch.float64)
    logits = s * x @ y.T + b
    for mode in ("negative", "ignore", "soft"):
        assert_close(SigmoidLoss(same_study=mode, spatial_sigma_mm=SIGMA)(x, y, s, b, **meta),
                     _naive_sigmoid(d, mode, SIGMA), f"sigmoid {mode}")
        t = eye + (torch.tensor([[_kernel(d, i, j, SIGMA) * _same(d, i, j) for j in range(n)] for i in range(n)],
                                dtype=torch.float64) if mode == "soft" else 0)
        assert_close(ClipLoss(same_study=mode, spatial_sigma_mm=SIGMA)(x, y, s, None, **meta),
                     _naive_softmax(d, t, mode == "ignore"), f"clip {mode}")
        for norm in ("none", "row"):
            weights = (SWCA["alpha"], 1.0, 0.7, 0.5, SIGMA)
            a = _naive_targets(d, *weights, norm=norm, form="sigmoid", same_study=mode)
            keep = torch.tensor([[not (mode == "ignore" and _same(d, i, j)) for j in range(n)] for i in range(n)])
            bce = (F.binary_cross_entropy_with_logits(logits, a, reduction="none") * keep).sum() / n
            cfg = {**SWCA, "norm": norm, "same_study": mode}
            assert_close(SWCALoss(**cfg)(x, y, s, b, **meta), bce, f"swca sigmoid {norm} {mode}")
            a = _naive_targets(d, *weights, norm=norm, form="softmax", same_study=mode)
            assert_close(SWCALoss(**cfg, form="softmax")(x, y, s, b, **meta), _naive_softmax(d, a, mode == "ignore"),
                         f"swca softmax {norm} {mode}")


def _previous_losses(x, y, s, b, meta, swca: dict) -> dict[str, torch.Tensor]:
    """The losses as they were before ``loss.same_study`` and ``loss.soft_norm`` existed (frozen copies of their
    arithmetic, world size 1), for the bit-for-bit comparison below."""
    n = x.shape[0]
    logits = s * (x @ y.T) + b
    positive = torch.eye(n, dtype=torch.bool)
    out = {"sigmoid": -F.logsigmoid(torch.where(positive, logits, -logits)).sum() / n}
    li, lt = s * x @ y.T, s * y @ x.T
    out["clip"] = 0.5 * (F.cross_entropy(li, torch.arange(n)) + F.cross_entropy(lt, torch.arange(n)))
    eye = positive.to(logits.dtype)
    w = torch.zeros_like(eye)
    total = swca["spatial_weight"] + swca["knowledge_weight"] + swca["intra_weight"]
    dz = meta["z_center_mm"][:, None] - meta["z_center_mm"][None, :]
    w += swca["spatial_weight"] * (torch.exp(-0.5 * (dz / swca["spatial_sigma_mm"]) ** 2)
                                   * (meta["study_id"][:, None] == meta["study_id"][None, :]))
    lab = meta["labels"].to(logits.dtype)
    inter = lab @ lab.T
    union = (lab * lab).sum(1)[:, None] + (lab * lab).sum(1)[None, :] - inter
    w += swca["knowledge_weight"] * torch.where(union > 0, inter / union.clamp_min(1e-12), torch.ones_like(inter))
    w = torch.where(positive, torch.ones_like(w), w / total)
    a = swca["alpha"] * eye + (1.0 - swca["alpha"]) * w
    out["swca_sigmoid"] = -(a * F.logsigmoid(logits) + (1.0 - a) * F.logsigmoid(-logits)).sum() / n
    p = a / a.sum(dim=1, keepdim=True)
    out["swca_softmax"] = 0.5 * (-(p * F.log_softmax(li, dim=1)).sum(dim=1).mean()
                                 - (p * F.log_softmax(lt, dim=1)).sum(dim=1).mean())
    return out


def test_one_chunk_per_study_with_the_defaults_is_the_previous_loss_bit_for_bit() -> None:
    """With ``data.chunks_per_volume=1`` and the default ``loss.same_study`` (auto), the losses the loop builds are
    the previous ones bit for bit (float32, as trained); SWCA with ``loss.soft_norm=none`` too (its default is now
    "row", batch-independent targets, on purpose)."""
    from volvlp_ray.config import Config, load_config
    from volvlp_ray.train.loop import build_loss_from_config

    d = {k: (v.float() if v.is_floating_point() else v) for k, v in make_batch(GLOBAL_BATCH).items()}
    d["study_id"] = torch.arange(GLOBAL_BATCH)  # one chunk per study
    x, y, s, b = d["image"], d["text"], d["scale"], d["bias"]
    meta = {k: d[k] for k in ("study_id", "z_center_mm", "labels")}
    swca = {"alpha": 0.5, "spatial_weight": 1.0, "knowledge_weight": 1.0, "intra_weight": 0.0,
            "spatial_sigma_mm": 50.0}
    previous = _previous_losses(x, y, s, b, meta, swca)
    builds = {"sigmoid": [], "clip": ["loss.kind=clip"], "swca_sigmoid": ["loss.kind=swca", "loss.soft_norm=none"],
              "swca_softmax": ["loss.kind=swca", "loss.soft_norm=none", "loss.form=softmax"]}
    assert Config().loss.same_study == "auto" and Config().data.chunks_per_volume == 1
    for name, overrides in builds.items():
        loss = build_loss_from_config(load_config(None, overrides))
        got = loss(x, y, s, b, **{k: meta[k] for k in loss.meta_keys})
        assert got.dtype == torch.float32 and torch.equal(got, previous[name]), (name, got, previous[name])


# --- affinities, soft targets and interface -------------------------------------------------------


def test_soft_targets_properties() -> None:
    d = make_batch(GLOBAL_BATCH)
    rows = {"index": torch.arange(GLOBAL_BATCH)}
    rows.update({k: d[k] for k in ("study_id", "z_center_mm", "labels", "image", "text")})
    a = soft_targets(rows, rows, alpha=0.3, spatial_weight=1, knowledge_weight=1, intra_weight=1)
    assert a.shape == (GLOBAL_BATCH, GLOBAL_BATCH)
    assert torch.equal(a.diagonal(), torch.ones(GLOBAL_BATCH))
    assert (a >= 0).all() and (a <= 1).all() and torch.allclose(a, a.T)
    spatial_only = soft_targets(rows, rows, alpha=0.0, spatial_weight=1, knowledge_weight=0)
    other_study = d["study_id"][:, None] != d["study_id"][None, :]
    assert (spatial_only[other_study] == 0).all() and (spatial_only[~other_study] > 0).all()
    # a block of rows against a block of columns is the corresponding sub-matrix
    sub = {k: v[4:8] for k, v in rows.items()}
    block = soft_targets(sub, rows, alpha=0.3, spatial_weight=1, knowledge_weight=1, intra_weight=1)
    assert torch.equal(block, a[4:8])
    assert torch.equal(soft_targets(rows, rows, alpha=1.0, spatial_weight=1), torch.eye(GLOBAL_BATCH))


def test_interface_and_errors() -> None:
    assert world_info() == (0, 1)
    d = make_batch(4)
    x, y, s, b = d["image"], d["text"], d["scale"], d["bias"]
    for kind, cls in (("clip", ClipLoss), ("sigmoid", SigmoidLoss), ("swca", SWCALoss)):
        loss = build_loss(kind)
        assert isinstance(loss, cls) and isinstance(loss.needs_bias, bool) and isinstance(loss.meta_keys, tuple)
    assert build_loss("swca", alpha=0.2, form="softmax").form == "softmax"
    assert SWCALoss().meta_keys == ("study_id", "z_center_mm", "labels") and SWCALoss().needs_meta
    assert SWCALoss(knowledge_weight=0).meta_keys == ("study_id", "z_center_mm")
    assert SWCALoss(alpha=1.0).meta_keys == () and not SigmoidLoss().needs_meta
    with pytest.raises(ValueError, match="valid kinds"):
        build_loss("triplet")
    with pytest.raises(ValueError, match="'labels' is required"):
        SWCALoss(spatial_weight=0)(x, y, s, b)
    SWCALoss(knowledge_weight=0, spatial_weight=0, intra_weight=1.0)(x, y, s, b)  # needs no meta
    with pytest.raises(TypeError, match="unknown meta"):
        SigmoidLoss()(x, y, s, b, study=d["study_id"])
    with pytest.raises(ValueError, match="first dimension 4"):
        SWCALoss(spatial_weight=0)(x, y, s, b, labels=d["labels"][:3])
    with pytest.raises(ValueError, match="0-dim"):
        ClipLoss()(x, y, s.reshape(1))
    with pytest.raises(ValueError, match="ring"):
        SWCALoss(form="softmax", exchange="ring")
    with pytest.raises(ValueError, match="alpha"):
        SWCALoss(alpha=1.5)


def test_concepts_from_reports() -> None:
    reports = ["Cardiomegaly. No pleural effusion.", "Multiple lung nodules; bilateral pleural effusions.", ""]
    c = concepts_from_reports(reports, ("Cardiomegaly", "Lung nodule", "Pleural effusion"))
    assert c.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
