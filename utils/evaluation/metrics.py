"""Scoring super-resolution maps against truth, as in the lineage's evaluation: per gene, both maps
min-max scaled to [0, 1] inside the mask, then Pearson r, SSIM (data_range 1) and RMSE."""
import cv2
import numpy as np

from ..core.chunks import row_chunks
from ..core.workers import thread_map

SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03   # skimage.metrics.structural_similarity's defaults


def pearson_per_gene(a, b, axis: int = 0):
    """Pearson r of each column of a with the same column of b (rows: spots), or of each row with
    axis=1; 0 for a constant column."""
    # constant by its values, not by a zero sum of squares: a column of 7s less its rounded mean is
    # not exactly 0, and that rounding scored r = 1
    flat = (np.ptp(a, axis) == 0) | (np.ptp(b, axis) == 0)
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    den = np.sqrt((a ** 2).sum(axis) * (b ** 2).sum(axis))
    ok = ~flat & (den > 0)
    return np.where(ok, (a * b).sum(axis) / np.where(ok, den, 1), 0.0)


def ssim(a, b, *, win: int = SSIM_WINDOW) -> float:
    """SSIM of two 2-D float64 maps with data range 1, as skimage.metrics.structural_similarity(a, b,
    data_range=1.0) computes it (a win x win uniform window, sample covariance, the mean over the
    pixels at least win // 2 from the border, so the border mode does not matter), with OpenCV's
    box filter: the same value to 1e-15, 10 x faster (an 820 x 810 map: 30 against 305 ms)."""
    if min(a.shape) < win:
        raise ValueError(f"a {a.shape[0]} x {a.shape[1]} map is smaller than the {win} x {win} SSIM window")

    def mean(x):
        return cv2.boxFilter(x, cv2.CV_64F, (win, win), normalize=True, borderType=cv2.BORDER_REFLECT)
    ua, ub = mean(a), mean(b)
    n = win * win / (win * win - 1)
    va, vb, vab = n * (mean(a * a) - ua * ua), n * (mean(b * b) - ub * ub), n * (mean(a * b) - ua * ub)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = (2 * ua * ub + c1) * (2 * vab + c2) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean(dtype=np.float64))


def _minmax_rows(v):
    """Each row of v (k, n) scaled to [0, 1] (a constant row to 0)."""
    lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (v - lo) / np.where(span > 0, span, 1.0), 0.0)


def score_maps(pred, truth, rows, cols, genes, *, threads: int | None = None, with_ssim: bool = True):
    """pred, truth: (n, G) values at the mask super-pixels (rows, cols). Returns dict of per-gene
    lists and their median/mean. Genes in chunks of 16 MB of contiguous (genes, n) float64 copies
    (core.chunks: larger chunks were mostly page faults), the chunks on `threads` threads (default:
    the CPUs available; OpenCV and numpy's loops release the GIL). with_ssim=False: SSIM is NaN (a
    region thinner than its window, see ssim_fits)."""
    chunks = row_chunks(len(genes), len(rows), itemsize=8)
    parts = thread_map(lambda g: _score_genes(pred[:, g], truth[:, g], rows, cols, with_ssim), chunks, threads=threads)
    out = {m: [v for part in parts for v in part[m]] for m in ("pearson", "ssim", "rmse")}
    summary = {m: {"median": float(np.median(v)), "mean": float(np.mean(v))} for m, v in out.items()}
    return {"genes": list(map(str, genes)), "per_gene": out, "summary": summary, "n_superpixels": int(len(rows))}


def extent(rows, cols) -> tuple:
    """(rows, cols) of the raster that spans the super-pixels (rows, cols): what the scoring allocates."""
    return int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1


def ssim_fits(rows, cols) -> bool:
    """Whether the raster of the super-pixels (rows, cols) holds at least one SSIM window."""
    return min(extent(rows, cols)) >= SSIM_WINDOW


def _score_genes(pred, truth, rows, cols, with_ssim=True):
    """{metric: per-gene list} of score_maps for the genes (columns) of pred and truth."""
    rr, cc = rows - rows.min(), cols - cols.min()
    P, T = np.zeros(extent(rows, cols)), np.zeros(extent(rows, cols))
    p = _minmax_rows(np.asarray(pred, dtype=np.float64).T.copy())
    t = _minmax_rows(np.asarray(truth, dtype=np.float64).T.copy())
    out = {"pearson": pearson_per_gene(p, t, axis=1).tolist(), "ssim": [],
           "rmse": np.sqrt(np.mean((p - t) ** 2, axis=1)).tolist()}
    for pg, tg in zip(p, t):
        P[rr, cc], T[rr, cc] = pg, tg
        out["ssim"].append(ssim(P, T) if with_ssim else float("nan"))
    return out


def align_to_truth(pred_rows, pred_cols, pred_X, pred_genes, truth):
    """(prediction on the truth's super-pixels and genes as an OnTruth, truth values (n, genes) as an
    array or, for a sparse truth, SparseColumns, truth rows, cols, genes, share of the truth's
    super-pixels the prediction has); super-pixels the prediction lacks count 0."""
    genes = [g for g in truth.var_names if g in set(pred_genes)]
    gpos = {g: i for i, g in enumerate(pred_genes)}
    gi = np.array([gpos[g] for g in genes], dtype=np.int64)
    t_rows = truth.obs["row"].to_numpy().astype(np.int64)
    t_cols = truth.obs["col"].to_numpy().astype(np.int64)
    # over the truth's extent only: predicted super-pixels beyond it are never scored
    r0, c0 = t_rows.min(), t_cols.min()
    lookup = np.full(extent(t_rows, t_cols), -1)
    pr, pc = np.asarray(pred_rows, np.int64) - r0, np.asarray(pred_cols, np.int64) - c0
    on = (pr >= 0) & (pc >= 0) & (pr < lookup.shape[0]) & (pc < lookup.shape[1])
    lookup[pr[on], pc[on]] = np.flatnonzero(on)
    pos = lookup[t_rows - r0, t_cols - c0]
    T = truth.X if genes == list(truth.var_names) else truth[:, genes].X
    T = SparseColumns(T) if hasattr(T, "tocsc") else np.asarray(T)
    return OnTruth(pred_X, pos, gi), T, t_rows, t_cols, genes, float((pos >= 0).mean())


class _WholeColumns:
    """An (n, genes) matrix read only as score_maps reads it, [:, genes] (columns(genes) in the
    subclass, of dtype), so that no whole dense copy is made unless np.asarray asks for one."""
    dtype = np.float32

    def __getitem__(self, key):
        rows, g = key
        if rows != slice(None):
            raise IndexError(f"{type(self).__name__} reads whole columns: [:, genes]")
        return self.columns(g)

    def __array__(self, dtype=None, copy=None):
        return self[:, :].astype(dtype or self.dtype, copy=False)


class SparseColumns(_WholeColumns):
    """A sparse (n, genes) truth densified by column chunk: the large demo's dense copy was 534 MB of
    fresh pages (2.3 s; by CSC column chunks 1.0 s)."""

    def __init__(self, X):
        self.X = X.tocsc()
        self.shape, self.dtype = X.shape, X.dtype

    def columns(self, g):
        return self.X[:, g].toarray()


class OnTruth(_WholeColumns):
    """The (n_pred, G) map X as (n_truth, genes): its rows pos (0 where pos < 0, a super-pixel it
    lacks) and columns gi, gathered only by column chunks: a whole aligned copy of the large demo's
    map was 537 MB of fresh pages (np.asarray makes one)."""

    def __init__(self, X, pos, gi):
        sparse = hasattr(X, "tocsc")   # a sparse map (a super-res.h5ad rewritten by scanpy): by CSC columns
        self.X, self.dense = (X.tocsc(), lambda a: a.toarray()) if sparse else (X, np.asarray)
        self.at, self.lacks, self.gi = np.maximum(pos, 0), pos < 0, gi
        self.shape = (len(pos), len(gi))

    def columns(self, g):
        out = self.dense(self.X[:, self.gi[g]]).astype(np.float32, copy=False)[self.at]   # columns, then rows
        out[self.lacks] = 0.0
        return out
