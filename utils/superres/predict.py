"""Inference over every tissue super-pixel in overlapping windows: windows sit on a lattice with
stride s, each predicts its whole (2h+1)^2 window, and every super-pixel is the tent-weighted mean
of the windows that cover it (more weight near a window's centre), so window borders and the
switch of gene tokens between windows leave no seams. Memory is bounded by the window batch."""
import numpy as np
import scipy.sparse as sparse
import torch
from tqdm.auto import tqdm

from ..core import geometry as geo
from .inputs import batch_inputs, gather_windows


def window_cover(rows, cols, half, stride):
    """Windows on the stride lattice that cover the super-pixels (rows, cols).

    Returns (centre_r, centre_c) of the windows, and flat arrays (pixel, window, token, weight)."""
    stride = max(1, min(stride, 2 * half + 1))
    m = half // stride + 1
    pix, lat_r, lat_c, dr_all, dc_all = [], [], [], [], []
    for a in range(-m, m + 1):
        for b in range(-m, m + 1):
            lr, lc = rows // stride + a, cols // stride + b
            dr = rows - (lr * stride + stride // 2)
            dc = cols - (lc * stride + stride // 2)
            ok = (np.abs(dr) <= half) & (np.abs(dc) <= half)
            pix.append(np.flatnonzero(ok))
            lat_r.append(lr[ok])
            lat_c.append(lc[ok])
            dr_all.append(dr[ok])
            dc_all.append(dc[ok])
    pix, lat_r, lat_c = np.concatenate(pix), np.concatenate(lat_r), np.concatenate(lat_c)
    dr, dc = np.concatenate(dr_all), np.concatenate(dc_all)
    key = lat_r * (int(lat_c.max()) + 2) + (lat_c - int(lat_c.min()) + 1) if len(lat_c) else lat_r
    uniq, window = np.unique(key, return_inverse=True)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[window[::-1]] = np.arange(len(window))[::-1]
    centre_r = lat_r[first] * stride + stride // 2
    centre_c = lat_c[first] * stride + stride // 2
    token = (dr + half) * (2 * half + 1) + (dc + half)
    weight = (1.0 - np.abs(dr) / (half + 1.0)) * (1.0 - np.abs(dc) / (half + 1.0))
    return centre_r, centre_c, pix, window, token, weight.astype(np.float32)


def median_of_states(preds):
    """Elementwise median of a few same-shaped tensors (the model states). torch's median/quantile
    over a short leading axis of a large tensor were 40% of inference; this compare-exchange sort
    of whole tensors (odd-even transposition) gives the same values several times faster."""
    xs = list(preds)
    n = len(xs)
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            lo = torch.minimum(xs[i], xs[i + 1])
            xs[i + 1] = torch.maximum(xs[i], xs[i + 1])
            xs[i] = lo
    k = n // 2
    return xs[k] if n % 2 else (xs[k - 1] + xs[k]) / 2


def predict_tissue(models, cfg, maps, tokens, rows, cols, device, batch=64, progress=True, out=None):
    """Median over model states of the scaled predictions for the super-pixels (rows, cols),
    blended over overlapping windows (per super-pixel when the models' tokens are independent).
    Returns (or fills `out`, e.g. a memmap) an (n, G) array."""
    if out is None:
        out = np.empty((len(rows), cfg["n_genes"]), dtype=np.float32)
    if all(getattr(m, "independent_tokens", False) for m in models):
        # as many super-pixels per batch as `batch` windows hold: smaller batches (1024) were faster on
        # an idle machine but 3 x slower beside other jobs (each op's threads wait for a busy core)
        return _predict_superpixels(models, maps, rows, cols, device, batch * (2 * cfg["half"] + 1) ** 2, progress, out)
    return _predict_windows(models, cfg, maps, tokens, rows, cols, device, batch, progress, out)


@torch.no_grad()
def _predict_superpixels(models, maps, rows, cols, device, batch, progress, out):
    """Median over states for `batch` tissue super-pixels at a time, each from its own features.
    The windows predicted every super-pixel of their square, tissue or not (1.1 x the tissue on
    her2st C2's 13 x 13 windows), and then blended them; the values are those of the windows (up to
    their weight w: w v / w in float32)."""
    for s0 in tqdm(range(0, len(rows), batch), desc="predict", unit="super-pixel", unit_scale=batch,
                   disable=not progress, leave=False):
        hist, _ = gather_windows(maps, rows[s0:s0 + batch], cols[s0:s0 + batch], 0)   # scale -> (n, 1, C)
        inputs = batch_inputs({"hist": hist}, slice(None), False, None, device)
        out[s0:s0 + batch] = median_of_states([m(*inputs) for m in models])[:, 0].float().cpu().numpy()
    return out


@torch.no_grad()
def _predict_windows(models, cfg, maps, tokens, rows, cols, device, batch, progress, out):
    """predict_tissue over windows on the stride lattice, tent-blended where they overlap."""
    half, stride = cfg["half"], cfg["stride"]
    centre_r, centre_c, pix, window, token, weight = window_cover(rows, cols, half, stride)
    order = np.argsort(window, kind="stable")
    starts = np.searchsorted(window[order], np.arange(len(centre_r) + 1))
    out[:] = 0.0
    wsum = np.zeros(len(rows), dtype=np.float64)
    use_tokens = models[0].use_gene_tokens
    for b0 in tqdm(range(0, len(centre_r), batch), desc="predict", unit="window", unit_scale=batch,
                   disable=not progress, leave=False):
        b1 = min(len(centre_r), b0 + batch)
        hist, _ = gather_windows(maps, centre_r[b0:b1], centre_c[b0:b1], half)
        data = {"hist": hist}
        if use_tokens:
            cx, cy = geo.superpixel_centres(centre_r[b0:b1], centre_c[b0:b1])
            idx, offs, hid = tokens.query(np.stack([cx, cy], 1))
            data.update(tok_full=idx, offs_full=offs, hid_full=hid, tok_lso=idx, offs_lso=offs, hid_lso=hid,
                        hr_expr=tokens.expr)
        sel = np.arange(b1 - b0)
        inputs = batch_inputs(data, sel, use_tokens, np.zeros(len(sel), bool), device)
        med = median_of_states([m(*inputs) for m in models]).float().cpu().numpy()
        members = order[starts[b0]:starts[b1]]
        p, w = pix[members], weight[members]
        # sum the weighted predictions of the super-pixels that several windows of this batch cover
        uniq, inv = np.unique(p, return_inverse=True)
        S = sparse.csr_matrix((w, (inv, np.arange(len(p)))), shape=(len(uniq), len(p)))
        out[uniq] += S @ med[window[members] - b0, token[members]]
        wsum[uniq] += np.asarray(S.sum(1)).ravel()
    for s in range(0, len(rows), 65536):
        out[s:s + 65536] /= wsum[s:s + 65536, None].astype(np.float32)
    return out
