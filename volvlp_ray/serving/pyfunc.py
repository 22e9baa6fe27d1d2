"""The consolidated export as the MLflow run's model.

``log_vlp_model(run_id, export_dir)`` logs an MLflow pyfunc model (models-from-code: nothing is pickled) whose
artifact is the export folder. Loaded back, it embeds reports and NIfTI volumes::

    m = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")      # or models:/<model_id>
    m.predict(pd.DataFrame({"text": ["No pleural effusion."]}))  # -> column "text_embedding"
    m.predict(pd.DataFrame({"nifti": ["/data/ct.nii.gz"], "slope": [1.0], "intercept": [-1024.0]}))

Without MLflow, the same folder loads with ``volvlp_ray.VLP.from_pretrained`` (see ``VLP.embed_report`` and
``VLP.embed_nifti``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

__all__ = ["VLPPyfunc", "log_vlp_model"]

_ENTRY = Path(__file__).with_name("_pyfunc_entry.py")


# MLflow warns, when a PythonModel subclass is defined, that predict has no type hints (to validate inputs by
# them), under a filter of its own that an "ignore" filter does not override: recorded and dropped here, so that
# importing this module prints nothing (the inputs are checked by predict itself)
with warnings.catch_warnings(record=True):

    class VLPPyfunc(mlflow.pyfunc.PythonModel):
        """predict(DataFrame) -> DataFrame with ``text_embedding`` for a ``text`` column and ``volume_embedding``
        for a ``nifti`` column (paths; optional ``slope``/``intercept`` columns, default 1 and 0)."""

        def load_context(self, context) -> None:
            from volvlp_ray.models import VLP

            self.model = VLP.from_pretrained(context.artifacts["export"])

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            import pandas as pd

            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            if "text" not in df and "nifti" not in df:
                raise ValueError(f"expected a 'text' and/or a 'nifti' column, got {list(df.columns)}")
            out = pd.DataFrame(index=df.index)
            if "text" in df:
                emb = self.model.embed_reports([str(t) for t in df["text"]])
                out["text_embedding"] = [row.tolist() for row in emb.float().cpu().numpy()]
            if "nifti" in df:
                slope = df["slope"] if "slope" in df else [1.0] * len(df)
                intercept = df["intercept"] if "intercept" in df else [0.0] * len(df)
                out["volume_embedding"] = [
                    self.model.embed_nifti(str(p), slope=float(s), intercept=float(i)).float().cpu().numpy().tolist()
                    for p, s, i in zip(df["nifti"], slope, intercept)
                ]
            return out


def log_vlp_model(run_id: str, export_dir: str, tracking_uri: str, name: str = "model") -> str:
    """Log ``export_dir`` as the pyfunc model of run ``run_id``; returns the model URI (``models:/<id>``)."""
    import mlflow
    import torch

    from volvlp_ray.tracking import scoped_tracking_uri

    reqs = [f"torch>={torch.__version__.split('+')[0]}", "transformers", "safetensors", "nibabel", "monai",
            "numpy", "pandas"]
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active in this process")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per copied file otherwise
    with scoped_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id, nested=False) as run, \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # colour codes first
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(_ENTRY), artifacts={"export": str(export_dir)},
            pip_requirements=reqs,  # given, not inferred: inference would import and run the model
            code_paths=[str(Path(__file__).parents[1])],  # the volvlp_ray package travels with the model
        )
        # keep the run RUNNING: the job sets the final status itself
        mlflow.tracking.MlflowClient(tracking_uri).set_tag(run.info.run_id, "volvlp.model_uri", info.model_uri)
    mlflow.tracking.MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")
    return info.model_uri
