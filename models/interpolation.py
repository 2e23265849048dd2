"""The image-free baseline: spot counts spread to super-pixels with a Gaussian kernel (no network)."""
from .registry import register_model


@register_model("interp")
class KernelInterpolation:
    """Counts per super-pixel = kernel-weighted mean of the spot counts / mean footprint size.

    No network: HISTEX's stage fills the map by row chunks of the super-pixel x spot kernel
    (utils.superres.consistency.interpolation_chunks, shared with the fusion and --residual)."""

    trainable = False
    default_spot_consistency = "none"
    use_gene_tokens = False

    @staticmethod
    def options(config) -> dict:
        return {}

    @staticmethod
    def inference_stride(half: int, opts: dict) -> int:
        return 1
