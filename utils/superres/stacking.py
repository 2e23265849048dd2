"""--fusion stack: between the measured spots, a per-gene stacking of three predictions fitted on the
out-of-fold spots; near them, the blend of --fusion blend. Why: the spot consistency makes the
model's map follow the interpolation between spots (both are smoothed spot ratios), so blending the
two adds little there. The image model with only one scale per gene (global consistency, iStar's)
is the complementary predictor: on her2st leave-out, image + interpolation reach 0.786 / 0.721 at the
hidden spots against 0.764 / 0.709 for the consistent map + interpolation. Near a measured spot its
own count is the best evidence (out-of-fold spots cannot show this: under 2 x 2 coarsening the
stacking alone fell from 0.784 to 0.720 on C3), so the two are mixed by proximity: a Gaussian of
the distance to the nearest spot centre, PROXIMITY_RADII spot radii wide.

    c, record = stack_weights(measured, [image_oof, consistent_oof], reference_oof)   # (G, 3)
    between_maps(image, c, consistent, kernel, per_sp)      # image (n_sp, G) <- the stacked map
    (the blend of fusion.py on the consistent map, in place)
    mix_by_proximity(sr, image, proximity(rows, cols, xy, radius_px))   # sr <- the map written
"""
import numpy as np
from scipy.spatial import cKDTree

from ..core import geometry as geo
from ..core.casts import as_float32, cast_into
from ..core.chunks import row_chunks
from .consistency import interpolation_chunks

# width of the near-spot zone in spot radii: her2st seed 0, linear maps, 1.5 / 2.0 / 2.5 / 3.0 radii:
# leave-out C2 0.787 / 0.786 / 0.786 / 0.782, C3 0.717 / 0.720 / 0.721 / 0.719; coarsening C2
# 0.802 / 0.803 / 0.803 / 0.804, C3 0.772 / 0.777 / 0.779 / 0.781 (the blend alone: 0.764, 0.709, 0.804, 0.784)
PROXIMITY_RADII = 2.5
STACK_PARTS = ("image", "consistent", "interpolation")   # the predictors, in the weights' order
RIDGE = 1.0   # each gene's weights shrunk towards the weights pooled over genes, in units of its own evidence


def stack_weights(measured, predictors, reference, ridge=RIDGE):
    """(c (G, k + 1) float32, record): per gene, least-squares weights of the k predictors and of the
    reference (last column; each row sums to 1) that best predict the measured out-of-fold spot
    counts, ridge-shrunk towards the weights pooled over all genes, clipped to [0, 1].
    measured, reference and each predictor: (n_spots, G) counts."""
    arrays = [np.asarray(v, np.float64) for v in (measured, reference, *predictors)]
    ok = np.logical_and.reduce([np.isfinite(v).all(1) for v in arrays])
    y, ref, *preds = (v[ok] for v in arrays)
    X = np.stack([p - ref for p in preds], -1)                      # (n, G, k)
    xtx = np.einsum("ngk,ngl->gkl", X, X)
    xty = np.einsum("ngk,ng->gk", X, y - ref)
    k = X.shape[-1]
    pooled = np.linalg.lstsq(xtx.sum(0), xty.sum(0), rcond=None)[0]
    lam = ridge * np.trace(xtx, axis1=1, axis2=2) / k + 1e-12        # (G,) a gene's own scale of evidence
    c = np.linalg.solve(xtx + lam[:, None, None] * np.eye(k), (xty + lam[:, None] * pooled)[..., None])[..., 0]
    c = np.clip(c, 0.0, 1.0)
    c /= np.maximum(c.sum(1, keepdims=True), 1.0)
    c = np.concatenate([c, np.maximum(1.0 - c.sum(1, keepdims=True), 0.0)], 1).astype(np.float32)
    record = {"kind": "between spots: per-gene stacking of the image model (one scale per gene), the consistent "
                      "map and the interpolation (out-of-fold least squares, ridge to the pooled weights); near "
                      "spots: the blend", "proximity_radii": PROXIMITY_RADII,
              "median_weights": {k: float(np.median(c[:, i])) for i, k in enumerate(STACK_PARTS)},
              "pooled_weights": {k: float(v) for k, v in zip(STACK_PARTS, [*pooled, 1.0 - pooled.sum()])},
              "n_spots": int(ok.sum())}
    return c, record


def stacked_oof(c, predictors, reference):
    """The out-of-fold spot counts (n_spots, G) of the stacked prediction."""
    return sum(c[:, i] * p for i, p in enumerate(predictors)) + c[:, -1] * reference


def between_maps(image, c, consistent, kernel, per_sp, chunk=None):
    """image (n_sp, G) <- c_image * image + c_consistent * consistent + c_interp * interpolation, in place
    by row chunks (kernel: row-normalised super-pixel x spot weights; per_sp: spot counts / footprint)."""
    for s, acc in interpolation_chunks(kernel, per_sp, chunk):
        acc *= c[:, 2]                       # accumulated in the fresh float32 interpolation chunk
        acc += c[:, 0] * as_float32(image[s])
        acc += c[:, 1] * consistent[s]
        cast_into(image[s], acc)
    return image


def proximity(rows, cols, xy, radius_px, radii=PROXIMITY_RADII):
    """(n_sp,) float32 in (0, 1]: exp(-d^2 / 2 (radii * radius)^2), d the distance from each super-pixel's
    centre to the nearest spot centre (xy and radius_px in the same calibrated pixels)."""
    d, _ = cKDTree(xy).query(np.stack(geo.superpixel_centres(rows, cols), 1))
    return np.exp(-0.5 * (d / (radii * radius_px)) ** 2).astype(np.float32)


def mix_by_proximity(sr, between, w, chunk=None):
    """sr (n_sp, G) <- w * sr + (1 - w) * between, in place by row chunks, as between + w (sr - between):
    in-place passes, one temporary chunk instead of four (on her2st C2's memory-mapped 117k x 1,000
    map most of its 1.7 s are the map's pages, not the arithmetic)."""
    for s in row_chunks(*sr.shape, chunk):
        b = as_float32(between[s])
        x = np.asarray(sr[s])            # a view of sr's rows (an ndarray or a memmap)
        x -= b
        x *= w[s, None]
        x += b
    return sr
