"""What the networks see: windows of super-pixel features around a point, the spot footprints
inside those windows, and the gene tokens of the nearest HR pseudo-spots. Vectorised gathering, so
no Python loop runs per super-pixel."""
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..core import geometry as geo
from ..core import layout as L
from ..core.chunks import row_chunks
from ..core.layout import FEATURE_SCALES
from ..spots.genes import scale_counts


def load_feature_maps(directory, scales=FEATURE_SCALES + ("extra",)):
    """Memory-mapped float16 feature maps, each (rows, cols, channels), checked against he.tif's grid
    and for values that are not finite."""
    maps = L.load_features(directory, L.load_calibration(directory), tuple(scales))[0]
    for scale, m in maps.items():
        _check_finite(directory, scale, m)
    return maps


def _check_finite(directory, scale, m):
    """A NaN or infinity in a feature map (a damaged or hand-edited file) would make training diverge,
    or the maps NaN where only inference reads it: refused before anything is trained or written, in
    16 MB row chunks (0.2 s for her2st's or the large demo's four maps), through a mapping of its own
    that is closed afterwards (through the run's, its pages stayed resident: +122 MB on the large demo)."""
    own = np.load(m.filename, mmap_mode="r") if getattr(m, "filename", None) else m
    flat = own.reshape(-1, own.shape[-1])
    for s in row_chunks(*flat.shape, itemsize=flat.itemsize):
        bad = ~np.isfinite(flat[s]).all(1)
        if bad.any():
            r, c = divmod(s.start + int(np.argmax(bad)), m.shape[1])
            raise L.FEATURE_MAPS[scale].damaged(directory, f"holds NaN or infinite values (first at super-pixel "
                                                           f"row {r}, column {c})")


def window_half(radius_px):
    """Half-width (super-pixels) of a window that holds the footprint of a spot anywhere in its
    central super-pixel."""
    return max(3, int(np.floor((radius_px + geo.SUPER_PIXEL_PX / 2) / geo.SUPER_PIXEL_PX)))


def window_grid(half):
    d = np.arange(-half, half + 1)
    dr, dc = np.meshgrid(d, d, indexing="ij")
    return dr.ravel(), dc.ravel()


def gather_windows(maps, rows, cols, half, dtype=np.float32, scaling=None):
    """Features of the (2 half + 1)^2 window around each (row, col): dict scale -> (n, T, C),
    plus a (n, T) bool array of tokens inside the grid (outside ones are zero). scaling: optional
    feature_scaling() statistics, applied to the tokens inside the grid."""
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
        if scaling is not None:
            mean, std = scaling[k]
            vals = (vals - mean) / std
        x = vals[inv].reshape(flat.shape + (m.shape[-1],))
        x[~valid] = 0
        out[k] = x
    return out, valid


def feature_scaling(hist, fp):
    """Per scale, each channel's (mean, standard deviation) over the spots' footprint super-pixels
    (hist: gather_windows of the spot windows; fp (n, T) bool), float32 (C,) arrays; a constant
    channel keeps std 1. (x - mean) / std puts channels of very different spread (the stain
    features' sd ranges 0.01-1) on one scale (--standardize-features)."""
    out = {}
    for k, x in hist.items():
        inside = np.asarray(x, np.float64)[np.asarray(fp, bool)]
        std = inside.std(0)
        out[k] = (inside.mean(0).astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32))
    return out


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


def batch_inputs(data, idx, use_tokens, masked, device):
    """The forward() inputs of windows idx: (hist, genes, offs, gmask); the gene tokens are those
    without the window's own HR spots where `masked` (training), else all of them."""
    hist = {k: torch.from_numpy(v[idx]).to(device) for k, v in data["hist"].items()}
    if not use_tokens:
        return hist, None, None, None
    tok_idx = np.where(masked[:, None], data["tok_lso"][idx], data["tok_full"][idx])
    offs = np.where(masked[:, None, None], data["offs_lso"][idx], data["offs_full"][idx])
    hidden = np.where(masked[:, None], data["hid_lso"][idx], data["hid_full"][idx])
    genes = torch.from_numpy(data["hr_expr"][tok_idx]).to(device)
    return hist, genes, torch.from_numpy(offs).to(device), torch.from_numpy(hidden).to(device)


def spot_arrays(spots):
    """From spots.h5ad: counts, centres (x, y), the genes' min-max scaling bounds and the scaled
    training target."""
    counts = np.asarray(spots.X, dtype=np.float32)
    lo = spots.var["scale_min"].to_numpy(np.float32)
    hi = spots.var["scale_max"].to_numpy(np.float32)
    return counts, spots.obs[["x", "y"]].to_numpy(np.float64), lo, hi, scale_counts(counts, lo, hi)


@dataclass
class TrainingData:
    """Everything the networks train on and predict from.

    cfg: the model configuration (HistexConfig.model_config); data: arrays per spot (hist scale ->
    (n, T, C), fp (n, T), target (n, G), gene tokens with and without the spot's own HR spots);
    maps: the feature maps; tokens: GeneTokens; fingerprint: hashes of the target and features;
    scaling: feature_scaling() statistics applied to every window (hist here, and inference's
    gather_windows), None unless --standardize-features."""
    cfg: dict
    data: dict
    maps: dict
    tokens: "GeneTokens"
    fingerprint: dict
    scaling: dict = None


def training_data(directory, config, spots, hr, grid_shape, *, base=None) -> TrainingData:
    """The feature windows around each spot, its footprint in the window, its scaled target and its
    gene tokens (with and without its own HR spots). base: optional (spots, G) scaled prediction the
    network corrects (--residual: the leave-one-out interpolation); the target is then target - base."""
    _, xy, lo, hi, target = spot_arrays(spots)
    if base is not None:
        target = (target - base).astype(np.float32)
    radius, lattice = float(spots.uns["radius_px"]), spots.uns["lattice"]
    scales = config.scales + ["extra"]
    maps = load_feature_maps(directory, scales)
    wr, wc, half, fp = spot_windows(xy, radius, grid_shape)
    cfg = config.model_config({k: int(m.shape[-1]) for k, m in maps.items()}, target.shape[1], half)
    hist, _ = gather_windows(maps, wr, wc, half)
    scaling = feature_scaling(hist, fp) if cfg.get("standardize_features") else None
    if scaling is not None:
        hist, _ = gather_windows(maps, wr, wc, half, scaling=scaling)
    hr_scaled = np.clip(scale_counts(np.asarray(hr.X, dtype=np.float32), lo, hi), 0, None)
    tokens = GeneTokens(hr.obs[["x", "y"]].to_numpy(), hr_scaled, hr.obsm["sources"], lattice["spacing_px"],
                        config.k_tokens)
    centres = np.stack(geo.superpixel_centres(wr, wc), 1)
    tf, of, hf = tokens.query(centres)
    tl, ol, hl = tokens.query(centres, exclude_spot=np.arange(len(xy)))
    data = {"hist": hist, "fp": fp.astype(np.float32), "target": target, "hr_expr": tokens.expr,
            "tok_full": tf, "offs_full": of, "hid_full": hf, "tok_lso": tl, "offs_lso": ol, "hid_lso": hl}
    fingerprint = {"spots": hashlib.sha256(target.tobytes()).hexdigest()[:16],
                   "features": hashlib.sha256(b"".join(np.ascontiguousarray(v[:64]).tobytes()
                                                       for v in hist.values())).hexdigest()[:16]}
    return TrainingData(cfg, data, maps, tokens, fingerprint, scaling)
