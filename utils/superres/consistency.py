"""Image-free pieces shared by the models: Gaussian-kernel weights from spots to super-pixels, the
interpolation baseline, and spot consistency (mapping predictions back to counts so that a spot's
super-pixels sum to about its measured count)."""
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree


def kernel_weights(points_xy, spots_xy, sigma_px, cutoff=3.0, k=32):
    """Row-normalised sparse Gaussian weights (n_points x n_spots) over the k nearest spots within
    cutoff*sigma; a point with none that close takes its nearest spot."""
    points_xy = np.asarray(points_xy, dtype=np.float64)
    spots_xy = np.asarray(spots_xy, dtype=np.float64)
    k = int(min(k, len(spots_xy)))
    d, idx = cKDTree(spots_xy).query(points_xy, k=k)
    d, idx = d.reshape(len(points_xy), k), idx.reshape(len(points_xy), k)
    w = np.where(d <= cutoff * sigma_px, np.exp(-0.5 * (d / sigma_px) ** 2), 0.0)
    none = w.sum(1) <= 0
    w[none, 0] = 1.0
    w /= w.sum(1, keepdims=True)
    rows = np.repeat(np.arange(len(points_xy)), k)
    return sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(len(points_xy), len(spots_xy)))


def spot_sums(values, spot_index, sp_index, n_spots):
    """Sum of per-super-pixel values (n_sp x G) over each spot's footprint.

    spot_index/sp_index: flat pairs (spot i, super-pixel j) of the footprints, j indexing `values`."""
    M = sp.csr_matrix((np.ones(len(spot_index)), (spot_index, sp_index)), shape=(n_spots, values.shape[0]))
    return np.asarray(M @ values, dtype=np.float64)


def local_rescale_factors(measured, predicted, W, eps=1.0, clip=(0.1, 10.0)):
    """Per super-pixel, per gene multiplicative correction: the kernel-smoothed (in log space) ratio
    of measured to predicted spot counts. W: kernel weights (n_sp x n_spots)."""
    log_r = np.log((measured + eps) / (predicted + eps)).astype(np.float32)
    f = np.asarray(W @ log_r, dtype=np.float32)
    np.exp(f, out=f)
    return np.clip(f, *clip, out=f)


def global_rescale_factors(measured, predicted, eps=1e-8):
    """iStar's mapping: one factor per gene so that predicted and measured totals over spots agree."""
    return (measured.sum(0) / np.maximum(predicted.sum(0), eps)).astype(np.float32)
