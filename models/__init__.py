"""TriHRGE networks: the TriHRGE model and the iStar-style MLP baseline (the image-free
interpolation baseline needs no network: utils/interpolation.py)."""
from .mlp import SuperPixelMLP
from .trihrge import TriHRGE

TRAINED_MODELS = ("trihrge", "mlp")


def build_model(name, dims, n_genes, window, **opts):
    if name == "trihrge":
        return TriHRGE(dims, n_genes, window, **opts)
    if name == "mlp":
        return SuperPixelMLP(dims, n_genes)
    raise ValueError(f"unknown model {name!r}")
