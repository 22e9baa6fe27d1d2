"""MLflow models-from-code entry: the file MLflow runs to get the model object (no pickling)."""

import mlflow.models

from volvlp_ray.serving.pyfunc import VLPPyfunc

mlflow.models.set_model(VLPPyfunc())
