"""volvlp_ray: distributed vision-language pre-training on 3D CT with Ray, DeepSpeed and MLflow.

``volvlp_ray.VLP`` is the model class (``VLP.from_pretrained(export_dir)`` loads an export without Ray or
DeepSpeed); it is imported on first use so that ``import volvlp_ray`` stays light.
"""

from typing import Any

# stdlib only: puts the handler on the "volvlp_ray" logger that brings the project's warnings from any Ray worker
# (a Ray Data task included) to the driver's console
from volvlp_ray import console as _console  # noqa: F401,E402

__version__ = "0.1.0"
__all__ = ["VLP", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "VLP":
        from volvlp_ray.models import VLP

        return VLP
    raise AttributeError(f"module 'volvlp_ray' has no attribute {name!r}")
