"""Nuclear morphology per 8 um super-pixel from a classical segmentation of the hematoxylin channel
(the `stain-nuclei` backbone's extra micro channels; stain_features.py holds the rest).

Nuclei are the connected components of the lightly smoothed hematoxylin concentration above the
slide's nuclear threshold (after a 3 x 3 opening that removes specks). A component counts as one
nucleus when its bounding box is at most MAX_NUCLEUS_PX (16 um) on each side and its area at least
MIN_NUCLEUS_PX; larger ones are clumps (touching nuclei, dense tumour): their share of the
super-pixel's pixels is a channel of its own. Each nucleus belongs to the super-pixel of its
centroid, which gets the count and the means over its nuclei of area (in 100 um^2), eccentricity (of the second
moments), extent (area / bounding box) and the hematoxylin mean and spread inside the nucleus
(chromatin density and texture); 0 where a super-pixel holds no nucleus.

Band independence: a nucleus is at most 16 px tall and its centroid lies in the band's core, so it
lies, with its one-pixel border, inside the core plus the 24 px halo, away from the 3 px where the
smoothing sees the band's cut; a component that leaves that zone is taller than 16 px whether cut
or not, so it is a clump either way. The channels therefore do not depend on the band split."""
import numpy as np

CHANNELS = ["nucseg_count", "nucseg_area_100um2", "nucseg_eccentricity", "nucseg_extent", "nucseg_h_mean",
            "nucseg_h_sd", "nucseg_clump_frac"]
MAX_NUCLEUS_PX = 16          # at 1 um/px: the largest single nucleus (16 um across)
MIN_NUCLEUS_PX = 8           # smaller components are noise (8 um^2: radius 1.6 um)
SMOOTH_SIGMA_PX = 1.0
AREA_UNIT_PX = 100.0         # areas in 100 um^2 (px^2 at 1 um/px): the networks see no feature scaling, so
                             # every channel is kept near 0..1 like the stain channels


def _components(H, threshold, blur):
    """(labels (h, w) int32, per-component area, height, width, centroid x, y), background excluded."""
    import cv2
    mask = (blur(H, SMOOTH_SIGMA_PX) > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REFLECT_101)
    _, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
    s = stats[1:]
    return (labels, s[:, cv2.CC_STAT_AREA].astype(np.float64), s[:, cv2.CC_STAT_HEIGHT], s[:, cv2.CC_STAT_WIDTH],
            centroids[1:, 0], centroids[1:, 1])


def _shape_and_stain(H, labels, area, cx, cy):
    """Per component: eccentricity of its second moments, hematoxylin mean and standard deviation."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs] - 1
    n = len(area)

    def mean(v):
        return np.bincount(lab, weights=v, minlength=n) / np.maximum(area, 1)
    dx, dy = xs - cx[lab], ys - cy[lab]
    mxx, myy, mxy = mean(dx * dx), mean(dy * dy), mean(dx * dy)
    root = np.sqrt(0.25 * (mxx - myy) ** 2 + mxy ** 2)
    l1, l2 = 0.5 * (mxx + myy) + root, np.maximum(0.5 * (mxx + myy) - root, 0)
    ecc = np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-9), 0, 1))
    h = H[ys, xs].astype(np.float64)
    h_mean = mean(h)
    h_sd = np.sqrt(np.maximum(mean(h * h) - h_mean ** 2, 0))
    return ecc, h_mean, h_sd


def morphology_band(H, threshold, *, spd: int, halo_sp: int, n_rows: int, blur):
    """(n_rows, W / spd, len(CHANNELS)) float32 for the core super-pixel rows of a band.

    H: (h, w) hematoxylin concentration of the band at 1 um/px, `halo_sp` super-pixel rows of halo
    above and below the core; spd: pixels per super-pixel side; blur(img, sigma): the band's Gaussian."""
    labels, area, height, width, cx, cy = _components(H, threshold, blur)
    grid_w = H.shape[1] // spd
    out = np.zeros((n_rows, grid_w, len(CHANNELS)), np.float32)
    single = (height <= MAX_NUCLEUS_PX) & (width <= MAX_NUCLEUS_PX)
    clump_px = np.concatenate([[False], ~single])[labels]
    core = slice(halo_sp * spd, (halo_sp + n_rows) * spd)
    c = clump_px[core, :grid_w * spd].reshape(n_rows, spd, grid_w, spd)
    out[..., 6] = c.mean(axis=(1, 3))
    r = np.floor(cy / spd).astype(np.int64) - halo_sp
    col = np.floor(cx / spd).astype(np.int64)
    keep = single & (area >= MIN_NUCLEUS_PX) & (r >= 0) & (r < n_rows) & (col < grid_w)
    if not keep.any():
        return out
    ecc, h_mean, h_sd = _shape_and_stain(H, labels, area, cx, cy)
    cell = r[keep] * grid_w + col[keep]
    count = np.bincount(cell, minlength=n_rows * grid_w)
    per_nucleus = (area / AREA_UNIT_PX, ecc, area / (height * width), h_mean, h_sd)
    for k, v in enumerate(per_nucleus, start=1):
        total = np.bincount(cell, weights=v[keep], minlength=n_rows * grid_w)
        out[..., k] = (total / np.maximum(count, 1)).reshape(n_rows, grid_w)
    out[..., 0] = count.reshape(n_rows, grid_w)
    return out
