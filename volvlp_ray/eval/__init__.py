"""Evaluation metrics: retrieval, zero-shot classification, linear probe, and their figures.

Pure functions over numpy arrays / torch tensors (no Ray, no model code, no MLflow). Metric dicts
use MLflow-valid keys; :func:`flatten_metrics` turns the nested classification results into
``{"prefix/label/metric": float}`` for ``mlflow.log_metrics``.

The model-facing modules are imported from where they live: ``embed`` (whole-volume embeddings, sliding
chunks), ``run`` (evaluate a model on a shard split), ``checkpoint`` and ``job`` (``jobs/evaluate.py``),
``validation`` (``Validator``, validation during pre-training).
"""

# Imported on first use (PEP 562): a Ray Train worker that needs only ``volvlp_ray.eval.validation`` does not pay
# for scikit-learn and SciPy (``probe``) or Matplotlib (``plots``): its imports measured 11.6 -> 8.8 CPU-seconds.
_WHERE = {
    "DEFAULT_KS": "retrieval",
    "DEFAULT_PROMPTS": "zeroshot",
    "THRESHOLD_METRICS": "zeroshot",
    "auroc": "zeroshot",
    "bidirectional_retrieval": "retrieval",
    "build_prompts": "zeroshot",
    "classification_metrics": "zeroshot",
    "correct_ranks": "retrieval",
    "flatten_metrics": "zeroshot",
    "label_jaccard_at_k": "retrieval",
    "linear_probe": "probe",
    "pairwise_jaccard": "retrieval",
    "plot_auroc_bars": "plots",
    "plot_embedding_projection": "plots",
    "plot_recall_curves": "plots",
    "plot_similarity_matrix": "plots",
    "project_2d": "plots",
    "retrieval_metrics": "retrieval",
    "save_all_plots": "plots",
    "save_figure": "plots",
    "select_thresholds": "zeroshot",
    "text_to_volume": "retrieval",
    "to_numpy": "retrieval",
    "volume_to_text": "retrieval",
    "zero_shot_scores": "zeroshot",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"volvlp_ray.eval.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'volvlp_ray.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
