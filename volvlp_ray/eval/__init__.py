"""Evaluation metrics: retrieval, zero-shot classification, linear probe, and their figures.

Pure functions over numpy arrays / torch tensors (no Ray, no model code, no MLflow). Metric dicts
use MLflow-valid keys; :func:`flatten_metrics` turns the nested classification results into
``{"prefix/label/metric": float}`` for ``mlflow.log_metrics``.

The model-facing modules are imported from where they live: ``embed`` (whole-volume embeddings, sliding
chunks), ``run`` (evaluate a model on a shard split), ``checkpoint`` and ``job`` (``jobs/evaluate.py``),
``validation`` (``Validator``, validation during pre-training).
"""

from volvlp_ray.eval.plots import (
    plot_auroc_bars,
    plot_embedding_projection,
    plot_recall_curves,
    plot_similarity_matrix,
    project_2d,
    save_all_plots,
    save_figure,
)
from volvlp_ray.eval.probe import linear_probe
from volvlp_ray.eval.retrieval import (
    DEFAULT_KS,
    bidirectional_retrieval,
    correct_ranks,
    label_jaccard_at_k,
    pairwise_jaccard,
    retrieval_metrics,
    text_to_volume,
    to_numpy,
    volume_to_text,
)
from volvlp_ray.eval.zeroshot import (
    DEFAULT_PROMPTS,
    THRESHOLD_METRICS,
    auroc,
    build_prompts,
    classification_metrics,
    flatten_metrics,
    select_thresholds,
    zero_shot_scores,
)

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_PROMPTS",
    "THRESHOLD_METRICS",
    "auroc",
    "bidirectional_retrieval",
    "build_prompts",
    "classification_metrics",
    "correct_ranks",
    "flatten_metrics",
    "label_jaccard_at_k",
    "linear_probe",
    "pairwise_jaccard",
    "plot_auroc_bars",
    "plot_embedding_projection",
    "plot_recall_curves",
    "plot_similarity_matrix",
    "project_2d",
    "retrieval_metrics",
    "save_all_plots",
    "save_figure",
    "select_thresholds",
    "text_to_volume",
    "to_numpy",
    "volume_to_text",
    "zero_shot_scores",
]
