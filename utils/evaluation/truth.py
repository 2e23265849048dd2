"""8 um super-pixel truth and the pseudo-Visium spots summed from it, shared by the simulator (utils/simulate.py)
and the 10x converters (utils/convert/truth_layout.py):

- make_spots: the hexagonal pseudo-Visium lattice (55 um spots, 100 um apart, array_col stepping by 2 with odd
  rows shifted, as on Visium), placed by the seed;
- pseudo_visium_spots: the spots of that lattice whose centre super-pixel holds truth, with counts = the sum of
  the truth over utils.geometry.footprint of each spot;
- write_truth_h5ad: truth/super.h5ad (one observation per super-pixel) and truth/mask.png;
- read_truth: a truth checked for what scoring needs (utils/evaluation/score.py).
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.errors import InputError
from ..core.geometry import (
    SUPER_PIXEL_PX,
    SUPER_PIXEL_UM,
    TARGET_PIXEL_SIZE_UM,
    calibration_scale,
    footprint_matrix,
    superpixel_grid_shape,
)

SPOT_DIAMETER_UM = 55.0
SPOT_SPACING_UM = 100.0
LATTICE_STREAM = 7      # random stream of the lattice offset: np.random.default_rng([seed, 7])


def make_spots(extent, seed):
    """Hexagonal pseudo-Visium lattice over an extent x extent um field (spots wholly inside it):
    (array_col, array_row, x_um, y_um); array_col steps by 2 with odd rows shifted, as on Visium."""
    rng = np.random.default_rng([int(seed), LATTICE_STREAM])
    dy = SPOT_SPACING_UM * math.sqrt(3) / 2
    ox, oy = rng.uniform(0, SPOT_SPACING_UM), rng.uniform(0, dy)
    rows = np.arange(int((extent - oy) // dy) + 1)
    cols = np.arange(-1, int(extent // SPOT_SPACING_UM) + 1)
    J, I = np.meshgrid(rows, cols, indexing="ij")
    x = ox + I * SPOT_SPACING_UM + (J % 2) * SPOT_SPACING_UM / 2
    y = oy + J * dy
    array_col = 2 * (I + 1) + (J % 2)
    r = SPOT_DIAMETER_UM / 2          # whole spots only, as on a real capture area
    keep = (x >= r) & (x <= extent - r) & (y >= r) & (y <= extent - r)
    return array_col[keep], J[keep], x[keep], y[keep]


def pseudo_visium_spots(truth, rows, cols, grid_shape, image_hw, pixel_size, seed, radius_calibrated_px=None):
    """Pseudo-Visium spots summed from the 8 um truth.

    truth: super-pixels x genes (dense array or sparse), row k at super-pixel (rows[k], cols[k]) of the
    grid_shape grid. The lattice is make_spots over the longer image side, restricted to spots wholly inside the
    image_hw (raw px) image; a spot is kept when the super-pixel under its centre holds truth and its summed
    counts are not all zero. Spot centres are in raw px, rounded to 4 decimals as locs-raw.tsv holds them.
    radius_calibrated_px: the footprint radius in calibrated px; by default the one the pipeline derives from
    radius-raw.txt (radius_raw times the calibration scale).

    Returns dict(ids, x, y, counts, array_col, array_row, radius_raw): counts are CSR (the product's dtype) for
    sparse truth, an int64 array (rounded) for dense truth; radius_raw is exactly what radius-raw.txt holds."""
    H, W = image_hw
    px = float(pixel_size)
    R, C = grid_shape
    acol, arow, sx, sy = make_spots(max(H, W) * px, seed)
    r_um = SPOT_DIAMETER_UM / 2
    inside = (sx >= r_um) & (sx <= W * px - r_um) & (sy >= r_um) & (sy <= H * px - r_um)
    acol, arow, sx, sy = acol[inside], arow[inside], sx[inside], sy[inside]
    x_raw = np.round(sx / px, 4)
    y_raw = np.round(sy / px, 4)
    radius_raw = float(f"{r_um / px:.6f}")
    scale = calibration_scale(px)
    if radius_calibrated_px is None:
        radius_calibrated_px = radius_raw * scale
    index = np.full((R, C), -1, np.int64)
    index[rows, cols] = np.arange(len(rows))
    cr = np.floor(y_raw * scale / SUPER_PIXEL_PX).astype(np.int64)
    cc = np.floor(x_raw * scale / SUPER_PIXEL_PX).astype(np.int64)
    ok = (cr < R) & (cc < C)
    keep = np.zeros(len(x_raw), bool)
    keep[ok] = index[cr[ok], cc[ok]] >= 0
    kept = np.flatnonzero(keep)
    # ones in the truth's dtype (float32 for the simulator's dense truth, int64 for sparse)
    Sm = footprint_matrix(np.c_[x_raw[kept], y_raw[kept]] * scale, radius_calibrated_px, index, truth.shape[0],
                          dtype=truth.dtype)
    if sparse.issparse(truth):
        counts = (Sm @ truth).tocsr()
    else:
        counts = np.rint(np.asarray(Sm @ truth, dtype=np.float64)).astype(np.int64)
    nonzero = np.asarray(counts.sum(1)).ravel() > 0
    kept, counts = kept[nonzero], counts[nonzero]
    return {"ids": [f"{int(acol[i])}x{int(arow[i])}" for i in kept], "x": x_raw[kept], "y": y_raw[kept],
            "counts": counts, "array_col": acol[kept].astype(int).tolist(),
            "array_row": arow[kept].astype(int).tolist(), "radius_raw": radius_raw}


def write_truth_h5ad(out, directory, X, rows, cols, genes, pixel_size, image_hw, uns, obs=None, var=None):
    """DIR/truth/super.h5ad and DIR/truth/mask.png through StagedOutputs `out`.

    super.h5ad: one observation per super-pixel (rows[k], cols[k]) named sp<row>_<col>, obs row, col, x, y (its
    centre in raw px) then the columns of `obs` (name -> values), var = genes with the columns of `var`, X written
    as given; uns raw_pixel_size_um, super_pixel_um, calibrated_pixel_size_um, grid_shape, image_shape, then the
    entries of `uns` in their order. mask.png: 255 at the super-pixels holding truth, 0 elsewhere.
    Returns the super-pixel grid shape."""
    import anndata

    from ..core.image_io import write_png
    grid_shape = superpixel_grid_shape(image_hw, pixel_size)
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    obs_df = pd.DataFrame({"row": rows, "col": cols,
                           "x": (cols + 0.5) * SUPER_PIXEL_UM / pixel_size,
                           "y": (rows + 0.5) * SUPER_PIXEL_UM / pixel_size},
                          index=pd.Index([f"sp{r}_{c}" for r, c in zip(rows.tolist(), cols.tolist())]))
    for k, v in (obs or {}).items():
        obs_df[k] = v
    var_df = pd.DataFrame(index=pd.Index([str(g) for g in genes]))
    for k, v in (var or {}).items():
        var_df[k] = v
    ad = anndata.AnnData(X=X, obs=obs_df, var=var_df)
    ad.uns["raw_pixel_size_um"] = float(pixel_size)
    ad.uns["super_pixel_um"] = float(SUPER_PIXEL_UM)
    ad.uns["calibrated_pixel_size_um"] = float(TARGET_PIXEL_SIZE_UM)
    ad.uns["grid_shape"] = np.array(grid_shape, dtype=np.int64)
    ad.uns["image_shape"] = np.array([image_hw[0], image_hw[1], 3], dtype=np.int64)
    for k, v in uns.items():
        ad.uns[k] = v
    tdir = Path(directory) / "truth"
    ad.write_h5ad(out.path(tdir / "super.h5ad"))
    mask = np.zeros(grid_shape, np.uint8)
    mask[rows, cols] = 255
    write_png(out.path(tdir / "mask.png"), mask)
    return grid_shape


# a truth's observations may fill as little as 1 / SPREAD_MAX of the raster the scoring draws them on (a
# section in a corner of its grid) before a row/col is taken for damaged: the raster of one 1e9 row was 1.4 TiB
SPREAD_MAX, RASTER_FREE = 100, 2 ** 24


def read_truth(path, fix: str):
    """The AnnData at path as a truth to score against: observations, an X of finite values, obs
    row/col of whole super-pixels (core.h5ad_io.check_grid_positions) close enough together to be
    drawn, one observation per super-pixel, unique gene names; else InputError naming path (fix: what
    to do about a file that is not such a truth)."""
    from ..core.h5ad_io import check_finite_values, check_grid_positions, read_anndata
    from ..core.raw_io import examples
    ad = read_anndata(path, fix)
    if ad.n_obs == 0 or ad.X is None:
        raise InputError(f"{path}: {'has no observations' if ad.n_obs == 0 else 'has no X (expression matrix)'}; {fix}")
    check_grid_positions(ad, path, fix)
    check_finite_values(ad, path, fix)
    if ad.var_names.duplicated().any():
        dup = ad.var_names[ad.var_names.duplicated()].unique()
        raise InputError(f"{path}: duplicated gene names ({examples(dup)}); make the gene names unique (sum or rename "
                         f"the duplicates)")
    _check_spread(ad.obs["row"].to_numpy(), ad.obs["col"].to_numpy(), path)
    return ad


def _check_spread(rows, cols, path) -> None:
    from .metrics import extent
    h, w = extent(rows, cols)
    if h * w > max(SPREAD_MAX * len(rows), RASTER_FREE):
        raise InputError(f"{path}: its {len(rows)} observations spread over {h} x {w} super-pixels (obs row "
                         f"{rows.min()}-{rows.max()}, col {cols.min()}-{cols.max()}): a damaged row/col, or positions "
                         f"in another unit; give each observation's 8 um super-pixel (row, col) of this section")
