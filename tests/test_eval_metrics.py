"""Known-answer and reference tests for volvlp_ray.eval (retrieval, zero-shot, probe, plots)."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, roc_auc_score, roc_curve

from volvlp_ray.eval import (
    DEFAULT_PROMPTS,
    bidirectional_retrieval,
    build_prompts,
    classification_metrics,
    correct_ranks,
    flatten_metrics,
    label_jaccard_at_k,
    linear_probe,
    pairwise_jaccard,
    plot_auroc_bars,
    plot_embedding_projection,
    plot_recall_curves,
    plot_similarity_matrix,
    retrieval_metrics,
    save_all_plots,
    zero_shot_scores,
)

MLFLOW_KEY = re.compile(r"^[/\w.\- :]*$")  # mlflow.utils.validation.validate_param_and_metric_name


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- retrieval


def test_identical_embeddings_retrieve_perfectly() -> None:
    x = _rng().normal(size=(200, 32))
    m = retrieval_metrics(x, x, ks=(1, 5, 10))
    assert m["recall_at_1"] == m["recall_at_5"] == 1.0
    assert m["mrr"] == 1.0 and m["median_rank"] == 1.0
    assert m["recall_at_1_random"] == pytest.approx(1 / 200)


def test_random_embeddings_match_random_baseline() -> None:
    n, seeds = 500, 10
    runs = [retrieval_metrics(_rng(s).normal(size=(n, 16)), _rng(100 + s).normal(size=(n, 16))) for s in range(seeds)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    assert mean["recall_at_5"] == pytest.approx(mean["recall_at_5_random"], abs=0.006)
    assert mean["recall_at_50"] == pytest.approx(mean["recall_at_50_random"], abs=0.02)
    assert mean["recall_at_100"] == pytest.approx(mean["recall_at_100_random"], abs=0.025)
    harmonic = sum(1 / r for r in range(1, n + 1))
    assert mean["mrr_random"] == pytest.approx(harmonic / n)
    assert mean["mrr"] == pytest.approx(mean["mrr_random"], abs=0.004)
    assert mean["median_rank"] == pytest.approx((n + 1) / 2, rel=0.06)


def test_ranks_match_brute_force_and_ties_are_pessimistic() -> None:
    q, t = _rng(1).normal(size=(50, 8)), _rng(2).normal(size=(50, 8))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    order = np.argsort(-(qn @ tn.T), axis=1)
    expected = np.array([int(np.flatnonzero(order[i] == i)[0]) + 1 for i in range(50)])
    np.testing.assert_array_equal(correct_ranks(q, t), expected)
    # a collapsed encoder ties everything: pessimistic rank N, never a lucky rank 1
    same = np.ones((10, 4))
    m = retrieval_metrics(same, same, ks=(1, 5))
    assert m["recall_at_1"] == 0.0 and m["median_rank"] == 10 and m["mrr"] == pytest.approx(0.1)


def test_k_larger_than_gallery_is_capped_and_counted() -> None:
    x = _rng().normal(size=(20, 8))
    m = retrieval_metrics(x, _rng(5).normal(size=(20, 8)), ks=(1, 5, 50, 100))
    assert m["recall_at_50"] == m["recall_at_100"] == 1.0
    assert m["recall_at_50_random"] == m["recall_at_100_random"] == 1.0
    assert m["n_ks_capped"] == 2 and m["n"] == 20


def test_bidirectional_keys_and_directions() -> None:
    rng = _rng(3)
    text = rng.normal(size=(100, 16))
    vol = text + 0.8 * rng.normal(size=(100, 16))
    m = bidirectional_retrieval(torch.tensor(text, dtype=torch.bfloat16), torch.tensor(vol))
    assert {"t2v/recall_at_5", "v2t/mrr", "t2v/recall_at_5_random", "v2t/median_rank_random"} <= set(m)
    assert all(MLFLOW_KEY.match(k) for k in m)
    assert m["t2v/recall_at_10"] > m["t2v/recall_at_10_random"]
    assert m["v2t/mrr"] == pytest.approx(retrieval_metrics(vol, text.astype(np.float32))["mrr"], abs=0.05)


def test_bad_embeddings_raise() -> None:
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(x, np.ones((4, 3)))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(x, x)


def test_label_jaccard_identical_labels_is_one() -> None:
    emb = _rng().normal(size=(30, 8))
    labels = np.tile([1, 0, 1, 1, 0], (30, 1))
    m = label_jaccard_at_k(emb, labels, ks=(1, 5, 10))
    assert m["jaccard_at_1"] == m["jaccard_at_10"] == m["jaccard_random"] == 1.0


def test_label_jaccard_known_answer_and_self_exclusion() -> None:
    # two clusters in embedding space; labels: {0,1}, {0,1}, {0}, {2}
    emb = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labels = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]])
    m = label_jaccard_at_k(emb, labels, ks=(1, 3))
    assert m["jaccard_at_1"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    jac = pairwise_jaccard(labels, labels)
    off_diag = (jac.sum(1) - 1) / 3
    assert m["jaccard_at_3"] == pytest.approx(off_diag.mean())  # K = gallery: every other volume
    assert m["jaccard_random"] == pytest.approx(off_diag.mean())
    assert label_jaccard_at_k(emb, labels, ks=(1,), exclude_self=False)["jaccard_at_1"] == 1.0
    assert label_jaccard_at_k(emb, labels, ks=(5,))["n_ks_capped"] == 1


def test_label_jaccard_empty_sets_and_abnormal_gallery() -> None:
    assert pairwise_jaccard(np.zeros((1, 3)), np.zeros((1, 3)))[0, 0] == 1.0
    assert pairwise_jaccard(np.zeros((1, 3)), np.zeros((1, 3)), empty_value=0.0)[0, 0] == 0.0
    rng = _rng(4)
    labels = (rng.random((60, 5)) < 0.2).astype(int)
    emb = rng.normal(size=(60, 8))
    m = label_jaccard_at_k(emb, labels, ks=(1, 5), abnormal_gallery_only=True)
    assert m["n_gallery"] == float((labels.sum(1) > 0).sum()) and m["n_queries"] == 60
    # brute force: jaccard@5 over the abnormal gallery, self excluded
    gallery = np.flatnonzero(labels.sum(1) > 0)
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    jac = pairwise_jaccard(labels, labels)
    vals = []
    for i in range(60):
        cand = [g for g in gallery if g != i]
        top = sorted(cand, key=lambda g: -(en[i] @ en[g]))[:5]
        vals.append(np.mean(jac[i, top]))
    assert m["jaccard_at_5"] == pytest.approx(np.mean(vals))


# ---------------------------------------------------------------- zero-shot


def test_build_prompts() -> None:
    pos, neg = build_prompts(["Cardiomegaly", "Emphysema"])
    assert DEFAULT_PROMPTS == ("{label} is present.", "{label} is not present.")
    assert pos == ["Cardiomegaly is present.", "Emphysema is present."]
    assert neg == ["Cardiomegaly is not present.", "Emphysema is not present."]
    assert build_prompts(["X"], ("{label}.", "not {label}.")) == (["X."], ["not X."])
    with pytest.raises(ValueError):
        build_prompts(["X"], ("present", "absent"))


def test_zero_shot_scores_is_pairwise_softmax() -> None:
    rng = _rng(5)
    img, pos, neg = (torch.tensor(rng.normal(size=s), dtype=torch.float32) for s in [(7, 12), (3, 12), (3, 12)])
    scale = 20.0
    scores = zero_shot_scores(img, pos, neg, logit_scale=scale)
    f = torch.nn.functional.normalize
    logits = torch.stack([f(img, dim=-1) @ f(pos, dim=-1).T, f(img, dim=-1) @ f(neg, dim=-1).T], -1) * scale
    expected = torch.softmax(logits, dim=-1)[..., 0].numpy()
    assert scores.shape == (7, 3)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def _names(n: int) -> list[str]:
    return [f"label {i}" for i in range(n)]


def test_perfect_and_inverted_scorers() -> None:
    rng = _rng(6)
    labels = (rng.random((300, 4)) < 0.3).astype(int)
    scores = labels * 0.5 + 0.25 + 0.1 * rng.random((300, 4))
    m = classification_metrics(scores, labels, _names(4), n_bootstrap=50)
    for metric in ("auroc", "f1_weighted", "accuracy", "precision_weighted", "precision_positive"):
        assert m["mean"][metric] == pytest.approx(1.0)
    assert m["mean"]["auroc_ci_low"] == pytest.approx(1.0)
    inv = classification_metrics(1 - scores, labels, _names(4), n_bootstrap=0)
    assert inv["mean"]["auroc"] == pytest.approx(0.0)
    assert math.isnan(inv["mean"]["auroc_ci_low"])


def test_auroc_and_thresholded_metrics_match_sklearn_with_ties() -> None:
    rng = _rng(7)
    n, n_labels = 400, 6
    labels = (rng.random((n, n_labels)) < rng.uniform(0.05, 0.5, n_labels)).astype(int)
    scores = np.round(0.3 * labels + rng.random((n, n_labels)), 1)  # coarse: many ties
    m = classification_metrics(scores, labels, _names(n_labels), n_bootstrap=0)
    for j, name in enumerate(_names(n_labels)):
        entry, y, s = m["per_label"][name], labels[:, j], scores[:, j]
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        pred = (s >= entry["threshold"]).astype(int)
        assert entry["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
        assert entry["accuracy"] == pytest.approx(accuracy_score(y, pred))
        weighted_precision = precision_score(y, pred, average="weighted", zero_division=0)
        assert entry["precision_weighted"] == pytest.approx(weighted_precision)
        assert entry["precision_positive"] == pytest.approx(precision_score(y, pred, zero_division=0))
        # the threshold is the ROC point closest to the top-left corner
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        dist = (1 - tpr) ** 2 + fpr**2
        assert (1 - entry["sensitivity"]) ** 2 + (1 - entry["specificity"]) ** 2 == pytest.approx(dist.min())
        assert entry["threshold"] in thr
    sk_mean = np.mean([roc_auc_score(labels[:, j], scores[:, j]) for j in range(n_labels)])
    assert m["mean"]["auroc"] == pytest.approx(sk_mean)


def test_grid_threshold_reproduces_ct_clip_loop() -> None:
    rng = _rng(8)
    labels = (rng.random((300, 3)) < 0.3).astype(int)
    scores = np.clip(0.25 * labels + rng.random((300, 3)) * 0.75, 0, 1)
    m = classification_metrics(scores, labels, _names(3), n_bootstrap=0, threshold_mode="grid")
    for j, name in enumerate(_names(3)):
        best, best_t = 10000.0, 0.0
        for t in np.linspace(0, 1, 100):  # CT-CLIP's find_threshold
            cm = confusion_matrix(labels[:, j], (scores[:, j] > t).astype(int), labels=[0, 1])
            d = math.sqrt((1 - cm[1, 1] / (cm[1, 1] + cm[1, 0])) ** 2 + (cm[0, 1] / (cm[0, 1] + cm[0, 0])) ** 2)
            if d <= best:
                best, best_t = d, t
        assert m["per_label"][name]["threshold"] == pytest.approx(best_t)
        pred = (scores[:, j] > best_t).astype(int)
        assert m["per_label"][name]["f1_weighted"] == pytest.approx(f1_score(labels[:, j], pred, average="weighted"))


def test_bootstrap_ci_contains_estimate_narrows_and_is_reproducible() -> None:
    def run(n: int, seed: int = 0) -> dict:
        rng = _rng(9)
        labels = (rng.random((n, 5)) < 0.3).astype(int)
        scores = 0.4 * labels + rng.random((n, 5))
        return classification_metrics(scores, labels, _names(5), n_bootstrap=300, seed=seed)

    small, large = run(200), run(2000)
    for m in (small, large):
        assert m["mean"]["auroc_ci_low"] <= m["mean"]["auroc"] <= m["mean"]["auroc_ci_high"]
        for entry in m["per_label"].values():
            for metric in ("auroc", "f1_weighted", "accuracy"):
                assert entry[f"{metric}_ci_low"] <= entry[metric] <= entry[f"{metric}_ci_high"]
    width = lambda m: m["mean"]["auroc_ci_high"] - m["mean"]["auroc_ci_low"]  # noqa: E731
    assert width(large) < 0.6 * width(small)
    assert run(200)["mean"] == small["mean"]
    assert run(200, seed=1)["mean"]["auroc_ci_low"] != small["mean"]["auroc_ci_low"]


def test_bootstrap_is_fast() -> None:
    rng = _rng(10)
    labels = (rng.random((3000, 18)) < 0.2).astype(int)
    scores = 0.3 * labels + rng.random((3000, 18))
    start = time.perf_counter()
    m = classification_metrics(scores, labels, _names(18), n_bootstrap=1000)
    assert time.perf_counter() - start < 10.0  # ~0.5 s on 2 CPU cores
    assert m["n_bootstrap"] == 1000 and m["n_labels_evaluated"] == 18


def test_single_class_label_is_skipped_and_flatten_is_mlflow_safe() -> None:
    rng = _rng(11)
    labels = (rng.random((100, 3)) < 0.4).astype(int)
    labels[:, 1] = 0
    scores = rng.random((100, 3))
    names = ["Lung nodule", "Hiatal hernia (rare)", "Emphysema"]
    m = classification_metrics(scores, labels, names, n_bootstrap=20)
    assert m["skipped"] == ["Hiatal hernia (rare)"] and m["n_labels_evaluated"] == 2
    assert math.isnan(m["per_label"]["Hiatal hernia (rare)"]["auroc"])
    assert m["mean"]["auroc"] == pytest.approx(
        np.mean([roc_auc_score(labels[:, j], scores[:, j]) for j in (0, 2)])
    )
    flat = flatten_metrics(m, prefix="zeroshot/")
    assert "zeroshot/mean/auroc" in flat and "zeroshot/per_label/Lung nodule/auroc_ci_low" in flat
    assert "zeroshot/per_label/Hiatal hernia _rare_/auroc" not in flat  # NaN left out
    assert flat["zeroshot/per_label/Hiatal hernia _rare_/n_neg"] == 100
    assert all(MLFLOW_KEY.match(k) and math.isfinite(v) for k, v in flat.items())


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_data() -> None:
    rng = _rng(12)
    n_train, n_test, dim = 300, 200, 16
    directions = rng.normal(size=(3, dim))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, dim))
        y = (x @ directions.T > 0).astype(int)
        return x, y

    (x_tr, y_tr), (x_te, y_te) = split(n_train), split(n_test)
    y_tr[:, 2] = 1  # one class in train: cannot be fitted
    m = linear_probe(x_tr, y_tr, x_te, y_te, ["a", "b", "c"], normalize=False, C=10.0)
    assert m["per_label"]["a"]["auroc"] > 0.99 and m["per_label"]["b"]["auroc"] > 0.99
    assert m["skipped_train"] == ["c"] and math.isnan(m["per_label"]["c"]["auroc"])
    assert m["mean"]["auroc"] > 0.99 and m["n_labels"] == 3
    assert m["scores"].shape == (n_test, 3) and np.isnan(m["scores"][:, 2]).all()
    assert list(m["per_label"]) == ["a", "b", "c"]


# ---------------------------------------------------------------- plots


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_non_empty_pngs(tmp_path) -> None:
    rng = _rng(13)
    n, names = 80, _names(4)
    labels = (rng.random((n, 4)) < 0.3).astype(int)
    vol = rng.normal(size=(n, 16)) + labels @ rng.normal(size=(4, 16))
    text = vol + 0.5 * rng.normal(size=(n, 16))
    retrieval = bidirectional_retrieval(text, vol, ks=(1, 5, 10, 50, 100))
    zs = classification_metrics(rng.random((n, 4)) + 0.3 * labels, labels, names, n_bootstrap=50)
    paths = save_all_plots(
        tmp_path / "plots",
        retrieval=retrieval,
        classification={"zeroshot": zs},
        text_emb=text,
        volume_emb=vol,
        labels=labels,
        label_names=names,
        color_by=["label 1"],
    )
    assert len(paths) == 6
    for p in paths:
        assert _is_png(p) and (tmp_path / "plots").joinpath(p.rsplit("/", 1)[-1]).stat().st_size > 1000
    figs = [
        plot_auroc_bars(zs),
        plot_recall_curves(retrieval_metrics(text, vol)),
        plot_similarity_matrix(torch.tensor(text), vol, max_items=64),
        plot_embedding_projection(vol, labels.sum(1) + rng.random(n), "score", method="tsne"),
    ]
    for i, fig in enumerate(figs):
        out = tmp_path / f"fig{i}.png"
        fig.savefig(out)
        assert _is_png(str(out)) and out.stat().st_size > 1000


# ---------------------------------------------------------------- whole-volume embeddings (sliding chunks)


@pytest.fixture(scope="module")
def tiny_vlp():
    from volvlp_ray.config import ModelConfig
    from volvlp_ray.models import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(["Cardiomegaly is present.", "No pleural effusion.", "A lung nodule."] * 4, vocab_size=120)
    return build_model(ModelConfig(), tok).eval()


def test_chunk_starts_cover_every_slice() -> None:
    from volvlp_ray.eval.embed import chunk_starts

    assert chunk_starts(10, 16, 8) == [0]  # shallower than a chunk: one chunk, the whole volume
    assert chunk_starts(16, 16, 8) == [0]
    assert chunk_starts(40, 16, 8) == [0, 8, 16, 24]  # 24 + 16 = 40: ends exactly at the last slice
    assert chunk_starts(42, 16, 8) == [0, 8, 16, 24, 26]  # the last chunk ends at slice 42
    assert chunk_starts(48, 16, 16) == [0, 16, 32]
    for depth in range(1, 60):
        starts = chunk_starts(depth, 12, 5)
        covered = set().union(*(range(s, min(s + 12, depth)) for s in starts))
        assert covered == set(range(depth)) and starts == sorted(set(starts))
    with pytest.raises(ValueError):
        chunk_starts(10, 0, 4)


def test_sliding_embedding_pools_chunk_embeddings(tiny_vlp) -> None:
    from volvlp_ray.eval.embed import encode_volumes

    model = tiny_vlp
    g = torch.Generator().manual_seed(0)
    deep, shallow = torch.rand(40, 64, 64, generator=g) * 2 - 1, torch.rand(12, 64, 64, generator=g) * 2 - 1
    batch = torch.full((2, 1, 40, 64, 64), -1.0)
    batch[0, 0], batch[1, 0, :12] = deep, shallow
    depths = torch.tensor([40, 12])
    with torch.no_grad():
        whole = encode_volumes(model, batch, depths, "whole")
        mean = encode_volumes(model, batch, depths, "sliding", chunk_depth=16, chunk_stride=8, pool="mean")
        mx = encode_volumes(model, batch, depths, "sliding", chunk_depth=16, chunk_stride=8, pool="max")
        # reference: each chunk of the deep volume on its own
        chunks = torch.stack([deep[s : s + 16][None] for s in (0, 8, 16, 24)])
        f = model.encode_image(chunks, torch.full((4,), 16))
    assert mean.shape == (2, 128) and torch.allclose(mean.norm(dim=1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(mean[0], torch.nn.functional.normalize(f.mean(0), dim=0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mx[0], torch.nn.functional.normalize(f.max(0).values, dim=0), atol=1e-5, rtol=1e-4)
    # a volume no deeper than a chunk is one chunk: sliding == whole, whatever the pooling
    torch.testing.assert_close(mean[1], whole[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mx[1], whole[1], atol=1e-5, rtol=1e-4)
    # chunk depth is rounded down to the z patch (4): 18 -> 16 gives the same result
    with torch.no_grad():
        again = encode_volumes(model, batch, depths, "sliding", chunk_depth=18, chunk_stride=8, pool="mean")
    torch.testing.assert_close(again, mean)
    with pytest.raises(ValueError, match="mode"):
        encode_volumes(model, batch, depths, "chunks")
    with pytest.raises(ValueError, match="pool"):
        encode_volumes(model, batch, depths, "sliding", pool="median")


# ---------------------------------------------------------------- evaluate-job pieces


def test_eval_config_keys_are_validated() -> None:
    from volvlp_ray.config import ConfigError, load_config

    cfg = load_config(None, ["eval.volume_mode=sliding", "eval.chunk_pool=max", "eval.every=50"])
    assert (cfg.eval.volume_mode, cfg.eval.chunk_pool, cfg.eval.every) == ("sliding", "max", 50)
    for bad, match in [("eval.volume_mode=chunks", "volume_mode"), ("eval.chunk_pool=median", "chunk_pool"),
                       ("eval.ks=[0,5]", "ks"), ("eval.prompts=['{label} yes']", "prompts"),
                       ("eval.prompts=['yes','no']", "prompts"), ("eval.chunk_stride=0", "chunk_stride"),
                       ("eval.every=-1", "every"), ("eval.n_bootstrap=-5", "n_bootstrap")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


def _fake_ray_run(root, run: str, stamps: list[str], export_last: bool = True, run_name_in_config=None):
    import json

    run_dir = root / "ray_results" / run
    ckpts = []
    for i, stamp in enumerate(stamps):
        c = run_dir / f"checkpoint_{stamp}"
        (c / "ckpt").mkdir(parents=True)
        (c / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"")
        if export_last and i == len(stamps) - 1:
            (c / "export").mkdir()
            (c / "export" / "vlp_config.json").write_text(json.dumps({"run_config": {"run_name": run_name_in_config}}))
        ckpts.append(c)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": c.name, "metrics": {"step": 10 * (i + 1)}}
                                       for i, c in enumerate(ckpts)]}
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return ckpts


def test_resolve_checkpoint_forms_and_errors(tmp_path) -> None:
    from volvlp_ray.eval.checkpoint import CheckpointError, resolve_checkpoint

    old = _fake_ray_run(tmp_path, "old", ["2026-01-01_10-00-00.000001", "2026-01-01_11-00-00.000001"])
    new = _fake_ray_run(tmp_path, "new", ["2026-01-02_09-00-00.000001", "2026-01-02_10-00-00.500000"])
    _fake_ray_run(tmp_path, "crashed", ["2026-01-03_09-00-00.000001"], export_last=False)  # newest, no export

    ref = resolve_checkpoint("latest", tmp_path)
    assert ref.checkpoint_dir == new[-1] and ref.export_dir == new[-1] / "export"
    assert (ref.run_name, ref.step, ref.kind) == ("new", 20, "latest")
    ref = resolve_checkpoint(str(old[-1]), tmp_path)  # a Ray Train checkpoint folder
    assert (ref.export_dir, ref.run_name, ref.step, ref.kind) == (old[-1] / "export", "old", 20, "ray_checkpoint")
    ref = resolve_checkpoint(str(old[-1] / "export"), tmp_path)  # an export folder
    assert (ref.export_dir, ref.run_name, ref.step, ref.kind) == (old[-1] / "export", "old", 20, "export")

    with pytest.raises(CheckpointError, match="DeepSpeed shards only") as err:
        resolve_checkpoint(str(old[0]), tmp_path)
    assert str(old[-1]) in str(err.value)  # names the run's checkpoint that has an export
    with pytest.raises(CheckpointError, match="Ray Train run folder"):
        resolve_checkpoint(str(tmp_path / "ray_results" / "old"), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(CheckpointError, match="neither a VLP export"):
        resolve_checkpoint(str(tmp_path), tmp_path)
    with pytest.raises(CheckpointError, match="no training runs"):
        resolve_checkpoint("latest", tmp_path / "empty")

    # an export elsewhere (e.g. an MLflow model artifact) takes its run name from its config
    moved = _fake_ray_run(tmp_path / "other", "x", ["2026-01-01_10-00-00.000001"], run_name_in_config="named")
    ref = resolve_checkpoint(str(moved[0] / "export"), tmp_path)
    assert ref.run_name == "named"


def test_eval_config_layers_and_data_resolution(tmp_path) -> None:
    from volvlp_ray.config import Config, ConfigError, config_to_dict
    from volvlp_ray.eval.job import build_eval_config, resolve_data

    run = config_to_dict(Config(workspace=str(tmp_path / "ws")))
    run["data"]["hu_window"] = [-500.0, 500.0]
    run["eval"]["ks"] = [1, 2]  # the run's training-end eval settings are not the evaluate job's
    run["train"]["no_longer_a_key"] = 1  # a key from another version is dropped, not fatal
    cfg, user = build_eval_config(run, None, ["eval.batch_size=3"])
    assert cfg.data.hu_window == [-500.0, 500.0] and cfg.workspace == str(tmp_path / "ws")
    assert cfg.eval.ks == [1, 5, 10, 50, 100] and cfg.eval.batch_size == 3
    assert user == {"eval": {"batch_size": 3}}
    with pytest.raises(ConfigError, match="unknown config key"):
        build_eval_config(run, None, ["eval.nope=1"])

    for split in ("train", "valid"):
        (tmp_path / "ws" / "shards" / split).mkdir(parents=True)
        (tmp_path / "ws" / "shards" / split / "manifest.json").write_text("{}")
    (tmp_path / "ext" / "test").mkdir(parents=True)
    (tmp_path / "ext" / "test" / "manifest.json").write_text("{}")
    c, split, name = resolve_data(cfg, None, "valid")
    assert (c.shards_path, split, name) == (str(tmp_path / "ws" / "shards"), "valid", "valid")
    c, split, name = resolve_data(cfg, str(tmp_path / "ext" / "test"), "valid")  # a split folder
    assert (c.shards_path, split, name) == (str(tmp_path / "ext"), "test", "ext_test")
    c, split, name = resolve_data(cfg, str(tmp_path / "ext"), "test")  # a shards root + --split
    assert (c.shards_path, split, name) == (str(tmp_path / "ext"), "test", "ext_test")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        resolve_data(cfg, str(tmp_path / "ext"), "valid")
    with pytest.raises(FileNotFoundError, match="no shards to evaluate"):
        resolve_data(cfg, None, "test")


def test_evaluate_embeddings_known_answers(tmp_path) -> None:
    from volvlp_ray.config import Config
    from volvlp_ray.eval.run import evaluate_embeddings

    rng = _rng(21)
    n, dim, names = 40, 16, _names(3)
    labels = (rng.random((n, 3)) < 0.4).astype(np.float32)
    labels[0], labels[1] = 1, 0  # every label has both classes
    axes = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    pos, neg = axes[:3], -axes[:3]
    # volumes lean toward the positive prompt of exactly the labels they have: a perfect zero-shot scorer
    vol = (2 * labels - 1) @ axes[:3] + rng.normal(size=(n, dim - 3)) @ axes[3:]
    emb = {"volume": vol, "text": vol.copy(), "labels": labels, "keys": np.arange(n).astype(str)}
    train = {"volume": vol, "labels": labels, "keys": emb["keys"]}
    res = evaluate_embeddings(emb, pos, neg, 10.0, names, Config(), n_bootstrap=30, train_emb=train,
                              plots_dir=str(tmp_path / "plots"), prefix="x/")
    m, rep = res["metrics"], res["report"]
    assert m["x/t2v/recall_at_1"] == 1.0 and m["x/v2t/mrr"] == 1.0  # identical embeddings retrieve perfectly
    assert m["x/t2v/recall_at_1_random"] == pytest.approx(1 / n)
    assert m["x/zeroshot/mean/auroc"] == 1.0 and m["x/probe/mean/auroc"] == 1.0
    assert rep["ks_capped"] == [50, 100] and rep["n"] == n and rep["n_bootstrap"] == 30
    assert "x/v2v/jaccard_at_1" in m and m["x/v2v/jaccard_at_1"] > m["x/v2v/jaccard_random"]
    assert "scores" not in rep["probe"] and rep["probe"]["n_train"] == n
    assert {p.rsplit("/", 1)[-1] for p in res["plots"]} >= {
        "recall_at_k.png", "auroc_zeroshot.png", "auroc_probe.png", "similarity_matrix.png",
        "projection_volume_n_abnormalities.png"}
    assert all(_is_png(p) for p in res["plots"])


def test_a_training_worker_does_not_import_the_evaluation_libraries():
    """What a Ray Train worker imports to train and validate (the loop, the model, validation, the metrics it
    reports) leaves scikit-learn and Matplotlib out: each worker process would pay ~2.8 CPU-seconds for them. The
    package's names still resolve, each from its module, on first use."""
    import subprocess
    import sys

    code = ("import sys, volvlp_ray.train.loop, volvlp_ray.models, volvlp_ray.eval.validation, "
            "volvlp_ray.eval.retrieval, volvlp_ray.eval.zeroshot\n"
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))\n"
            "import volvlp_ray.eval as ev\n"
            "from volvlp_ray.eval.probe import linear_probe\n"
            "from volvlp_ray.eval import save_all_plots, linear_probe as lp\n"
            "assert lp is linear_probe and ev.linear_probe is linear_probe and 'save_all_plots' in dir(ev)\n"
            "assert sorted(ev.__all__) == sorted(ev._WHERE)\n"
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "['matplotlib', 'sklearn']"], out.stdout
    with pytest.raises(AttributeError, match="no attribute 'not_a_metric'"):
        import volvlp_ray.eval as ev

        ev.not_a_metric  # noqa: B018
