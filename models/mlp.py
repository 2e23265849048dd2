"""iStar's per-super-pixel MLP on the same features (the image-only baseline)."""
import torch
from torch import nn

from .layers import PositiveHead, output_options, output_parts, take_tokens
from .registry import register_model


@register_model("mlp")
class SuperPixelMLP(PositiveHead, nn.Module):
    """Input: hist dict scale -> (B, T, C_scale) (gene tokens ignored); output (B, T, G), or (B, M, G)
    at the token indices keep (B, M): positive, or signed with signed_output (--residual)."""

    trainable = True
    default_spot_consistency = "global"
    use_gene_tokens = False
    independent_tokens = True

    @staticmethod
    def options(config) -> dict:
        return output_options(config)

    @staticmethod
    def inference_stride(half: int, opts: dict) -> int:
        """One super-pixel at a time: windows need not overlap (same values, ~5x less work)."""
        return 2 * half + 1

    def __init__(self, dims, n_genes, window=None, hidden=256, depth=4, signed_output=False):
        super().__init__()
        self.signed_output = signed_output
        self.names = list(dims)
        layers, c = [], sum(dims.values())
        for _ in range(depth - 1):
            layers += [nn.Linear(c, hidden), nn.LeakyReLU(0.1)]
            c = hidden
        layers.append(nn.Linear(c, n_genes))
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self):
        return self.net[-1]

    def hidden(self, hist, genes=None, offs=None, gmask=None, keep=None):
        """(B, T, hidden) input of the output layer, or (B, M, hidden) at the token indices keep (B, M)."""
        x = torch.cat([hist[k] for k in self.names], dim=-1)
        return output_parts(self.net)[0](x if keep is None else take_tokens(x, keep))
