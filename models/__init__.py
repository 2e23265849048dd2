"""TriHRGE networks and baselines, built by name from one registry (models/registry.py): the TriHRGE
model, iStar's per-super-pixel MLP and the image-free kernel interpolation."""
# each module registers its model; this order is the order of HISTEX.py --model
from . import (
    interpolation,  # noqa: F401
    mlp,  # noqa: F401
    trihrge,  # noqa: F401
)
from .registry import MODELS, build_model, model_class, register_model

__all__ = ["MODELS", "build_model", "model_class", "register_model"]
