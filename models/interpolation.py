"""The image-free baseline: spot counts spread to super-pixels with a Gaussian kernel (no network)."""
import numpy as np

from .registry import register_model


@register_model("interp")
class KernelInterpolation:
    """Counts per super-pixel = kernel-weighted mean of the spot counts / mean footprint size."""

    trainable = False
    default_spot_consistency = "none"
    use_gene_tokens = False

    @staticmethod
    def options(config) -> dict:
        return {}

    @staticmethod
    def inference_stride(half: int, opts: dict) -> int:
        return 1

    @staticmethod
    def predict(weights, counts, mean_footprint):
        """weights (n_superpixels, n_spots) row-normalised; counts (n_spots, G) -> (n_superpixels, G)."""
        return np.asarray(weights @ (counts / mean_footprint), dtype=np.float32)
