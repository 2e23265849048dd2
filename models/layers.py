"""Small pieces shared by the networks: the positive output, token selection, and the fused
footprint mean of the output layer (training's hot spot)."""
import numpy as np
import torch
from torch import nn

from . import footprint_loops


class _PositiveOutput(torch.autograd.Function):
    """ELU(alpha=0.01) + 0.01 written as relu(x) + 0.01 exp(min(x, 0)): the same function, but
    torch's CPU ELU kernel is about 10x slower than exp and was 11% of a training step."""

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x.clamp(max=0)).mul_(0.01).add_(x.clamp(min=0))
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad * positive_slope(x, y.clamp(max=0.01))   # below 0, y = 0.01 exp(x) <= 0.01


def positive_slope(x, e, out=None):
    """The derivative of positive_output at x: 1 above 0, e = 0.01 exp(min(x, 0)) (<= 0.01) at or
    below. Written as
    max(e, step(x)) with step(x) = clamp(1e30 x, 0, 1) (exact but for 0 < x < 1e-30): torch's CPU
    kernels of bool masks (where, masked_fill, >) ran 4-30 x slower than this arithmetic and were
    a third of a training step."""
    return torch.maximum(e, x.mul(1e30).clamp_(0, 1), out=out)


def positive_output(x):
    """ELU(alpha=0.01) + 0.01 of x (any shape), as iStar/HISTEX: predictions stay above 0."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: in place, no saved tensors
        return torch.exp(x.clamp(max=0)).mul_(0.01).add_(x.clamp_(min=0))
    return _PositiveOutput.apply(x)


def output_options(config) -> dict:
    """The output keyword of a network: signed when it predicts a correction (--residual); only
    recorded when on, so states trained before the option existed keep their fingerprints."""
    return {"signed_output": True} if getattr(config, "residual", False) else {}


class FastDropout(nn.Module):
    """Inverted dropout (nn.Dropout's function) whose CPU masks come from numpy's PCG64, 16 bits a
    value (kept where the bits >= round(p 65536): p = 0.1 keeps 89.9994%): torch's CPU bernoulli_
    (mt19937, 5-7 ns a value) was 5% of a training step, PCG64's bits 0.7 ns. Each call seeds its
    bit generator with one draw from torch's generator, so torch.manual_seed fixes the masks as it
    does nn.Dropout's. On a GPU it is nn.functional.dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        bits = np.random.PCG64(int(torch.randint(0, 2 ** 62, ()).item()))
        raw = bits.random_raw(-(-x.numel() // 4)).view(np.uint16)[:x.numel()].reshape(x.shape)
        keep = np.greater_equal(raw, round(self.p * 65536)).astype(np.float32)
        return x * torch.from_numpy(keep).mul_(1.0 / (1.0 - self.p)).to(x.dtype)


def take_tokens(x, keep):
    """x (B, T, C) -> (B, M, C) at the token indices keep (B, M)."""
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _operands(h, weight):
    """(h, weight) of the output layer's product: float32, or both in the low precision of an
    enabled autocast."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        return h.to(low), weight.to(low)
    return h.float(), weight


def _use_loops(hm) -> bool:
    """Whether the element-wise part runs in models/footprint_loops.py's numba loops (the CPU, in
    bfloat16 or float32): at the large demo's 32 x 37 tokens x 300 genes one thread took 0.15 ms
    there against 0.64 ms in torch's passes forward, 0.04 against 0.12 ms backward. GPUs (and
    float16) keep the torch passes of _chunked_means."""
    return footprint_loops.supports(hm)


def _pre_activation(hm, wm, bias):
    """(B, M, G) hm wm^T + bias in the operands' dtype (autocast off), all genes in one product."""
    with torch.autocast(hm.device.type, enabled=False):
        x = hm.flatten(0, 1) @ wm.t() if bias is None else torch.addmm(bias.to(hm.dtype), hm.flatten(0, 1), wm.t())
    return x.view(hm.shape[0], hm.shape[1], -1)


def _chunked_means(hm, wm, bias, w, chunk, slope=None):
    """(B, G) float32 sum over tokens of w (B, M) x positive_output(hm wm^T + bias), genes in chunks,
    the products in the operands' dtype (_operands; autocast off); fills slope (B, M, G) with f'
    when given (training)."""
    out = hm.new_empty(hm.shape[0], wm.shape[0], dtype=torch.float32)
    with torch.autocast(hm.device.type, enabled=False):
        for g0 in range(0, wm.shape[0], chunk):
            g = slice(g0, g0 + chunk)
            x = _pre_activation(hm, wm[g], None if bias is None else bias[g]).float()
            # in place, and f' straight into slope: her2st C2's steps 1.05 x (608 -> 641 spot-epochs/s), the same bits
            e = x.clamp(max=0).exp_().mul_(0.01)
            if slope is not None:
                positive_slope(x, e, out=slope[..., g])
            out[:, g] = torch.bmm(w.unsqueeze(1), x.clamp_(min=0).add_(e)).squeeze(1)
    return out


def _footprint_means(hm, wm, bias, w, chunk, want_slope):
    """((B, G) float32 footprint means, f' (B, M, G) float32 or None): the numba loops where
    _use_loops, else _chunked_means's torch passes."""
    if _use_loops(hm):
        return footprint_loops.spot_means(_pre_activation(hm, wm, bias), w, want_slope)
    slope = hm.new_empty(hm.shape[:-1] + (wm.shape[0],), dtype=torch.float32) if want_slope else None
    return _chunked_means(hm, wm, bias, w, chunk, slope), slope


class _FootprintMean(torch.autograd.Function):
    """weights-averaged positive_output(h W^T + b) over tokens, without the (B, M, G) predictions
    ever being an autograd graph: on her2st C2 (1000 genes) training steps ran 1.1-1.4 x as fast
    (bench/profile_training.py --unfused); f' is stored in forward, not recomputed in backward. The
    element-wise part runs in numba loops on the CPU (models/footprint_loops.py: one pass each way,
    1.18-1.20 x the training steps of the torch passes on C2 and the large demo) and in gene chunks
    of torch passes, which keep it in cache, elsewhere. Under a bfloat16 autocast (--precision bf16)
    only the three matrix products are bfloat16; f, f' and the means stay float32."""

    @staticmethod
    def forward(ctx, h, weight, bias, w, chunk):
        hm, wm = _operands(h, weight)
        out, slope = _footprint_means(hm, wm, bias, w, chunk, True)
        ctx.save_for_backward(hm, wm, w, slope)
        ctx.has_bias, ctx.h_dtype, ctx.w_dtype = bias is not None, h.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        hm, wm, w, slope = ctx.saved_tensors
        with torch.autocast(hm.device.type, enabled=False):
            if _use_loops(hm):
                gx, grad_b = footprint_loops.slope_gradient(slope, w, grad, hm.dtype, ctx.has_bias)
            else:
                gx = slope.mul_(w.unsqueeze(-1)).mul_(grad.unsqueeze(1))       # (B, M, G), in place of f'
                grad_b = gx.flatten(0, 1).sum(0) if ctx.has_bias else None
                gx = gx.to(hm.dtype)
            grad_w = (gx.flatten(0, 1).t() @ hm.flatten(0, 1)).to(ctx.w_dtype)
            return (gx @ wm).to(ctx.h_dtype), grad_w, grad_b, None, None


CHUNK_VALUES = 655_360   # values in one (B, M, genes) slice of the fused output layer (2.6 MB in float32)


def gene_chunk(tokens: int) -> int:
    """Genes per slice of the fused output layer for B x M = tokens: the largest of 256, 128, 64 whose
    slice holds at most CHUNK_VALUES values (at least 64). A 5120-token batch (the large demo) ran
    1.4-1.6 x faster in chunks of 128 than of 256 (fresh multi-MB buffers and their page faults);
    smaller slices pay per-operation overhead. The values are the same bits for these three chunks
    (tested; a chunk of 100 genes is not: other kernels)."""
    chunk = 256
    while chunk > 64 and tokens * chunk > CHUNK_VALUES:
        chunk //= 2
    return chunk


def footprint_output(h, linear, weights, chunk=None):
    """sum over tokens of weights * positive_output(linear(h)): a spot's footprint mean.

    Parameters
    ----------
    h : (B, M, H) tensor, the last hidden layer at the M tokens of each window
    linear : nn.Linear(H, G), the output layer (with or without bias)
    weights : (B, M) tensor, each token's share of its spot's mean (1 / footprint size, 0 on padding)
    chunk : genes computed at once by the torch passes (GPUs; default gene_chunk(B * M)); the CPU loops
        take every gene in one product

    Returns
    -------
    (B, G) tensor, equal to (weights[..., None] * positive_output(linear(h))).sum(1)
    """
    chunk = chunk or gene_chunk(h.shape[0] * h.shape[1])
    if torch.is_grad_enabled() and (h.requires_grad or linear.weight.requires_grad):
        return _FootprintMean.apply(h.contiguous(), linear.weight, linear.bias, weights.contiguous(), chunk)
    # no gradient (validation, out-of-fold): no f'
    return _footprint_means(*_operands(h.contiguous(), linear.weight), linear.bias, weights.contiguous(), chunk,
                            False)[0]


def output_parts(head):
    """(the layers before the output layer, the output nn.Linear) of a head: a Sequential ending in
    a Linear, or a Linear alone (then the first part is the identity)."""
    if isinstance(head, torch.nn.Sequential):
        return head[:-1], head[-1]
    return (lambda x: x), head


class PositiveHead:
    """Mixin of the networks whose output is positive_output(output_layer(hidden(...))) (or, with
    signed_output, output_layer(hidden(...)) itself): forward() predicts every token,
    footprint_mean() a spot's footprint mean (training, out-of-fold). A network defines
    hidden(hist, genes, offs, gmask, keep) -> (B, T or M, H), output_layer and signed_output."""

    signed_output = False

    def forward(self, hist, genes=None, offs=None, gmask=None, keep=None):
        """(B, T, G) predictions, or (B, M, G) at the token indices keep (B, M)."""
        return self.activation(self.pre_activation(hist, genes, offs, gmask, keep))

    def pre_activation(self, hist, genes=None, offs=None, gmask=None, keep=None):
        """(B, T or M, G) output layer before activation(): forward() is activation(pre_activation())."""
        return self.output_layer(self.hidden(hist, genes, offs, gmask, keep))

    def activation(self, y):
        """positive_output(y), or y itself with signed_output; elementwise and non-decreasing."""
        return y if self.signed_output else positive_output(y)

    def footprint_mean(self, hist, genes=None, offs=None, gmask=None, keep=None, weights=None):
        """(B, G): sum over the tokens keep (B, M) of weights (B, M) x the prediction."""
        h = self.hidden(hist, genes, offs, gmask, keep)
        if self.signed_output:
            return (self.output_layer(h) * weights.unsqueeze(-1)).sum(1)
        return footprint_output(h, self.output_layer, weights)
