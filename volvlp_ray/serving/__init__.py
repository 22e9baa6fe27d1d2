"""The exported model as an MLflow model (pyfunc): ``log_vlp_model`` logs it to a run."""

from volvlp_ray.serving.pyfunc import VLPPyfunc, log_vlp_model

__all__ = ["VLPPyfunc", "log_vlp_model"]
