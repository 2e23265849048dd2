"""The TriHRGE network: multi-scale histology tokens (the super-pixel, its 112 um tile, its 448 um
context) fused per token by a learned softmax gate, then a head of bias-free linear layers on the
fused tokens concatenated with the histology features, and a positive output per gene
(ELU(alpha=0.01) + 0.01, as iStar/HISTEX). The measured expression enters after the network (spot
consistency and the fusion of utils/superres/fusion.py). Opt-in, measured not to pay on her2st by
default (docs/BENCHMARKS.md): use_gene_tokens, HR pseudo-spot gene tokens fused by three
cross-attentions (HISTEX's design); use_window_attention, self-attention among a window's tokens.

Inputs of forward():
  hist   dict scale -> (B, T, C_scale) features of the T = w*w super-pixels of a window
  genes  (B, K, G) expression of the K nearest HR pseudo-spots, scaled like the target
  offs   (B, K, 2) their offsets from the window centre, in lattice spacings
  gmask  (B, K) bool, True where a gene token is hidden (padding or masked in training)
  keep   optional (B, M) token indices: only those tokens are predicted (training needs just the
         spot footprint; the tokens outside it still inform the gene tokens)
Output: (B, T, G) predictions in the scaled target units, or (B, M, G) with keep; with
signed_output (--residual) a signed correction to the interpolated expression instead of a positive
prediction."""
import torch
from torch import nn
from torch.nn import functional as F

from .layers import FastDropout, PositiveHead, output_options, output_parts, take_tokens
from .registry import register_model
from .scale_gate import gated_scales


class MultiScaleFusion(nn.Module):
    """Projects each scale to d and mixes them with a learned per-token softmax weighting."""

    def __init__(self, dims, d):
        super().__init__()
        self.names = list(dims)
        self.proj = nn.ModuleDict({k: nn.Sequential(nn.Linear(c, d), nn.LayerNorm(d)) for k, c in dims.items()})
        self.gate = nn.Linear(d * len(dims), len(dims)) if len(dims) > 1 else None

    def forward(self, hist):
        if self.gate is not None and self.gate.weight.device.type == "cpu":
            return self._fused(hist)
        return self.unfused(hist)

    def unfused(self, hist):
        """forward() in torch operations (GPUs; the reference the CPU path is tested against)."""
        z = torch.stack([self.proj[k](hist[k]) for k in self.names], dim=-2)  # B, T, S, d
        if self.gate is None:
            return z[..., 0, :]
        w = torch.softmax(self.gate(z.flatten(-2)), dim=-1)  # B, T, S
        return (w.unsqueeze(-1) * z).sum(-2)

    def _fused(self, hist):
        """forward() on the CPU, the same function in fewer passes: the S projections as one batched
        product, feature-major (S, d, C) x (S, C, tokens) over the scales' features zero-padded to the
        widest C, then the layer norms, gate and mixture in one numba loop (models/scale_gate.py)."""
        lead = hist[self.names[0]].shape[:-1]
        width = max(hist[k].shape[-1] for k in self.names)
        linear = [self.proj[k][0] for k in self.names]
        x = torch.stack([F.pad(hist[k].reshape(-1, hist[k].shape[-1]).float().T, (0, 0, 0, width - hist[k].shape[-1]))
                         for k in self.names])
        weight = torch.stack([F.pad(m.weight, (0, width - m.weight.shape[1])) for m in linear])
        y = torch.baddbmm(torch.stack([m.bias for m in linear]).unsqueeze(-1), weight, x)
        norms = [self.proj[k][1] for k in self.names]
        out = gated_scales(y, torch.stack([m.weight for m in norms]), torch.stack([m.bias for m in norms]),
                           self.gate.weight, self.gate.bias)
        return out.reshape(*lead, out.shape[-1])


class TriCrossBlock(nn.Module):
    """Histology attends to genes; genes attend to histology; the first result attends to the second.
    nn.MultiheadAttention scales by sqrt(head width), unlike HISTEX's division by the head count."""

    def __init__(self, d, heads, dropout=0.0):
        super().__init__()
        self.h2g = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.g2h = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.hh = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.n1, self.n2, self.n3, self.n4 = (nn.LayerNorm(d) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h, g, gmask, keep=None):
        g1 = self.n2(g + self.g2h(g, h, h, need_weights=False)[0])  # genes read every window token
        if keep is not None:
            h = take_tokens(h, keep)  # histology tokens are independent of each other from here on
        h1 = self.n1(h + self.h2g(h, g, g, key_padding_mask=gmask, need_weights=False)[0])
        h2 = self.n3(h1 + self.hh(h1, g1, g1, key_padding_mask=gmask, need_weights=False)[0])
        return self.n4(h2 + self.ff(h2)), g1


@register_model("trihrge")
class TriHRGE(PositiveHead, nn.Module):
    trainable = True
    default_spot_consistency = "local"

    @staticmethod
    def options(config) -> dict:
        return {"d": config.d_model, "heads": config.heads, "depth": config.depth, "dropout": config.dropout,
                "head_hidden": config.head_hidden, "use_gene_tokens": config.gene_tokens,
                "use_linear_head": not config.no_linear_head,
                # only when it changes the network, so states trained before the option existed still match
                **({} if config.gene_tokens or config.window_attention else {"use_window_attention": False}),
                **output_options(config)}

    @staticmethod
    def inference_stride(half: int, opts: dict) -> int:
        """Overlapping windows (tent-blended) hide window borders and the switch of gene tokens; a
        network whose tokens do not see each other needs no overlap (same values, fewer windows)."""
        if not opts.get("use_gene_tokens", True) and not opts.get("use_window_attention", True):
            return 2 * half + 1
        return max(3, half)

    def __init__(self, dims, n_genes, window, d=64, heads=4, depth=2, head_hidden=128,
                 use_gene_tokens=True, use_linear_head=True, dropout=0.1, use_window_attention=True,
                 signed_output=False):
        super().__init__()
        self.signed_output = signed_output
        self.use_gene_tokens = use_gene_tokens
        self.use_linear_head = use_linear_head
        self.fusion = MultiScaleFusion(dims, d)
        # without any attention a token's position in its window must not matter: no position code
        self.pos = None
        if use_gene_tokens or use_window_attention:
            self.pos = nn.Parameter(torch.zeros(1, window * window, d))
            nn.init.normal_(self.pos, std=0.02)
        self.drop = FastDropout(dropout)
        if use_gene_tokens:
            self.gene_in = nn.Sequential(nn.Linear(n_genes, d), nn.LayerNorm(d))
            self.gene_pos = nn.Sequential(nn.Linear(2, d), nn.GELU(), nn.Linear(d, d))
            self.blocks = nn.ModuleList(TriCrossBlock(d, heads, dropout) for _ in range(depth))
        elif not use_window_attention:
            self.blocks = None
        else:
            # without gene tokens the histology tokens still exchange context within the window
            layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout, batch_first=True, norm_first=False)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        raw_dim = sum(dims.values())
        if use_linear_head:
            # "linear feature extraction": bias-free linear layers on fused tokens + raw histology
            self.head = nn.Sequential(nn.Linear(d + raw_dim, head_hidden, bias=False), nn.LeakyReLU(0.1),
                                      nn.Linear(head_hidden, head_hidden, bias=False), nn.LeakyReLU(0.1),
                                      nn.Linear(head_hidden, n_genes, bias=False))
        else:
            self.head = nn.Linear(d, n_genes)

    @property
    def output_layer(self):
        return output_parts(self.head)[1]

    @property
    def independent_tokens(self) -> bool:
        """No attention: a token's prediction depends on its own features only."""
        return self.blocks is None

    def hidden(self, hist, genes=None, offs=None, gmask=None, keep=None):
        """(B, T, H) input of the output layer, or (B, M, H) at the token indices keep (B, M)."""
        if keep is not None and self.blocks is None:
            # tokens see no other token: fuse and drop out only the kept ones (M of T)
            hist = {k: take_tokens(v, keep) for k, v in hist.items()}
            h, keep = self.drop(self.fusion(hist)), None
        else:
            h = self._mixed(hist, genes, offs, gmask, keep)
        if self.use_linear_head:
            raw = torch.cat([hist[k] for k in self.fusion.names], dim=-1)
            h = torch.cat([h, raw if keep is None else take_tokens(raw, keep)], dim=-1)
        return output_parts(self.head)[0](h)

    def _mixed(self, hist, genes, offs, gmask, keep):
        """(B, T or M, d) fused tokens after the attention blocks (gene tokens or window attention)."""
        h = self.fusion(hist)
        h = self.drop(h if self.pos is None else h + self.pos)
        if self.use_gene_tokens:
            g = self.gene_in(genes) + self.gene_pos(offs)
            # a window whose gene tokens are all hidden would make attention undefined: keep one
            if gmask is not None:
                gmask = gmask.clone()
                gmask[gmask.all(dim=1), 0] = False
            for i, blk in enumerate(self.blocks):
                h, g = blk(h, g, gmask, keep if i == len(self.blocks) - 1 else None)
        else:
            if self.blocks is not None:
                h = self.blocks(h)
            if keep is not None:
                h = take_tokens(h, keep)
        return h
