"""Image-free pieces shared by the models: Gaussian-kernel weights from spots to super-pixels, the
interpolation baseline, and spot consistency (mapping predictions back to counts so that a spot's
super-pixels sum to about its measured count)."""
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..core import geometry as geo
from ..core.chunks import row_chunks


def kernel_weights(points_xy, spots_xy, sigma_px, cutoff=3.0, k=32):
    """Row-normalised sparse Gaussian weights (n_points x n_spots) over the k nearest spots within
    cutoff*sigma; a point with none that close takes its nearest spot. The tree search stops at the
    cutoff (the default width reaches ~8 spots: the 32 neighbours it fetched were mostly stored
    zeros), by row chunks whose (chunk, k) temporaries reuse heap pages (core.chunks): the large
    demo's 445k super-pixels 2.9-4.4 -> 0.45 s, and kernel_product can stay sparse."""
    points_xy = np.asarray(points_xy, dtype=np.float64)
    tree = cKDTree(np.asarray(spots_xy, dtype=np.float64))
    k = int(min(k, tree.n))
    parts = [_kernel_rows(tree, points_xy[s], sigma_px, cutoff * sigma_px, k, s.start)
             for s in row_chunks(len(points_xy), k, itemsize=8)]
    rows, cols, w = (np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(3))
    return sp.csr_matrix((w, (rows, cols)), shape=(len(points_xy), tree.n))


def _kernel_rows(tree, points_xy, sigma_px, reach, k, first_row):
    """kernel_weights of the points first_row, ...: (row, spot, weight) of the stored entries."""
    # the search bound is strict: a hair above reach keeps the spots at exactly reach
    d, idx = tree.query(points_xy, k=k, distance_upper_bound=np.nextafter(reach, np.inf))
    d, idx = d.reshape(len(points_xy), k), idx.reshape(len(points_xy), k)
    near = d <= reach
    w = np.where(near, np.exp(-0.5 * (np.where(near, d, 0.0) / sigma_px) ** 2), 0.0)
    none = ~near[:, 0]
    if none.any():  # no spot within reach: the nearest one
        w[none, 0], idx[none, 0], near[none, 0] = 1.0, tree.query(points_xy[none], k=1)[1], True
    w /= w.sum(1, keepdims=True)
    row, slot = np.nonzero(near)
    return row + first_row, idx[row, slot], w[row, slot]


def spot_sums(values, footprints):
    """Sum of per-super-pixel values (n_sp x G) over each spot's footprint (geometry.footprint_matrix)."""
    # only the super-pixels under a footprint: `footprints @ values` made a float64 copy of all of
    # values (117k x 1000 on her2st C2, 1.5 s per call); and by row chunks, whose float64 copies reuse
    # heap pages (whole, the large demo's 131k x 300 took 1.2 s per call, mostly fresh pages). Sums of
    # at most a few hundred float32 terms within 2^20 of each other are exact in float64, so the order
    # does not matter (the same super-res.h5ad, bit for bit, on her2st C2 and the large demo)
    used = np.unique(footprints.indices)
    out = np.zeros((footprints.shape[0], values.shape[1]), np.float64)
    for s in row_chunks(len(used), values.shape[1], itemsize=8):
        out += footprints[:, used[s]] @ np.asarray(values[used[s]], dtype=np.float64)
    return out


def kernel_product(kernel, values):
    """(rows, k) float32: kernel (rows x spots, sparse or dense) @ values (spots, k), summed in float64.
    Pass row chunks (interpolation_chunks), never a whole slide's kernel. Since kernel_weights
    stores no zeros, scipy's sparse product beats making the chunk's rows dense over the spots they
    reach (that was 2.3 x faster before; now its 33 MB blocks, fresh pages each, ran 0.23-3.8 s per
    interpolation against 0.25-0.36 s on her2st C2 and the large demo), with the same float32 values."""
    return (kernel @ np.asarray(values, np.float64)).astype(np.float32)


def local_rescale_factors(measured, predicted, W, eps=1.0, clip=(0.1, 10.0)):
    """Per super-pixel, per gene multiplicative correction: the kernel-smoothed (in log space) ratio
    of measured to predicted spot counts. W: kernel weights (n_sp x n_spots; sparse)."""
    log_r = np.log((measured + eps) / (predicted + eps)).astype(np.float32)
    f = kernel_product(W, log_r)
    np.exp(f, out=f)
    return np.clip(f, *clip, out=f)


def global_rescale_factors(measured, predicted, eps=1e-8):
    """iStar's mapping: one factor per gene so that predicted and measured totals over spots agree."""
    return (measured.sum(0) / np.maximum(predicted.sum(0), eps)).astype(np.float32)


def tissue_index(mask):
    """(rows, cols) of the tissue super-pixels, row-major: the order of super-res.h5ad's rows."""
    rows, cols = np.nonzero(mask)
    return rows.astype(np.int64), cols.astype(np.int64)


def tissue_footprints(xy, radius, mask):
    """(footprint matrix spots x tissue super-pixels, footprint sizes over the whole grid)."""
    rows, cols = tissue_index(mask)
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(len(rows))
    full = geo.footprint_matrix(xy, radius, np.arange(mask.size).reshape(mask.shape), mask.size)
    return geo.footprint_matrix(xy, radius, index, len(rows), dtype=np.float64), np.diff(full.indptr)


def superpixel_kernel(rows, cols, xy, sigma_px):
    """kernel_weights from the spots at xy to the centres of super-pixels (rows, cols)."""
    return kernel_weights(np.stack(geo.superpixel_centres(rows, cols), 1), xy, sigma_px)


def apply_spot_consistency(sr, mode, counts, footprints, kernel, predicted=None):
    """Rescale sr (n_superpixels, G) in place: 'global' one factor per gene (iStar), 'local' the
    kernel-smoothed ratio per super-pixel (kernel(): the weights, built only when needed), then one
    factor per gene for the totals, 'none'.
    footprints: the footprint matrix; predicted: sr's spot sums (computed when None). Returns the
    predicted spot sums afterwards."""
    if predicted is None:
        predicted = spot_sums(sr, footprints)
    if mode == "local":
        W = kernel()
        for s in row_chunks(*sr.shape):  # chunks bound the dense (chunk x genes) factors
            sr[s] *= local_rescale_factors(counts, predicted, W[s])
        # a wide kernel averages log ratios (a geometric mean), which biases totals low: one factor
        # per gene restores them (it changes no gene's pattern, so no Pearson r)
        predicted = spot_sums(sr, footprints)
    if mode in ("local", "global"):
        g = global_rescale_factors(counts, predicted)
        sr *= g
        predicted = predicted * g  # spot sums are linear: no second pass over the maps
    return predicted


def interpolation_chunks(kernel, per_sp, chunk=None):
    """(rows slice, float32 interpolated values) by row chunks (core.chunks.row_chunks; `chunk` rows)
    of the super-pixel x spot kernel (row-normalised weights) times per_sp (n_spots, G), so the
    interpolated map is never whole."""
    for s in row_chunks(kernel.shape[0], per_sp.shape[1], chunk):
        yield s, kernel_product(kernel[s], per_sp)
