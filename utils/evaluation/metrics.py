"""Scoring super-resolution maps against truth, as in the lineage's evaluation: per gene, both maps
min-max scaled to [0, 1] inside the mask, then Pearson r, SSIM (data_range 1) and RMSE."""
import numpy as np
from skimage.metrics import structural_similarity


def pearson_per_gene(a, b):
    """Pearson r of each column of a with the same column of b (rows: spots); 0 for a constant column."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a ** 2).sum(0) * (b ** 2).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)


def _minmax(v):
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def score_maps(pred, truth, rows, cols, genes):
    """pred, truth: (n, G) values at the mask super-pixels (rows, cols). Returns dict of per-gene
    lists and their median/mean."""
    r0, c0 = rows.min(), cols.min()
    shape = (rows.max() - r0 + 1, cols.max() - c0 + 1)
    rr, cc = rows - r0, cols - c0
    out = {"pearson": [], "ssim": [], "rmse": []}
    for g in range(len(genes)):
        p = _minmax(np.asarray(pred[:, g], dtype=np.float64))
        t = _minmax(np.asarray(truth[:, g], dtype=np.float64))
        r = np.corrcoef(p, t)[0, 1] if p.std() > 0 and t.std() > 0 else 0.0
        P = np.zeros(shape)
        T = np.zeros(shape)
        P[rr, cc] = p
        T[rr, cc] = t
        out["pearson"].append(float(r))
        out["ssim"].append(float(structural_similarity(P, T, data_range=1.0)))
        out["rmse"].append(float(np.sqrt(np.mean((p - t) ** 2))))
    summary = {m: {"median": float(np.median(v)), "mean": float(np.mean(v))} for m, v in out.items()}
    return {"genes": list(map(str, genes)), "per_gene": out, "summary": summary, "n_superpixels": int(len(rows))}


def align_to_truth(pred_rows, pred_cols, pred_X, pred_genes, truth):
    """Prediction on the truth's super-pixels and genes (super-pixels the prediction lacks count 0)."""
    genes = [g for g in truth.var_names if g in set(pred_genes)]
    gpos = {g: i for i, g in enumerate(pred_genes)}
    gi = np.array([gpos[g] for g in genes], dtype=np.int64)
    t_rows = truth.obs["row"].to_numpy().astype(np.int64)
    t_cols = truth.obs["col"].to_numpy().astype(np.int64)
    lookup = np.full((int(max(pred_rows.max(), t_rows.max())) + 1, int(max(pred_cols.max(), t_cols.max())) + 1), -1)
    lookup[pred_rows, pred_cols] = np.arange(len(pred_rows))
    pos = lookup[t_rows, t_cols]
    P = np.zeros((len(t_rows), len(genes)), dtype=np.float32)
    have = pos >= 0
    P[have] = np.asarray(pred_X[pos[have]][:, gi])
    T = truth[:, genes].X
    T = T.toarray() if hasattr(T, "toarray") else np.asarray(T)
    return P, T, t_rows, t_cols, genes, float(have.mean())
