"""The element-wise part of training's fused output layer (models/layers.footprint_output) as numba
loops on the CPU.

With x (B, M, G) the output layer's pre-activations at the M footprint tokens of B spots, and w
(B, M) each token's share of its spot's mean:
    out[b, g]   = sum_m w[b, m] * f(x[b, m, g]),   f(x) = max(x, 0) + 0.01 exp(min(x, 0))
    slope       = f'(x) = 1 above 0, 0.01 exp(x) at or below                  (kept for backward)
    gx[b, m, g] = slope[b, m, g] * w[b, m] * grad[b, g]                       (backward, then 2 products)
torch ran this as about ten passes over (B, M, G), with a cast of bfloat16 x to float32 before and
of gx back after. Here one loop reads x in its own dtype (bfloat16 bits, or float32) and one writes
gx in it (round to nearest even, as torch's cast). exp is computed here (Cephes' polynomial, within
about 1 float32 ulp of torch's): numba has no vectorised exp without Intel's SVML, and a scalar libm
call per value was slower than torch. Every value's arithmetic is the same wherever it falls in a
vector loop, so a token's output does not depend on its batch.

    spot_means(x (B, M, G) bf16 | fp32, w (B, M), want_slope) -> (B, G) float32, slope (B, M, G) or None
    slope_gradient(slope, w, grad (B, G), dtype, want_bias) -> gx (B, M, G) in dtype, (G,) float32 or None
"""
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# fastmath without reassociation: it let the vector and the scalar remainder loops order exp's steps
# differently, so a value depended on its alignment
_JIT = {"cache": True, "fastmath": {"contract", "nsz"}, "nogil": True, "error_model": "numpy"}
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)   # ln 2 split so n ln2_hi is exact
# Cephes expf: exp(r) = 1 + r + r^2 P(r) on |r| <= ln2 / 2
P0, P1, P2, P3, P4, P5 = (np.float32(v) for v in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                   4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
LOWEST = np.float32(-80.0)   # 0.01 exp(-80) is still a normal float32 (no denormal slow path); f is 1e-37 off its limit


@intrinsic
def _bits_to_float(typingctx, u):
    """float32 with the bits of a uint32 (a reinterpretation, no conversion)."""
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def _float_to_bits(typingctx, v):
    """uint32 with the bits of a float32."""
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


def _load(value):
    """One input value as float32: bfloat16 bits (uint16) or float32."""


def _store(value, like):
    """A float32 value in the dtype of the array like: bfloat16 bits (round to nearest even) or float32."""


@overload(_load, inline="always")
def _load_impl(value):
    if value == types.uint16:
        return lambda value: _bits_to_float(np.uint32(value) << 16)
    return lambda value: value


@overload(_store, inline="always")
def _store_impl(value, like):
    if like.dtype == types.uint16:
        def rounded(value, like):
            u = _float_to_bits(value)
            return np.uint16((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16)
        return rounded
    return lambda value, like: value


@numba.njit(inline="always", **_JIT)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 (x below -80 counts as -80)."""
    x = max(x, LOWEST)
    n = np.floor(x * LOG2E + np.float32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
    return (p * r * r + r + np.float32(1.0)) * _bits_to_float(np.uint32(np.int32(n) + 127) << 23)


@numba.njit(**_JIT)
def _means(x, w, out, slope, want_slope):
    """out (B, G) = the w-weighted sum over tokens of f(x); slope (B, M, G) = f'(x) when want_slope."""
    B, M, G = x.shape
    for b in range(B):
        o = out[b]
        o[:] = 0.0
        for m in range(M):
            wm, xr = w[b, m], x[b, m]
            sr = slope[b, m] if want_slope else slope[0, 0]
            for g in range(G):
                v = _load(xr[g])
                e = np.float32(0.01) * _exp_nonpositive(min(v, np.float32(0.0)))
                if want_slope:
                    sr[g] = np.float32(1.0) if v > np.float32(0.0) else e
                o[g] += wm * (max(v, np.float32(0.0)) + e)


@numba.njit(**_JIT)
def _gradient(slope, w, grad, gx, gb, want_bias):
    """gx (B, M, G) = slope * w * grad in gx's dtype; gb (G,) += its float32 sum over tokens when want_bias."""
    B, M, G = slope.shape
    for b in range(B):
        gr = grad[b]
        for m in range(M):
            wm, sr, gxr = w[b, m], slope[b, m], gx[b, m]
            for g in range(G):
                v = sr[g] * wm * gr[g]
                gxr[g] = _store(v, gxr)
                if want_bias:
                    gb[g] += v


_BITS = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.float32, np.float32)}


def supports(t: torch.Tensor) -> bool:
    """Whether the loops take this tensor: on the CPU, bfloat16 or float32."""
    return t.device.type == "cpu" and t.dtype in _BITS


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor: bfloat16 as its uint16 bits."""
    view, dtype = _BITS[t.dtype]
    return t.view(view).numpy().view(dtype)


def spot_means(x: torch.Tensor, w: torch.Tensor, want_slope: bool):
    """(B, G) float32 footprint means of f(x), and f'(x) as (B, M, G) float32 when want_slope."""
    B, M, G = x.shape
    out = torch.empty(B, G)
    slope = torch.empty(B, M, G) if want_slope else torch.empty(1, 1, G)
    _means(_numpy(x.contiguous()), _numpy(w.float().contiguous()), out.numpy(), slope.numpy(), want_slope)
    return out, slope if want_slope else None


def slope_gradient(slope: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, dtype, want_bias: bool):
    """(gx (B, M, G) in dtype, its float32 sum over tokens (G,) or None): the gradient at x."""
    gx = torch.empty(slope.shape, dtype=dtype)
    gb = torch.zeros(slope.shape[-1])
    _gradient(slope.numpy(), _numpy(w.float().contiguous()), _numpy(grad.float().contiguous()), _numpy(gx),
              gb.numpy(), want_bias)
    return gx, gb if want_bias else None


def compile_loops():
    """Compile (or load from numba's cache) the loops for both dtypes now (`make venv`)."""
    w, grad = torch.ones(1, 2), torch.ones(1, 3)
    for dtype in (torch.bfloat16, torch.float32):
        _, slope = spot_means(torch.zeros(1, 2, 3, dtype=dtype), w, True)
        spot_means(torch.zeros(1, 2, 3, dtype=dtype), w, False)
        slope_gradient(slope, w, grad, dtype, True)
        slope_gradient(slope, w, grad, dtype, False)
