"""Every run measures itself by cross-fitting: the states partition the spots into folds, state s
holds out fold s (its early-stopping set), and its prediction at those spots (with --gene-tokens,
each spot's own HR pseudo-spots hidden) is an out-of-fold prediction. Every spot gets one at no
extra training cost. HISTEX then passes it through the spot consistency and the fusion the maps get,
computed from the other spots only (fusion.consistent_oof), so the estimate is of the maps that are
written. The interpolation reference is scored the same way, leaving each spot out of the kernel.
Accuracy is spot-level, not super-pixel-level.

    folds = spot_folds(n_spots, n_folds, seed)           # list of index arrays, or None
    oof = out_of_fold_scaled(models, folds, data, device)  # (n_spots, G) scaled units
    cv = gene_accuracy(measured, predicted_oof, reference_oof, genes)
"""
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from ..evaluation.metrics import pearson_per_gene
from .consistency import kernel_weights
from .inputs import batch_inputs
from .stacking import STACK_PARTS
from .train import MIN_TRAIN_SPOTS, MIN_VAL_SPOTS, footprint_shares, spot_means

N_SUMMARY_GENES = 100        # the summary covers the most variable genes, as the real-data protocols


def _folds_fit(n_spots: int, n_folds: int) -> bool:
    """Each fold large enough to validate on, and the rest to train on."""
    return n_folds >= 2 and n_spots // n_folds >= MIN_VAL_SPOTS and n_spots - -(-n_spots // n_folds) >= MIN_TRAIN_SPOTS


def max_folds(n_spots: int) -> int:
    """The most folds spot_folds makes of n_spots (0: none)."""
    return max((k for k in range(2, n_spots // MIN_VAL_SPOTS + 1) if _folds_fit(n_spots, k)), default=0)


def spot_folds(n_spots: int, n_folds: int, seed: int):
    """A seeded partition of the spots into n_folds folds (sorted index arrays); None when a fold
    would be too small to validate on, or the rest too small to train on."""
    if not _folds_fit(n_spots, n_folds):
        return None
    perm = np.random.default_rng([seed, n_folds]).permutation(n_spots)
    return [np.sort(perm[f::n_folds]) for f in range(n_folds)]


@torch.no_grad()
def out_of_fold_scaled(models, folds, data, device, batch=64, precision="fp32"):
    """(n_spots, G) float32: each spot's footprint mean predicted by the state that held it out
    (scaled units, as the training target); NaN for spots in no fold. precision: as training's."""
    keep, share = footprint_shares(data["fp"], device)
    out = np.full(data["target"].shape, np.nan, dtype=np.float32)
    for model, idx in zip(models, folds):
        model.eval()
        for s in range(0, len(idx), batch):
            b = idx[s:s + batch]
            inputs = batch_inputs(data, b, model.use_gene_tokens, np.ones(len(b), bool), device)
            out[b] = spot_means(model, inputs, keep[b], share[b], precision).cpu().numpy()
    return out


def leave_one_out_kernel(xy, sigma_px):
    """Row-normalised Gaussian weights from each spot to the other spots (its own weight removed);
    and the spots with no other spot within the kernel's reach."""
    W = kernel_weights(xy, xy, sigma_px, k=33).tolil()
    W.setdiag(0)
    W = W.tocsr()
    sums = np.asarray(W.sum(1)).ravel()
    W = sp.diags(np.where(sums > 0, 1.0 / np.where(sums > 0, sums, 1.0), 0.0)) @ W
    return W.tocsr(), sums <= 0


def leave_one_out_interpolation(counts, xy, sigma_px):
    """(n_spots, G): each spot's counts from the Gaussian kernel over the other spots (the
    interpolation baseline with the spot itself left out), at the spot centre."""
    W, lone = leave_one_out_kernel(xy, sigma_px)
    pred = np.asarray(W @ counts, dtype=np.float32)
    if lone.any():  # no other spot within the kernel's reach: the nearest other spot
        _, nn = cKDTree(xy).query(xy[lone], k=2)
        pred[lone] = counts[nn[:, 1]]
    return pred


def gene_accuracy(measured, predicted, reference, genes, model=None, weights=None, stack=None) -> pd.DataFrame:
    """Per gene: Pearson r of log1p counts across the spots with an out-of-fold prediction, for the
    maps written (cv_pearson), the interpolation reference (cv_pearson_reference) and, with a fusion,
    the image model alone (cv_pearson_model) and its blend weight; with --fusion stack the three
    between-spot weights (stack (G, 3): image model, consistent map, interpolation); the gene's mean
    count. Sorted by cv_pearson, best first."""
    ok = np.isfinite(predicted).all(1) & np.isfinite(reference).all(1)
    m = np.log1p(np.asarray(measured, np.float64)[ok])
    flat = np.ptp(m, axis=0) == 0 if len(m) else np.ones(m.shape[1], bool)

    def r(pred):   # undefined (NaN) for a gene measured the same in every spot
        return np.where(flat, np.nan, _log1p_pearson(m, np.asarray(pred)[ok]))

    table = pd.DataFrame({"gene": list(genes), "cv_pearson": r(predicted), "cv_pearson_reference": r(reference),
                          **({"cv_pearson_model": r(model)} if model is not None else {}),
                          **({"blend_weight": weights} if weights is not None else {}),
                          **({f"stack_{k}": stack[:, i] for i, k in enumerate(STACK_PARTS)} if stack is not None else {}),
                          "mean_count": np.asarray(measured, np.float64).mean(0),
                          "log1p_variance": np.where(flat, 0.0, m.var(0))})
    table.attrs["n_spots"] = int(ok.sum())
    return table.sort_values("cv_pearson", ascending=False, kind="stable").reset_index(drop=True)


def _log1p_pearson(log_measured, predicted):
    """Per gene Pearson r of log1p(predicted counts, negatives clipped) with log1p measured counts."""
    return pearson_per_gene(np.log1p(np.clip(np.asarray(predicted, np.float64), 0, None)), log_measured)


def median_pearson(measured, predicted, n_genes: int = N_SUMMARY_GENES) -> float:
    """Median Pearson r of log1p counts over the n_genes most variable genes (summary's figure)."""
    m = np.log1p(np.asarray(measured, np.float64))
    top = np.argsort(-m.var(0), kind="stable")[:n_genes]
    return float(np.median(_log1p_pearson(m[:, top], np.asarray(predicted)[:, top])))


def summary(table: pd.DataFrame, n_genes: int = N_SUMMARY_GENES) -> dict:
    """run.json's "cross_validation": medians over the n_genes most variable genes (log1p)."""
    varying = table[table["log1p_variance"] > 0]   # a gene with one count everywhere has no r
    top = varying.sort_values("log1p_variance", ascending=False, kind="stable").head(n_genes)
    return {"pearson_median": float(np.median(top["cv_pearson"])),
            "reference_pearson_median": float(np.median(top["cv_pearson_reference"])),
            "n_genes": int(len(top)), "n_spots": int(table.attrs["n_spots"]),
            "unit": "spot (footprint sums), not super-pixel"}
