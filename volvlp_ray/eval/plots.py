"""Evaluation figures: per-label AUROC bars, Recall@K curves, similarity heatmaps, 2-D projections.

Figures are built with ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state,
safe in Ray workers and threads).  Each ``plot_*`` returns a Figure; :func:`save_all_plots`
writes PNGs and returns their paths for ``mlflow.log_artifact``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from volvlp_ray.eval.retrieval import l2_normalize, to_numpy

__all__ = [
    "plot_auroc_bars",
    "plot_recall_curves",
    "plot_similarity_matrix",
    "project_2d",
    "plot_embedding_projection",
    "save_figure",
    "save_all_plots",
]

_RECALL_KEY = re.compile(r"^(?:(?P<dir>[^/]+)/)?recall_at_(?P<k>\d+)$")
_DIRECTION_NAMES = {"t2v": "report → volume", "v2t": "volume → report"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_auroc_bars(result: Mapping[str, Any], title: str = "Zero-shot AUROC per label") -> Figure:
    """Horizontal AUROC bar per label with bootstrap CI error bars where available.

    Args:
        result: the dict of :func:`~volvlp_ray.eval.zeroshot.classification_metrics` (or of
            :func:`~volvlp_ray.eval.probe.linear_probe`).  Skipped labels (NaN) are drawn empty.
    """
    per_label = result["per_label"]
    names = list(per_label)
    values = np.array([per_label[n]["auroc"] for n in names], dtype=float)
    low = np.array([per_label[n].get("auroc_ci_low", math.nan) for n in names], dtype=float)
    high = np.array([per_label[n].get("auroc_ci_high", math.nan) for n in names], dtype=float)
    fig = _figure(8, 0.35 * len(names) + 1.5)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(values), color="#4c72b0")
    has_ci = np.isfinite(low) & np.isfinite(high) & np.isfinite(values)
    if has_ci.any():
        err = np.stack([values - low, high - values])[:, has_ci]
        ax.errorbar(values[has_ci], y[has_ci], xerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=3)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (0.5)")
    mean = result.get("mean", {}).get("auroc", math.nan)
    if np.isfinite(mean):
        ax.axvline(mean, color="#c44e52", linewidth=1, label=f"mean {mean:.3f}")
    ax.set_yticks(y, [f"{n} (skipped)" if not np.isfinite(v) else n for n, v in zip(names, values)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUROC")
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


def plot_recall_curves(retrieval: Mapping[str, float], title: str = "Retrieval Recall@K") -> Figure:
    """Recall@K against K for every direction in ``retrieval`` plus its random baseline (dashed).

    Args:
        retrieval: the dict of :func:`~volvlp_ray.eval.retrieval.bidirectional_retrieval`
            (``t2v/recall_at_K`` …) or of :func:`~volvlp_ray.eval.retrieval.retrieval_metrics`.
    """
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for key, value in retrieval.items():
        match = _RECALL_KEY.match(key)
        if match:
            direction = match["dir"] or ""
            random = retrieval.get(f"{key}_random", math.nan)
            curves.setdefault(direction, []).append((int(match["k"]), float(value), float(random)))
    if not curves:
        raise ValueError("no recall_at_K keys in the retrieval metrics")
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    drawn_random: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (direction, points) in enumerate(sorted(curves.items())):
        points.sort()
        ks, recall, random = (np.array(v) for v in zip(*points))
        name = _DIRECTION_NAMES.get(direction, direction or "recall")
        ax.plot(ks, recall, marker="o", color=f"C{i}", label=name)
        if not any(np.array_equal(ks, k) and np.allclose(random, r) for k, r in drawn_random):
            label = "random" if not drawn_random else f"random ({name})"
            ax.plot(ks, random, linestyle="--", color="grey", label=label)
            drawn_random.append((ks, random))
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_similarity_matrix(
    query_emb: Any,
    target_emb: Any,
    max_items: int = 64,
    normalize: bool = True,
    title: str = "Report–volume cosine similarity",
    query_label: str = "report",
    target_label: str = "volume",
) -> Figure:
    """Heatmap of query × target similarity for the first ``min(N, max_items)`` pairs.

    Args:
        query_emb, target_emb: ``(N, E)`` paired embeddings; a good model shows a bright diagonal.
    """
    q, t = to_numpy(query_emb)[:max_items], to_numpy(target_emb)[:max_items]
    if normalize:
        q, t = l2_normalize(q), l2_normalize(t)
    sim = q @ t.T
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    im = ax.imshow(sim, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xlabel(f"{target_label} index")
    ax.set_ylabel(f"{query_label} index")
    ax.set_title(f"{title} (first {sim.shape[0]})")
    return fig


def project_2d(emb: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project ``(N, E)`` embeddings to ``(N, 2)``: PCA (numpy SVD) or t-SNE (scikit-learn)."""
    x = to_numpy(emb)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings of shape (N, E), got {x.shape}")
    x = x - x.mean(0, keepdims=True)
    if method == "pca":
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        out = u[:, :2] * s[:2]
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # E == 1
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def plot_embedding_projection(
    emb: Any,
    color: Any = None,
    color_name: str = "",
    method: str = "pca",
    title: str = "Embeddings",
    categories: Sequence[str] | None = None,
) -> Figure:
    """2-D scatter of ``(N, E)`` embeddings coloured by ``color`` ``(N,)``.

    Integer colours with few values (a binary label, a modality index) get a legend – named by
    ``categories`` when given; other values get a colour bar (e.g. number of abnormalities).
    """
    xy = project_2d(emb, method=method)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.7)
    else:
        c = to_numpy(color).ravel()
        values = np.unique(c)
        if len(values) <= 10 and np.all(values == np.round(values)):
            for v in values:
                name = categories[int(v)] if categories is not None else f"{color_name} = {int(v)}"
                sel = c == v
                ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.7, label=f"{name} (n={int(sel.sum())})")
            ax.legend(fontsize=8)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=c, s=8, alpha=0.7, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=color_name)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG to ``path`` (parents created) and return the path as a string."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "label"


def save_all_plots(
    out_dir: str | os.PathLike,
    retrieval: Mapping[str, float] | None = None,
    classification: Mapping[str, Mapping[str, Any]] | None = None,
    text_emb: Any = None,
    volume_emb: Any = None,
    labels: Any = None,
    label_names: Sequence[str] | None = None,
    color_by: Sequence[str] = (),
    method: str = "pca",
) -> list[str]:
    """Write every figure the given inputs allow to ``out_dir`` and return the PNG paths.

    Args:
        retrieval: :func:`bidirectional_retrieval` metrics → ``recall_at_k.png``.
        classification: named results, e.g. ``{"zeroshot": …, "probe": …}`` → ``auroc_<name>.png``.
        text_emb, volume_emb: ``(N, E)`` paired embeddings → ``similarity_matrix.png`` (both given),
            ``projection_modality.png`` (both given), ``projection_volume_*.png`` (volume given).
        labels: ``(N, L)`` binary, with ``label_names`` → projection coloured by the number of
            abnormalities, plus one per label named in ``color_by``.
        method: ``"pca"`` or ``"tsne"`` for the projections.
    """
    out_dir = os.fspath(out_dir)
    paths: list[str] = []
    if retrieval:
        paths.append(save_figure(plot_recall_curves(retrieval), os.path.join(out_dir, "recall_at_k.png")))
    for name, result in (classification or {}).items():
        fig = plot_auroc_bars(result, title=f"{name}: AUROC per label")
        paths.append(save_figure(fig, os.path.join(out_dir, f"auroc_{_slug(name)}.png")))
    if text_emb is not None and volume_emb is not None:
        fig = plot_similarity_matrix(text_emb, volume_emb)
        paths.append(save_figure(fig, os.path.join(out_dir, "similarity_matrix.png")))
        t, v = l2_normalize(to_numpy(text_emb)), l2_normalize(to_numpy(volume_emb))
        modality = np.r_[np.zeros(len(t)), np.ones(len(v))]
        fig = plot_embedding_projection(
            np.concatenate([t, v]), modality, method=method, title="Reports and volumes",
            categories=("report", "volume"),
        )
        paths.append(save_figure(fig, os.path.join(out_dir, "projection_modality.png")))
    if volume_emb is not None:
        v = l2_normalize(to_numpy(volume_emb))
        if labels is None:
            fig = plot_embedding_projection(v, method=method, title="Volume embeddings")
            paths.append(save_figure(fig, os.path.join(out_dir, "projection_volume.png")))
        else:
            lab = to_numpy(labels)
            names = list(label_names) if label_names is not None else [str(i) for i in range(lab.shape[1])]
            fig = plot_embedding_projection(
                v, lab.sum(1), "number of abnormalities", method=method, title="Volume embeddings"
            )
            fig_path = os.path.join(out_dir, "projection_volume_n_abnormalities.png")
            paths.append(save_figure(fig, fig_path))
            for name in color_by:
                if name not in names:
                    raise ValueError(f"color_by label {name!r} is not in label_names")
                col = lab[:, names.index(name)]
                fig = plot_embedding_projection(
                    v, col, name, method=method, title=f"Volume embeddings: {name}", categories=("absent", "present")
                )
                paths.append(save_figure(fig, os.path.join(out_dir, f"projection_volume_{_slug(name)}.png")))
    return paths
