"""iStar's per-super-pixel MLP on the same features (the image-only baseline)."""
import torch
from torch import nn

from .trihrge import positive_output, take_tokens


class SuperPixelMLP(nn.Module):
    def __init__(self, dims, n_genes, hidden=256, depth=4):
        super().__init__()
        self.names = list(dims)
        layers, c = [], sum(dims.values())
        for _ in range(depth - 1):
            layers += [nn.Linear(c, hidden), nn.LeakyReLU(0.1)]
            c = hidden
        layers.append(nn.Linear(c, n_genes))
        self.net = nn.Sequential(*layers)

    def forward(self, hist, genes=None, offs=None, gmask=None, keep=None):
        x = torch.cat([hist[k] for k in self.names], dim=-1)
        return positive_output(self.net(x if keep is None else take_tokens(x, keep)))
