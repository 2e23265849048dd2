"""Stage 2 logic (get_HR.py): spot counts matched to locations, gene selection with the training
target's scaling, the spot lattice, and the HR pseudo-spots at half spacing."""
import logging
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from ..core import layout as L
from ..core.errors import InputError
from ..core.raw_io import COUNTS_NAMES, find_one, match_spots, read_counts, read_locs
from ..core.stage import Stage
from ..spots.genes import minmax_scaling, select_genes
from ..spots.lattice import describe_lattice, hr_pseudo_spots, interpolate_counts

log = logging.getLogger("trihrge")

STAGE = "get_HR"


def _obs(ids, xy, scale, extra=None):
    obs = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "x_raw": xy[:, 0] / scale, "y_raw": xy[:, 1] / scale},
                       index=pd.Index(ids, name="spot"))
    for k, v in (extra or {}).items():
        obs[k] = v
    return obs


def _plot(path, he, spots_xy, hr_xy, measured, calib):
    """Measured spots and HR pseudo-spots over the super-pixel preview of the H&E."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sp = calib["superpixel_px"]
    fig, ax = plt.subplots(figsize=(8, 8 * he.shape[0] / he.shape[1]), dpi=110)
    ax.imshow(he)
    ax.scatter(hr_xy[~measured, 0] / sp - 0.5, hr_xy[~measured, 1] / sp - 0.5, s=3, c="tab:orange", label="HR pseudo-spot")
    ax.scatter(spots_xy[:, 0] / sp - 0.5, spots_xy[:, 1] / sp - 0.5, s=8, c="tab:blue", label="measured spot")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_hr(directory, *, n_genes=None, gene_list=None, force=False):
    """Run stage 2 on DIR; returns (spots, hr_spots, lattice)."""
    directory = Path(directory)
    with Stage(STAGE, directory, force=force) as st:
        return _build_hr(st, directory, n_genes, gene_list)


def _kept_spots(ids, X, locs_raw, calib, counts_path, locs_path):
    """Drop spots outside the image or without counts (logged); the rows to keep."""
    H, W = calib["raw_shape"]
    inside = ((locs_raw["x"] >= 0) & (locs_raw["y"] >= 0) & (locs_raw["x"] < W) & (locs_raw["y"] < H)).to_numpy()
    if not inside.any():
        raise InputError(f"{locs_path}: all spots lie outside the {W} x {H} px image; give x (column) and y (row) "
                         f"in pixels of {calib['raw_image']}")
    if not inside.all():
        log.warning("dropping %d of %d spots that lie outside the image (%s)", (~inside).sum(), len(inside),
                    ", ".join(ids[~inside][:3]))
    empty = X.sum(axis=1) == 0
    if (empty & inside).any():
        log.warning("dropping %d spots with no counts at all (%s)", (empty & inside).sum(), ", ".join(ids[empty & inside][:3]))
    keep = inside & ~empty
    if keep.sum() < 3:
        raise InputError(f"{counts_path}: only {keep.sum()} spot(s) inside the image with counts; at least 3 are needed")
    return keep


def _anndatas(ids, xy, sel, totals, var_df, calib, lattice, hr_xy, sources, hr_counts):
    """spots.h5ad (measured spots, selected genes) and hr-spots.h5ad (measured + HR pseudo-spots)."""
    scale = calib["scale"]
    uns = {"radius_px": calib["radius_px"], "radius_raw_px": calib["radius_raw_px"],
           "pixel_size_um": calib["pixel_size_um"], "raw_pixel_size_um": calib["raw_pixel_size_um"],
           "scale": scale, "lattice": lattice, "target": "min-max per gene: (counts - scale_min) / (scale_max - scale_min)"}
    spots = anndata.AnnData(X=sel.astype(np.float32), obs=_obs(ids, xy, scale, {"total_counts": totals.astype(np.float32)}),
                            var=var_df, uns=uns)
    n_src = np.array([len(s) for s in sources], dtype=np.int64)
    all_xy = np.concatenate([xy, hr_xy]) if len(hr_xy) else xy
    measured = np.r_[np.ones(len(xy), bool), np.zeros(len(hr_xy), bool)]
    hr_ids = list(ids) + [f"hr{i:06d}" for i in range(len(hr_xy))]
    # which measured spots (row numbers of spots.h5ad) each HR spot is made from; -1 pads
    src = np.full((len(all_xy), 4), -1, dtype=np.int64)
    src[:len(xy), 0] = np.arange(len(xy))
    for i, s in enumerate(sources):
        src[len(xy) + i, :len(s)] = s
    hr = anndata.AnnData(X=np.concatenate([sel, hr_counts]).astype(np.float32),
                         obs=_obs(hr_ids, all_xy, scale, {"measured": measured, "n_sources": np.r_[np.ones(len(xy), np.int64), n_src]}),
                         var=var_df.copy(), uns=uns, obsm={"sources": src})
    return spots, hr


def _build_hr(st, directory, n_genes, gene_list):
    calib = L.load_calibration(directory)
    he = L.read_preview(directory, calib)
    scale = calib["scale"]
    counts_path = find_one(directory, COUNTS_NAMES, "spot count matrix (cnts.tsv)")
    ids, genes, X = read_counts(directory)
    locs_raw, locs_path = read_locs(directory)
    gene_list = Path(gene_list).resolve() if gene_list else None   # the same file by any path is no change
    st.record(inputs=[counts_path, locs_path, L.CALIBRATION.path(directory)] + ([gene_list] if gene_list else []),
              parameters={"n_genes": n_genes, "gene_list": str(gene_list) if gene_list else None})
    log.info("%s: %d spots x %d genes", counts_path.name, X.shape[0], X.shape[1])

    locs_raw = match_spots(ids, locs_raw, counts_path, locs_path, genes)
    keep = _kept_spots(ids, X, locs_raw, calib, counts_path, locs_path)
    ids, X = ids[keep], X[keep]
    totals = X.sum(axis=1)
    xy = locs_raw.loc[ids, ["x", "y"]].to_numpy(dtype=np.float64) * scale

    gidx, var = select_genes(X, genes, n_genes=n_genes, gene_list=gene_list, counts_path=counts_path.name)
    sel = X[:, gidx]
    lo, hi = minmax_scaling(sel)
    var_df = pd.DataFrame({"variance": var[gidx], "scale_min": lo, "scale_max": hi,
                           "rank": np.arange(len(gidx))}, index=pd.Index(genes[gidx], name="gene"))
    log.info("selected %d genes (%s)", len(gidx), "from " + str(gene_list) if gene_list else "top by variance")

    lattice = describe_lattice(xy)
    lattice["spacing_um"] = lattice["spacing_px"] * calib["pixel_size_um"]
    check_footprint_overlap(calib, lattice, directory)
    hr_xy, sources = hr_pseudo_spots(xy, lattice)
    hr_counts = interpolate_counts(sel, sources)
    log.info("lattice: %s, spacing %.1f um, orientation %.1f deg; %d measured + %d HR pseudo-spots",
             lattice["kind"], lattice["spacing_um"], lattice["orientation_deg"], len(xy), len(hr_xy))
    lattice["n_hr_pseudo_spots"] = int(len(hr_xy))

    spots, hr = _anndatas(ids, xy, sel, totals, var_df, calib, lattice, hr_xy, sources, hr_counts)
    all_xy = np.c_[hr.obs["x"], hr.obs["y"]]
    st.require_space(2.2 * (spots.X.nbytes + hr.X.nbytes), L.HR_SPOTS.name)
    _write(st.out, directory, spots, hr, he, calib)
    log.info("wrote %s (%d spots), %s (%d HR spots), %s, %s", L.SPOTS.name, len(xy), L.HR_SPOTS.name, len(all_xy),
             L.GENES.name, L.HR_PLOT.name)
    return spots, hr, lattice


# radius / nearest-neighbour spacing: Visium 0.275, ST 0.5. Above 1 a footprint covers its neighbours'
# centres (each super-pixel is shared by many spots); above 3 it spans ~30 spots and costs >20x time.
OVERLAP_WARN, OVERLAP_REFUSE = 1.0, 3.0


def check_footprint_overlap(calib, lattice, directory):
    ratio = calib["radius_px"] / lattice["spacing_px"]
    radius_um = calib["radius_px"] * calib["pixel_size_um"]
    msg = (f"the spot radius {radius_um:.0f} um is {ratio:.1f}x the {lattice['spacing_um']:.0f} um spacing of "
           f"the spots")
    if ratio > OVERLAP_REFUSE:
        raise InputError(f"{Path(directory) / L.RAW_RADIUS}: {msg}, so every footprint would cover dozens of "
                         f"neighbours; write the radius of one spot in raw pixels (Visium: 27.5 um / pixel size), "
                         f"then rerun image_calibration.py")
    if ratio > OVERLAP_WARN:
        log.warning("%s: each footprint overlaps its neighbours' centres (slower, blurrier targets); check "
                    "%s", msg, L.RAW_RADIUS)


def _write(out, directory, spots, hr, he, calib):
    spots.write_h5ad(out.path(L.SPOTS.path(directory)))
    hr.write_h5ad(out.path(L.HR_SPOTS.path(directory)))
    spots.var.to_csv(out.path(L.GENES.path(directory)), sep="\t")
    out.write_json(L.LATTICE.path(directory), spots.uns["lattice"])
    xy = np.c_[hr.obs["x"], hr.obs["y"]]
    measured = hr.obs["measured"].to_numpy()
    _plot(out.path(L.HR_PLOT.path(directory)), he, xy[measured], xy, measured, calib)
