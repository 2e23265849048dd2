"""TriHRGE networks and baselines, built by name from one registry (models/registry.py): the TriHRGE
model, iStar's per-super-pixel MLP and the image-free kernel interpolation."""
# each module registers its model; this order is the order of HISTEX.py --model
from . import (
    interpolation,  # noqa: F401
    mlp,  # noqa: F401
    trihrge,  # noqa: F401
)
from .registry import MODELS, build_model, model_class, register_model

__all__ = ["MODELS", "build_model", "model_class", "register_model", "compile_cpu_loops"]


def compile_cpu_loops():
    """Compile (or load from numba's cache) the networks' CPU loops now, the multi-scale gate's and
    the output layer's: `make venv` runs this once (about 8 s), so that the first HISTEX run does not
    compile them in each worker process."""
    from . import footprint_loops, scale_gate
    scale_gate.compile_loops()
    footprint_loops.compile_loops()
