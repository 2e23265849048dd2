"""Late fusion of the image model with the measured neighbours, chosen on the run's own data: per
gene, the blend weight a_g of map = a_g * model + (1 - a_g) * interpolation that best predicts the
out-of-fold spot counts (least squares), shrunk towards the weight pooled over all genes by
empirical Bayes (random-effects pooling), so that a gene with little evidence is not overfitted. A
gene where the histology carries nothing gets a_g near 0: its map falls back to the smoothing
instead of being worse. The blend is applied to the model's map AFTER its spot consistency (a blend
before it was undone by the consistency: her2st held-out r moved by -0.001 / +0.003), and the model's
out-of-fold prediction is corrected by the other spots' consistency in the same way
(consistent_oof), so the weights are fitted to the maps they mix.

    fitted = consistent_oof(oof, measured, predicted, xy, sigma_px, "local")
    a, record = blend_weights(measured, fitted, oof_reference)        # (G,), plain data for run.json
    blend_maps(sr, a, kernel, counts / mean_footprint, detail=Detail(rows, cols, grid_shape, sigma_sp))
                                                                      # sr (n_sp, G) updated in place

The local spot consistency's kernel width is chosen the same way (choose_consistency_sigma): the
width whose correction, computed from the other spots only, best predicts each spot's counts from
its out-of-fold prediction.
"""
import numpy as np

from ..core.workers import thread_map
from .consistency import global_rescale_factors, interpolation_chunks, local_rescale_factors
from .crossval import leave_one_out_kernel, median_pearson

SIGMA_CHOICES = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8)   # lattice spacings tried by choose_consistency_sigma


def blend_weights(measured, model, reference):
    """(a (G,) in [0, 1], record) from spot counts: measured, model and reference out-of-fold (n, G)."""
    ok = np.isfinite(model).all(1) & np.isfinite(reference).all(1)
    m, p, r = (np.asarray(v, np.float64)[ok] for v in (measured, model, reference))
    d, y = p - r, m - r
    dd = (d ** 2).sum(0)
    a = np.where(dd > 0, (d * y).sum(0) / np.where(dd > 0, dd, 1.0), 0.0)
    resid = ((y - a * d) ** 2).sum(0) / max(1, len(m) - 1)
    se2 = np.where(dd > 0, resid / np.where(dd > 0, dd, 1.0), np.inf)
    finite = np.isfinite(se2) & (se2 > 0)
    # random-effects pooling (DerSimonian-Laird): the pooled weight and the between-gene variance
    # tau2 of the true weights, precision-weighted so that genes without evidence barely count
    w = np.where(finite, 1.0 / np.where(finite, se2, 1.0), 0.0)
    pooled = float((w * a).sum() / w.sum()) if w.sum() > 0 else 0.0
    q = float((w * (a - pooled) ** 2).sum())
    k = int(finite.sum())
    denom = w.sum() - (w ** 2).sum() / w.sum() if w.sum() > 0 else 0.0
    tau2 = max((q - (k - 1)) / denom, 0.0) if denom > 0 else 0.0
    shrink = np.where(finite, tau2 / (tau2 + np.where(finite, se2, 1.0)), 0.0)
    pooled = float(np.clip(pooled, 0.0, 1.0))
    a_shrunk = np.clip(pooled + shrink * (a - pooled), 0.0, 1.0)
    record = {"kind": "per-gene blend of model and interpolation (out-of-fold least squares, empirical-Bayes "
                      "shrinkage to the pooled weight)", "between_gene_variance": tau2,
              "pooled_weight": pooled, "median_weight": float(np.median(a_shrunk)),
              "share_genes_below_half": float(np.mean(a_shrunk < 0.5)), "n_spots": int(ok.sum())}
    return a_shrunk.astype(np.float32), record


def blended_oof(a, model, reference):
    """The out-of-fold prediction of the blend (for its own accuracy estimate)."""
    return a * model + (1.0 - a) * reference


def blend_maps(sr, a, kernel, per_sp, detail=None, chunk=None):
    """sr (n_sp, G) counts per super-pixel <- a * sr + (1 - a) * the interpolation map (kernel:
    row-normalised super-pixel x spot weights; per_sp (spots, G): spot counts / mean footprint), in
    chunks so the interpolation is never whole.
    detail: a Detail of sr's grid; then the interpolation carries the model's within-spot detail
    (interp * sr / sr smoothed over about a footprint), so the blend moves the spot-level values
    without washing out the super-pixel pattern."""
    per_sp = np.asarray(per_sp, np.float32)
    if detail is not None:
        return detail.blend(sr, a, kernel, per_sp)
    for s, interp in interpolation_chunks(kernel, per_sp, chunk):
        sr[s] = a * sr[s] + (1.0 - a) * interp
    return sr


class Detail:
    """The super-pixel grid of a map (tissue rows, cols; grid shape) and the Gaussian width (in
    super-pixels) that separates within-spot detail from the spot-level level. Genes go through in
    passes of genes_per_pass: a 1,260 x 1,260 grid (a 20,000 px slide) takes ~0.2 GB per pass. 16
    genes (64 bytes a super-pixel) ran fastest: against 32, her2st C2's blend alone 3.2 -> 2.5 s, the
    large demo's 3.4-4.2 -> 3.1-3.2 s within its run; 8, 24 and 64-256 were slower."""
    MAX_RATIO = 20.0   # a super-pixel at most 20 x its neighbourhood: bounds a near-empty neighbourhood

    def __init__(self, rows, cols, shape, sigma_sp, genes_per_pass=16, threads=None):
        if not 1 <= genes_per_pass <= 512:
            raise ValueError("genes_per_pass: OpenCV filters at most 512 channels")
        self.sigma, self.step, self.threads = float(sigma_sp), genes_per_pass, threads
        # the tissue's bounding box plus the filter's reach (scipy's truncation: int(4 sigma + 0.5)):
        # the same values (zeros outside either way) 3-4 x faster than the whole grid
        self.reach = int(4.0 * self.sigma + 0.5)
        first = (rows.min(), cols.min()) if len(rows) else (0, 0)    # (min(initial=0) would always be 0)
        lo = np.maximum([first[0] - self.reach, first[1] - self.reach], 0)
        hi = np.minimum([rows.max(initial=0) + self.reach + 1, cols.max(initial=0) + self.reach + 1], shape)
        self.rows, self.cols, self.shape = rows - lo[0], cols - lo[1], tuple(int(v) for v in hi - lo)
        import cv2
        self._kernel = cv2.getGaussianKernel(2 * self.reach + 1, self.sigma, cv2.CV_32F)
        self._weight = self.smoothed(np.ones((len(rows), 1), np.float32), normalise=False)[:, 0]  # tissue share

    def smoothed(self, values, normalise=True):
        """(n_sp, g) values smoothed over the tissue only (normalised convolution). Genes are the
        channels of one OpenCV separable filter (zero outside the grid, scipy's gaussian_filter
        to 2e-7 and 5-9 x faster: it was half of the blend)."""
        import cv2
        grid = np.zeros(self.shape + (values.shape[1],), np.float32)
        grid[self.rows, self.cols] = values
        out = cv2.sepFilter2D(grid, -1, self._kernel, self._kernel, borderType=cv2.BORDER_CONSTANT)
        out = out.reshape(self.shape + (values.shape[1],))[self.rows, self.cols]   # one gene: cv2 drops the axis
        return out / self._weight[:, None] if normalise else out

    def blend(self, sr, a, kernel, per_sp):
        """blend_maps with detail: the passes (disjoint genes) run on `threads` threads (default: the
        CPUs available), as OpenCV and numpy release the GIL: the same values, her2st C2's blend 3.9 ->
        1.9-2.4 s on 2 cores."""
        def one_pass(g0):
            g = slice(g0, g0 + self.step)
            m = np.asarray(sr[:, g], np.float32)
            ratio = np.clip(m / np.maximum(self.smoothed(m), 1e-12), 0.0, self.MAX_RATIO)
            interp = np.asarray(kernel @ per_sp[:, g], dtype=np.float32)
            sr[:, g] = a[g] * m + (1.0 - a[g]) * interp * ratio
        thread_map(one_pass, range(0, sr.shape[1], self.step), threads=self.threads)
        return sr


def leave_one_out_factors(measured, predicted, xy, sigma_px):
    """(n_spots, G) local consistency factors at each spot from the other spots only: the
    kernel-smoothed log ratio of measured to predicted counts, the spot's own weight removed."""
    W, _ = leave_one_out_kernel(xy, sigma_px)
    return local_rescale_factors(measured, predicted, W)


def consistent_oof(oof, measured, predicted, xy, sigma_px, mode):
    """The out-of-fold spot counts (n_spots, G) after the spot consistency the maps get, computed
    without each spot's own measurement: 'local' multiplies by the kernel-smoothed ratio of the
    OTHER spots (leave-one-out kernel of width sigma_px), then one factor per gene restores the
    measured totals, as apply_spot_consistency does; 'global' the one factor per gene; 'none' as is.
    predicted: the maps' spot sums before consistency."""
    if mode == "local":
        oof = oof * leave_one_out_factors(measured, predicted, xy, sigma_px)
    if mode in ("local", "global"):
        oof = oof * global_rescale_factors(measured, oof)
    return oof


def choose_consistency_sigma(measured, oof, predicted, xy, spacing_px, default, choices=SIGMA_CHOICES,
                             margin=0.005):
    """(sigma in lattice spacings, record): the local consistency's Gaussian width whose
    leave-one-out correction oof_i * smoothed ratio over the other spots j (measured_j / predicted_j,
    predicted: the maps' spot sums before consistency) gives the best median Pearson r (log1p, most
    variable genes) against the measured counts; the default width unless another is better by more
    than margin (differences below it are noise). measured, oof, predicted: (n_spots, G) counts."""
    scores = {}
    for s in sorted({*choices, default}):
        scores[float(s)] = median_pearson(measured, consistent_oof(oof, measured, predicted, xy, s * spacing_px, "local"))
    best = max(scores, key=scores.get)
    best = best if scores[best] > scores[float(default)] + margin else float(default)
    return best, {"sigma_spacings": best, "chosen_by": "out-of-fold spots, leave-one-out correction",
                  "median_pearson_by_sigma": scores}
