"""What the networks see: windows of super-pixel features around a point, the spot footprints
inside those windows, and the gene tokens of the nearest HR pseudo-spots. Vectorised gathering, so
no Python loop runs per super-pixel."""
import json
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from ..core import geometry as geo
from ..core.errors import InputError

FEATURE_FILES = ("micro", "meso", "macro", "extra")


def load_feature_maps(directory, scales=FEATURE_FILES):
    """Memory-mapped float16 feature maps, each (rows, cols, channels), checked against he.tif's grid."""
    from ..stages.histology_extractor import load_features
    maps, meta = load_features(directory, tuple(scales))
    calib = json.loads((Path(directory) / "calibration.json").read_text())
    if tuple(calib["superpixel_grid"]) != tuple(meta["grid_shape"]):
        raise InputError(f"{Path(directory) / 'features'}: features were made for another image size than he.tif "
                         f"(grid {tuple(meta['grid_shape'])}, he.tif {tuple(calib['superpixel_grid'])}); "
                         f"rerun `python Histology_Extractor.py --directory {directory}`")
    return maps


def window_half(radius_px):
    """Half-width (super-pixels) of a window that holds the footprint of a spot anywhere in its
    central super-pixel."""
    return max(3, int(np.floor((radius_px + geo.SUPER_PIXEL_PX / 2) / geo.SUPER_PIXEL_PX)))


def window_grid(half):
    d = np.arange(-half, half + 1)
    dr, dc = np.meshgrid(d, d, indexing="ij")
    return dr.ravel(), dc.ravel()


def gather_windows(maps, rows, cols, half, dtype=np.float32):
    """Features of the (2 half + 1)^2 window around each (row, col): dict scale -> (n, T, C),
    plus a (n, T) bool array of tokens inside the grid (outside ones are zero)."""
    dr, dc = window_grid(half)
    R, C = next(iter(maps.values())).shape[:2]
    rr = np.asarray(rows)[:, None] + dr[None]
    cc = np.asarray(cols)[:, None] + dc[None]
    valid = (rr >= 0) & (cc >= 0) & (rr < R) & (cc < C)
    rr_c, cc_c = np.clip(rr, 0, R - 1), np.clip(cc, 0, C - 1)
    # gather rows in sorted order from the memmaps (fast page access), then reorder
    flat = rr_c * C + cc_c
    uniq, inv = np.unique(flat.ravel(), return_inverse=True)
    out = {}
    for k, m in maps.items():
        vals = np.asarray(m.reshape(R * C, -1)[uniq], dtype=dtype)
        x = vals[inv].reshape(flat.shape + (m.shape[-1],))
        x[~valid] = 0
        out[k] = x
    return out, valid


def spot_windows(xy, radius_px, grid_shape):
    """Window centres (the super-pixel under each spot centre), half-width, and the footprint of each
    spot as a (n, T) bool mask over its window (super-pixels whose centre lies within the radius)."""
    xy = np.asarray(xy, dtype=np.float64)
    half = window_half(radius_px)
    rows = np.floor(xy[:, 1] / geo.SUPER_PIXEL_PX).astype(np.int64)
    cols = np.floor(xy[:, 0] / geo.SUPER_PIXEL_PX).astype(np.int64)
    dr, dc = window_grid(half)
    cx, cy = geo.superpixel_centres(rows[:, None] + dr[None], cols[:, None] + dc[None])
    fp = (cx - xy[:, :1]) ** 2 + (cy - xy[:, 1:2]) ** 2 <= radius_px ** 2
    R, C = grid_shape
    rr, cc = rows[:, None] + dr[None], cols[:, None] + dc[None]
    fp &= (rr >= 0) & (cc >= 0) & (rr < R) & (cc < C)
    return rows, cols, half, fp


class GeneTokens:
    """The k nearest HR pseudo-spots to a window centre, with their offsets in lattice spacings.

    exclude_spot: for training, the HR spots made from that measured spot (itself and the
    midpoints it takes part in) can be hidden, so that the network cannot just copy its target."""

    def __init__(self, hr_xy, hr_scaled, hr_sources, spacing_px, k=5):
        self.xy = np.asarray(hr_xy, dtype=np.float64)
        self.expr = np.asarray(hr_scaled, dtype=np.float32)
        self.sources = np.asarray(hr_sources)
        self.spacing = float(spacing_px)
        self.k = int(min(k, len(self.xy)))
        self.tree = cKDTree(self.xy)

    def query(self, centres_xy, exclude_spot=None):
        """(index (n, k), offsets (n, k, 2), hidden (n, k) bool)."""
        centres_xy = np.asarray(centres_xy, dtype=np.float64)
        n = len(centres_xy)
        if exclude_spot is None:
            _, idx = self.tree.query(centres_xy, k=self.k)
            idx = idx.reshape(n, self.k)
            hidden = np.zeros((n, self.k), dtype=bool)
        else:
            extra = min(len(self.xy), self.k + 8)  # at most 1 + 6 (hex) / 8 (square) HR spots share a source
            _, cand = self.tree.query(centres_xy, k=extra)
            cand = cand.reshape(n, extra)
            own = (self.sources[cand] == np.asarray(exclude_spot)[:, None, None]).any(-1)
            order = np.argsort(own, axis=1, kind="stable")  # non-own first, by distance
            idx = np.take_along_axis(cand, order, 1)[:, :self.k]
            hidden = np.take_along_axis(own, order, 1)[:, :self.k]
        offs = (self.xy[idx] - centres_xy[:, None, :]) / self.spacing
        return idx, offs.astype(np.float32), hidden
