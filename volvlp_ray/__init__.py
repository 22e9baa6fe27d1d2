"""volvlp_ray: distributed vision-language pre-training on 3D CT with Ray, DeepSpeed and MLflow."""

__version__ = "0.1.0"
