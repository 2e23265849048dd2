"""Shared geometry: the 0.5 um/px calibrated frame, the 16 px super-pixel grid, spot footprints.

Coordinates are continuous pixel coordinates: pixel i covers [i, i+1), so x is a column and y a row.
Calibration maps raw -> calibrated by multiplying with one scale factor (origin kept, padding only at
the bottom/right), so super-pixel (row, col) covers y in [16 row, 16 row + 16) calibrated pixels,
i.e. [8 row, 8 row + 8) um from the image origin, whatever the raw pixel size.
"""
import numpy as np

from .resize import scaled_shape

TARGET_PIXEL_SIZE_UM = 0.5
SUPER_PIXEL_PX = 16          # 8 um at 0.5 um/px
TILE_PX = 224                # one ViT tile: 14 x 14 super-pixels
SUPER_PIXEL_UM = SUPER_PIXEL_PX * TARGET_PIXEL_SIZE_UM


def superpixel_centres(rows, cols):
    """Centres (x, y) in calibrated pixels of super-pixels given by integer row/col arrays."""
    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    return (cols + 0.5) * SUPER_PIXEL_PX, (rows + 0.5) * SUPER_PIXEL_PX


def footprint(x, y, radius_px, grid_shape=None):
    """Super-pixels of one spot: those whose centre is within radius_px (calibrated px) of (x, y).

    Returns int arrays (rows, cols); clipped to grid_shape when given."""
    r = float(radius_px)
    r0 = int(np.floor((y - r) / SUPER_PIXEL_PX))
    r1 = int(np.floor((y + r) / SUPER_PIXEL_PX))
    c0 = int(np.floor((x - r) / SUPER_PIXEL_PX))
    c1 = int(np.floor((x + r) / SUPER_PIXEL_PX))
    rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
    cx, cy = superpixel_centres(rr, cc)
    keep = (cx - x) ** 2 + (cy - y) ** 2 <= r * r
    rows, cols = rr[keep], cc[keep]
    if grid_shape is not None:
        inside = (rows >= 0) & (cols >= 0) & (rows < grid_shape[0]) & (cols < grid_shape[1])
        rows, cols = rows[inside], cols[inside]
    return rows.astype(np.int64), cols.astype(np.int64)


def footprints(xs, ys, radius_px, grid_shape=None):
    """Footprints of many spots as flat arrays (spot_index, rows, cols)."""
    idx, rows, cols = [], [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        r, c = footprint(x, y, radius_px, grid_shape)
        idx.append(np.full(len(r), i, dtype=np.int64))
        rows.append(r)
        cols.append(c)
    if not idx:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(idx), np.concatenate(rows), np.concatenate(cols)


def footprint_matrix(xy, radius_px, index, n_points, dtype=np.float32):
    """Sparse (n_spots, n_points) 0/1 matrix: 1 where point index[row, col] lies in spot i's footprint.

    xy: (n_spots, 2) calibrated centres; index: (rows, cols) grid of point numbers, -1 where there is
    none. M @ values sums per-point values over every footprint (the footprint sum of every module)."""
    import scipy.sparse as sparse
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    si, rr, cc = footprints(xy[:, 0], xy[:, 1], radius_px, index.shape)
    j = index[rr, cc]
    on = j >= 0
    return sparse.csr_matrix((np.ones(int(on.sum()), dtype), (si[on], j[on])), shape=(len(xy), int(n_points)))


def calibration_scale(raw_pixel_size_um, target_pixel_size_um=TARGET_PIXEL_SIZE_UM):
    """Factor from raw to calibrated pixel coordinates."""
    return float(raw_pixel_size_um) / float(target_pixel_size_um)


def calibrated_shape(raw_shape, raw_pixel_size_um, target_pixel_size_um=TARGET_PIXEL_SIZE_UM, tile=TILE_PX):
    """(scaled_hw, padded_hw) of the calibrated image: raw size times the scale, rounded, then padded
    with white at the bottom/right to a multiple of the tile size."""
    # OpenCV's size rule, half to even (1,001 px x 0.5 -> 500), which floor(x + 0.5) broke
    h, w = (max(1, n) for n in scaled_shape(raw_shape, calibration_scale(raw_pixel_size_um, target_pixel_size_um)))
    ph = -(-h // tile) * tile
    pw = -(-w // tile) * tile
    return (h, w), (ph, pw)


def superpixel_grid_shape(raw_shape, raw_pixel_size_um, target_pixel_size_um=TARGET_PIXEL_SIZE_UM):
    """(rows, cols) of the super-pixel grid that covers the padded calibrated image."""
    _, (ph, pw) = calibrated_shape(raw_shape, raw_pixel_size_um, target_pixel_size_um)
    return ph // SUPER_PIXEL_PX, pw // SUPER_PIXEL_PX
