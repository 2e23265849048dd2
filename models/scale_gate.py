"""The multi-scale gate of TriHRGE (models/trihrge.MultiScaleFusion) as one fused CPU operation.

For each token n, with y_1 .. y_S its S scales' projections (d values each):
    z_s = gamma_s * (y_s - mean(y_s)) / sqrt(var(y_s) + eps) + beta_s      (a LayerNorm per scale)
    w   = softmax(G [z_1 .. z_S] + g)                                        (the gate, S weights)
    out = sum_s w_s z_s                                                      (d values)
torch runs this as about 30 element-wise passes over (tokens, S, d) arrays, forward and backward:
2.6-3.2 ms of a training step of about 11 ms at the large demo's 32 x 37 tokens on one CPU thread.
Here one numba loop does the forward and one the backward, the same function with its sums in
another order: 1.7-1.8 ms with the batched projection before it (docs/BENCHMARKS.md, "The
multi-scale gate fused on the CPU"). The arrays are feature-major, (S, d, tokens), so every inner
loop runs along the tokens: vector instructions without horizontal sums. numba compiles the loops
once (about 5 s; `make venv` does it, models.compile_cpu_loops) into its cache beside this file (or its user
cache when this folder is read-only).

    gated_scales(y (S, d, N), gamma (S, d), beta (S, d), G (S, S*d), g (S,)) -> (N, d) float32"""
import numba
import numpy as np
import torch

EPS = 1e-5    # nn.LayerNorm's default, which MultiScaleFusion's per-scale norms use
BLOCK = 256   # tokens per block: a block's (S, d, BLOCK) scratch stays in the L2 cache
# fastmath without approximate division, square root or exp: a token's values do not depend on where it falls
# in a vector loop (a super-pixel is predicted the same in any batch)
_JIT = {"cache": True, "fastmath": {"contract", "reassoc", "nsz"}, "nogil": True, "error_model": "numpy"}


@numba.njit(**_JIT)
def _layer_norms(y, gamma, beta, a, n, nhat, rstd, z, mu, var):
    """Tokens a:a+n of y (S, d, N): z (S, d, BLOCK) = gamma * nhat + beta; nhat and rstd (S, N) kept."""
    S, d = gamma.shape
    inv_d = np.float32(1.0) / np.float32(d)
    for s in range(S):
        mu[:] = 0.0
        var[:] = 0.0
        r = rstd[s, a:a + n]
        for j in range(d):
            yr = y[s, j, a:a + n]
            for i in range(n):
                mu[i] += yr[i]
        for j in range(d):
            yr = y[s, j, a:a + n]
            for i in range(n):
                c = yr[i] - mu[i] * inv_d
                var[i] += c * c
        for i in range(n):
            mu[i] *= inv_d
            r[i] = np.float32(1.0) / np.sqrt(var[i] * inv_d + np.float32(EPS))
        for j in range(d):
            yr, nh, zr = y[s, j, a:a + n], nhat[s, j, a:a + n], z[s, j]
            gj, bj = gamma[s, j], beta[s, j]
            for i in range(n):
                h = (yr[i] - mu[i]) * r[i]
                nh[i] = h
                zr[i] = gj * h + bj


@numba.njit(**_JIT)
def _gate_weights(G, g, z, a, n, w, top, total):
    """w[:, a:a+n] (S, N) = softmax over the scales of the gate's logits G z + g."""
    S, d = z.shape[0], z.shape[1]
    for t in range(S):
        wt = w[t, a:a + n]
        wt[:] = g[t]
        for s in range(S):
            for j in range(d):
                gt, zr = G[t, s * d + j], z[s, j]
                for i in range(n):
                    wt[i] += gt * zr[i]
    top[:n] = w[0, a:a + n]
    for t in range(1, S):
        wt = w[t, a:a + n]
        for i in range(n):
            top[i] = max(top[i], wt[i])
    total[:n] = 0.0
    for t in range(S):
        wt = w[t, a:a + n]
        for i in range(n):
            wt[i] = np.exp(wt[i] - top[i])
            total[i] += wt[i]
    for t in range(S):
        wt = w[t, a:a + n]
        for i in range(n):
            wt[i] /= total[i]


@numba.njit(**_JIT)
def _forward(y, gamma, beta, G, g, out, nhat, rstd, w):
    """out (d, N) = sum_s w_s z_s from y (S, d, N), by blocks of tokens; keeps nhat, rstd (S, N)
    and w (S, N) for the backward."""
    S, d, n_tok = y.shape
    z = np.empty((S, d, BLOCK), np.float32)
    mu, var = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for a in range(0, n_tok, BLOCK):
        n = min(BLOCK, n_tok - a)
        _layer_norms(y, gamma, beta, a, n, nhat, rstd, z, mu, var)
        _gate_weights(G, g, z, a, n, w, mu, var)
        for j in range(d):
            o = out[j, a:a + n]
            o[:] = 0.0
            for s in range(S):
                ws, zr = w[s, a:a + n], z[s, j]
                for i in range(n):
                    o[i] += ws[i] * zr[i]


@numba.njit(**_JIT)
def _logits_backward(dout, gamma, beta, nhat, w, a, n, z, dl, wdw, dg):
    """Tokens a:a+n: z (S, d, BLOCK) again from nhat, and dl (S, BLOCK) the gradient of the gate's
    logits (softmax's backward of dw_s = z_s . dout); dg += its sum."""
    S, d = gamma.shape
    wdw[:] = 0.0
    for s in range(S):
        dls, ws = dl[s], w[s, a:a + n]
        dls[:] = 0.0
        for j in range(d):
            nh, zr, go = nhat[s, j, a:a + n], z[s, j], dout[j, a:a + n]
            gj, bj = gamma[s, j], beta[s, j]
            for i in range(n):
                zz = gj * nh[i] + bj
                zr[i] = zz
                dls[i] += zz * go[i]
        for i in range(n):
            wdw[i] += ws[i] * dls[i]
    for t in range(S):
        dlt, wt = dl[t], w[t, a:a + n]
        acc = np.float32(0.0)
        for i in range(n):
            dlt[i] = wt[i] * (dlt[i] - wdw[i])
            acc += dlt[i]
        dg[t] += acc


@numba.njit(**_JIT)
def _scale_backward(s, dout, gamma, G, nhat, rstd, w, a, n, z, dl, dz, m1, m2, dy, dgamma, dbeta, dG):
    """Tokens a:a+n of scale s: dz = w_s dout + G^T dl (dG += dl z), through the layer norm to dy;
    dgamma, dbeta added to."""
    S, d = gamma.shape
    inv_d = np.float32(1.0) / np.float32(d)
    m1[:] = 0.0
    m2[:] = 0.0
    ws, r = w[s, a:a + n], rstd[s, a:a + n]
    for j in range(d):
        go, zr = dout[j, a:a + n], z[s, j]
        for i in range(n):
            dz[i] = ws[i] * go[i]
        for t in range(S):
            gt, dlt = G[t, s * d + j], dl[t]
            acc = np.float32(0.0)
            for i in range(n):
                acc += dlt[i] * zr[i]
                dz[i] += dlt[i] * gt
            dG[t, s * d + j] += acc
        nh, dyr = nhat[s, j, a:a + n], dy[s, j, a:a + n]
        gj = gamma[s, j]
        acc_g = np.float32(0.0)
        acc_b = np.float32(0.0)
        for i in range(n):
            acc_g += dz[i] * nh[i]
            acc_b += dz[i]
            dn = dz[i] * gj
            dyr[i] = dn
            m1[i] += dn
            m2[i] += dn * nh[i]
        dgamma[s, j] += acc_g
        dbeta[s, j] += acc_b
    for i in range(n):
        m1[i] *= inv_d
        m2[i] *= inv_d
    for j in range(d):
        nh, dyr = nhat[s, j, a:a + n], dy[s, j, a:a + n]
        for i in range(n):
            dyr[i] = r[i] * (dyr[i] - m1[i] - nh[i] * m2[i])


@numba.njit(**_JIT)
def _backward(dout, gamma, beta, G, nhat, rstd, w, dy, dgamma, dbeta, dG, dg):
    """dy (S, d, N) and, added into zeroed arrays, the parameters' gradients, from dout (d, N)."""
    S, d, n_tok = nhat.shape
    z = np.empty((S, d, BLOCK), np.float32)
    dl = np.empty((S, BLOCK), np.float32)
    wdw, dz = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    m1, m2 = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for a in range(0, n_tok, BLOCK):
        n = min(BLOCK, n_tok - a)
        _logits_backward(dout, gamma, beta, nhat, w, a, n, z, dl, wdw, dg)
        for s in range(S):
            _scale_backward(s, dout, gamma, G, nhat, rstd, w, a, n, z, dl, dz, m1, m2, dy, dgamma, dbeta, dG)


def _arrays(*tensors):
    return [t.detach().float().contiguous().numpy() for t in tensors]


def _run_forward(y, gamma, beta, G, g):
    arrays = _arrays(y, gamma, beta, G, g)
    S, d, n_tok = arrays[0].shape
    out, nhat = np.empty((d, n_tok), np.float32), np.empty((S, d, n_tok), np.float32)
    rstd, w = np.empty((S, n_tok), np.float32), np.empty((S, n_tok), np.float32)
    _forward(*arrays, out, nhat, rstd, w)
    return torch.from_numpy(out).T, (arrays[1], arrays[2], arrays[3], nhat, rstd, w)


class _GatedScales(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gamma, beta, G, g):
        out, ctx.saved = _run_forward(y, gamma, beta, G, g)
        return out

    @staticmethod
    def backward(ctx, dout):
        gamma, beta, G, nhat, rstd, w = ctx.saved
        grads = (np.empty_like(nhat), np.zeros_like(gamma), np.zeros_like(beta), np.zeros_like(G),
                 np.zeros(G.shape[0], np.float32))
        _backward(_arrays(dout.T)[0], gamma, beta, G, nhat, rstd, w, *grads)
        return tuple(torch.from_numpy(t) for t in grads)


def gated_scales(y, gamma, beta, G, g):
    """(N, d) float32 (a transposed view): the gated mixture of the S layer-normed scales of y
    (S, d, N); see the module docstring. Without gradients it keeps nothing for a backward."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, gamma, beta, G, g)):
        return _GatedScales.apply(y, gamma, beta, G, g)
    return _run_forward(y, gamma, beta, G, g)[0]


def compile_loops():
    """Compile (or load from numba's cache) both loops now: `make venv` runs this once, so that the
    first HISTEX run does not spend about 5 s per worker process compiling them."""
    y = torch.zeros(2, 1, 3)
    gated_scales(y.requires_grad_(), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 2), torch.zeros(2)).sum().backward()
