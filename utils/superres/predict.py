"""Inference over every tissue super-pixel in overlapping windows: windows sit on a lattice with
stride s, each predicts its whole (2h+1)^2 window, and every super-pixel is the tent-weighted mean
of the windows that cover it (more weight near a window's centre), so window borders and the
switch of gene tokens between windows leave no seams. Memory is bounded by the window batch.

Under torchrun the batches of windows are dealt out to the ranks (batch b to rank b mod N), each
rank sums its windows' weighted predictions for the super-pixels they cover, and rank 0 adds up
the ranks' sums (utils.core.distributed). The batches are the same as in one process, so every
window's prediction is bit-identical; with the default non-overlapping windows each super-pixel
has one window and the maps are bit-identical too. With overlapping windows (--stride below the
window width: gene tokens, window attention) a super-pixel that windows of two ranks cover sums
them in rank order instead of window order, which can differ by float32 rounding."""
import numpy as np
import scipy.sparse as sparse
import torch
from tqdm.auto import tqdm

from ..core import geometry as geo
from ..core.chunks import row_chunks
from ..core.device import autocast
from ..core.distributed import World
from .config import precision_of
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


def median_of_states(preds, *, overwrite: bool = False):
    """Elementwise median of a few same-shaped tensors (the model states). torch's median/quantile
    over a short leading axis of a large tensor were 40% of inference; this compare-exchange sort
    of whole tensors (odd-even transposition) gives the same values several times faster.
    overwrite: the tensors may be overwritten (used by the five-state network)."""
    xs = list(preds)
    if len(xs) == 5:
        return _median_of_five(*xs, overwrite=overwrite)
    n = len(xs)
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            lo = torch.minimum(xs[i], xs[i + 1])
            xs[i + 1] = torch.maximum(xs[i], xs[i + 1])
            xs[i] = lo
    k = n // 2
    return xs[k] if n % 2 else (xs[k - 1] + xs[k]) / 2


def _median_of_five(a, b, c, d, e, *, overwrite=False):
    """The median of five tensors (the default --n-states) in 10 min/max passes instead of the sort's
    20: median(e, max(min(a, b), min(c, d)), min(max(a, b), max(c, d))). A selection, so the same
    bits as the sort (tested on every 0-1 input, which covers all orders); with overwrite the passes
    reuse a and c: her2st C2's median 3.3 -> ~1 s."""
    low_ab, high_ab = torch.minimum(a, b), torch.maximum(a, b, out=a if overwrite else None)
    low_cd, high_cd = torch.minimum(c, d), torch.maximum(c, d, out=c if overwrite else None)
    f = torch.maximum(low_ab, low_cd, out=low_ab)       # the second lowest of a..d, or higher
    g = torch.minimum(high_ab, high_cd, out=high_ab)    # the second highest of a..d, or lower
    low, high = torch.minimum(e, f, out=low_cd), torch.maximum(e, f, out=f)
    return torch.maximum(low, torch.minimum(high, g, out=high), out=low)


def median_prediction(models, inputs):
    """Median over the states `models` of their predictions at inputs. activation() is elementwise
    and non-decreasing, so with an odd number of states it commutes with the median and runs once
    instead of once per state: the same bits (tested), her2st C2 inference 5.7 -> 1.7 s with the copy below."""
    if len(models) % 2:
        return models[0].activation(median_of_states([m.pre_activation(*inputs) for m in models], overwrite=True))
    return median_of_states([m(*inputs) for m in models])


def predict_tissue(models, cfg, maps, tokens, rows, cols, device, batch=64, progress=True, out=None,
                   world: World = World(), scaling=None):
    """Median over model states of the scaled predictions for the super-pixels (rows, cols),
    blended over overlapping windows (per super-pixel when the models' tokens are independent).
    Returns (or fills `out`, e.g. a memmap) an (n, G) array; under torchrun every rank predicts its
    share of the batches and only rank 0 returns the array (the others None; `out` is rank 0's).
    scaling: the TrainingData's feature scaling (--standardize-features), None otherwise."""
    if world.leader and out is None:
        out = np.empty((len(rows), cfg["n_genes"]), dtype=np.float32)
    with autocast(device, precision_of(cfg)):
        return _predict(models, cfg, maps, tokens, rows, cols, device, batch, progress, out, world, scaling)


def _predict(models, cfg, maps, tokens, rows, cols, device, batch, progress, out, world, scaling):
    if all(getattr(m, "independent_tokens", False) for m in models):
        # as many super-pixels per batch as `batch` windows hold: smaller batches (1024) were faster on
        # an idle machine but 3 x slower beside other jobs (each op's threads wait for a busy core)
        return _predict_superpixels(models, maps, rows, cols, device, batch * (2 * cfg["half"] + 1) ** 2, progress,
                                    out, world, cfg["n_genes"], scaling)
    return _predict_windows(models, cfg, maps, tokens, rows, cols, device, batch, progress, out, world, scaling)


@torch.no_grad()
def _predict_superpixels(models, maps, rows, cols, device, batch, progress, out, world, n_genes, scaling=None):
    """Median over states for `batch` tissue super-pixels at a time, each from its own features.
    The windows predicted every super-pixel of their square, tissue or not (1.1 x the tissue on
    her2st C2's 13 x 13 windows), and then blended them; the values are those of the windows (up to
    their weight w: w v / w in float32). Under torchrun rank r predicts batches r, r + N, ... and
    rank 0 gathers the rows (each super-pixel has one value: the same bits as one process)."""
    mine = world.strided(range(0, len(rows), batch))
    parts = []
    for s0 in tqdm(mine, desc="predict", unit="super-pixel", unit_scale=batch, disable=not progress, leave=False):
        hist, _ = gather_windows(maps, rows[s0:s0 + batch], cols[s0:s0 + batch], 0, scaling=scaling)  # (n, 1, C)
        inputs = batch_inputs({"hist": hist}, slice(None), False, None, device)
        med = median_prediction(models, inputs)[:, 0]
        if world.size == 1:  # straight into out: no float32 temporary of the batch (43 MB on her2st)
            torch.from_numpy(out[s0:s0 + len(med)]).copy_(med)
        else:
            pred = med.float().cpu().numpy()
            parts.append((np.arange(s0, s0 + len(pred)), pred))
    if world.size == 1:
        return out
    if world.leader:
        out[:] = 0.0
    index = np.concatenate([i for i, _ in parts] or [np.zeros(0, np.int64)])
    values = np.concatenate([v for _, v in parts] or [np.zeros((0, n_genes), np.float32)])
    world.add_rows_at_leader(index, values, out)
    return out if world.leader else None


@torch.no_grad()
def _predict_windows(models, cfg, maps, tokens, rows, cols, device, batch, progress, out, world=World(),
                     scaling=None):
    """predict_tissue over windows on the stride lattice, tent-blended where they overlap."""
    half, stride = cfg["half"], cfg["stride"]
    centre_r, centre_c, pix, window, token, weight = window_cover(rows, cols, half, stride)
    order = np.argsort(window, kind="stable")
    starts = np.searchsorted(window[order], np.arange(len(centre_r) + 1))
    mine = world.strided(range(0, len(centre_r), batch))
    if world.size == 1:  # one process: every super-pixel, summed in place
        pixels, acc = None, out
    else:
        pixels = np.unique(np.concatenate([pix[order[starts[b0]:starts[min(len(centre_r), b0 + batch)]]]
                                           for b0 in mine] or [np.zeros(0, np.int64)]))
        acc = np.empty((len(pixels), cfg["n_genes"]), dtype=np.float32)
    acc[:] = 0.0
    wsum = np.zeros(len(acc), dtype=np.float64)
    use_tokens = models[0].use_gene_tokens
    for b0 in tqdm(mine, desc="predict", unit="window", unit_scale=batch, disable=not progress, leave=False):
        b1 = min(len(centre_r), b0 + batch)
        hist, _ = gather_windows(maps, centre_r[b0:b1], centre_c[b0:b1], half, scaling=scaling)
        data = {"hist": hist}
        if use_tokens:
            cx, cy = geo.superpixel_centres(centre_r[b0:b1], centre_c[b0:b1])
            idx, offs, hid = tokens.query(np.stack([cx, cy], 1))
            data.update(tok_full=idx, offs_full=offs, hid_full=hid, tok_lso=idx, offs_lso=offs, hid_lso=hid,
                        hr_expr=tokens.expr)
        sel = np.arange(b1 - b0)
        inputs = batch_inputs(data, sel, use_tokens, np.zeros(len(sel), bool), device)
        med = median_prediction(models, inputs).float().cpu().numpy()
        members = order[starts[b0]:starts[b1]]
        p, w = pix[members], weight[members]
        # sum the weighted predictions of the super-pixels that several windows of this batch cover
        uniq, inv = np.unique(p, return_inverse=True)
        S = sparse.csr_matrix((w, (inv, np.arange(len(p)))), shape=(len(uniq), len(p)))
        at = uniq if pixels is None else np.searchsorted(pixels, uniq)
        acc[at] += S @ med[window[members] - b0, token[members]]
        wsum[at] += np.asarray(S.sum(1)).ravel()
    if pixels is not None:
        wsum = _sum_at_leader(world, pixels, acc, wsum, out)
        if not world.leader:
            return None
    for s in row_chunks(*out.shape):
        out[s] /= wsum[s, None].astype(np.float32)
    return out


def _sum_at_leader(world, pixels, acc, wsum, out):
    """Rank 0's `out` becomes the sum of every rank's window sums `acc` over its `pixels`; returns
    the summed window weights (rank 0; None elsewhere)."""
    total = np.zeros(len(out), dtype=np.float64) if world.leader else None
    if world.leader:
        out[:] = 0.0
    world.add_rows_at_leader(pixels, acc, out)
    world.add_rows_at_leader(pixels, wsum, total)
    return total
