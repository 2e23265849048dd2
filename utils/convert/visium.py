"""Space Ranger (Visium, Visium HD) output -> the raw layout (an AnnData Visium object: utils/convert/h5ad.py).

Pixel size of the full-resolution image:
- Visium: from the spot lattice itself. Every spot has array coordinates (array_col steps of 2 are 100 um
  apart along a row, rows are 100 * sqrt(3) / 2 um apart) and a position in full-resolution pixels; a
  least-squares affine fit of pixels on microns over all spots (in and off tissue) gives um/px, whatever the
  rotation or flip of the image. `spot_diameter_fullres` is only cross-checked: Space Ranger (>= 1.3)
  documents it as the pixel diameter of a *theoretical 65 um spot*, not of the 55 um capture spot, so
  55 / spot_diameter_fullres would be 15 % too small.
- Visium HD: `microns_per_pixel` of scalefactors_json.json, cross-checked against the bin lattice.
The spot radius written is always the physical one: 27.5 um / pixel size.
"""
import logging
import math
import numbers
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.geometry import superpixel_grid_shape
from ..core.stage import Stage
from .affine import lattice_pixel_size
from .constants import SPACERANGER_SPOT_DIAMETER_UM, VISIUM_SPOT_SPACING_UM
from .he_image import check_inside, check_pixel_size, image_shape, open_target_image
from .raw_layout import counts_name_for, prepare_directory, write_raw_layout
from .tables import decode, in_tissue_flags, numeric, read_json, read_table, require_columns
from .tenx_matrix import find_matrix, read_10x_matrix
from .truth_layout import aggregate_to_superpixels, make_pseudo_spots, section_record, superpixel_of, write_with_truth

log = logging.getLogger("trihrge")

POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
MATRIX_NAMES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5", "filtered_feature_bc_matrix",
                "raw_feature_bc_matrix")
ROW_STEP = VISIUM_SPOT_SPACING_UM * math.sqrt(3) / 2
COL_STEP = VISIUM_SPOT_SPACING_UM / 2


# ----------------------------------------------------------------------------------------------------
# Space Ranger files



def _in_tissue_barcodes(M, pos, pos_path, what, same):
    """Barcodes of the matrix that lie under tissue; every barcode must have a position."""
    unknown = M.barcodes[~M.barcodes.isin(pos.index)]
    if len(unknown):
        raise InputError(f"{M.path}: {len(unknown)} {what} have no position in {pos_path.name} "
                         f"({', '.join(unknown[:3])}); give the matrix and spatial/ folder of the {same}")
    in_tissue = pos.index[pos.in_tissue.to_numpy() == 1]
    sel = M.barcodes[M.barcodes.isin(in_tissue)]
    if len(sel) < len(M.barcodes):
        log.info("dropped %d of %d %s not under tissue (in_tissue = 0)", len(M.barcodes) - len(sel),
                 len(M.barcodes), what)
    return sel

def find_spatial(source, what="Space Ranger output folder (outs/)"):
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: not found; give the {what}")
    if (source / "spatial").is_dir():
        return source / "spatial"
    if source.name == "spatial" and source.is_dir():
        return source
    raise InputError(f"{source}: no spatial/ folder; give the {what} that holds spatial/ and the "
                     f"feature-barcode matrix")


def read_positions(spatial):
    """Spot/bin positions indexed by barcode: in_tissue, array_row, array_col, x (= pxl_col), y (= pxl_row)."""
    spatial = Path(spatial)
    found = [spatial / n for n in POSITION_FILES if (spatial / n).is_file()]
    if not found:
        raise InputError(f"{spatial}/{POSITION_FILES[0]}: no tissue positions file (looked for "
                         f"{', '.join(POSITION_FILES)}); give the Space Ranger output folder unchanged")
    path = found[0]
    if path.suffix == ".parquet":
        df = read_table(path, "tissue positions table")
    else:
        import gzip
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", errors="replace") as f:
            first = f.readline().strip().split(",")
        header = len(first) > 1 and not first[1].strip().lstrip("-").replace(".", "", 1).isdigit()
        df = read_table(path, "tissue positions table", header=0 if header else None,
                        names=None if header else POSITION_COLUMNS, dtype={0: str} if not header else {"barcode": str})
    df.columns = [str(c).strip() for c in df.columns]
    require_columns(df, POSITION_COLUMNS, path, "tissue positions table")
    out = pd.DataFrame({"in_tissue": in_tissue_flags(df["in_tissue"], path, "column in_tissue",
                                                     "give the file written by Space Ranger, unchanged").astype(np.int64),
                        "array_row": numeric(df, "array_row", path),
                        "array_col": numeric(df, "array_col", path),
                        "x": numeric(df, "pxl_col_in_fullres", path),
                        "y": numeric(df, "pxl_row_in_fullres", path)})
    out.index = pd.Index(decode(df["barcode"].to_numpy()), name="barcode")
    if out.index.duplicated().any():
        raise InputError(f"{path}: duplicated barcodes ({', '.join(out.index[out.index.duplicated()][:3])}); "
                         f"give the file written by Space Ranger, unchanged")
    log.info("%s: %d positions, %d in tissue", path.name, len(out), int((out.in_tissue == 1).sum()))
    return out, path


SCALE_FACTORS_READ = ("spot_diameter_fullres", "tissue_hires_scalef", "bin_size_um", "microns_per_pixel")


def read_scalefactors(spatial):
    path = Path(spatial) / "scalefactors_json.json"
    if not path.is_file():
        log.warning("%s: not found; the pixel size comes from the spot lattice alone", path)
        return {}, path
    sf = read_json(path, "scale factors (scalefactors_json.json)")
    return check_scalefactors(sf, path, "give the file written by Space Ranger, unchanged"), path


def check_scalefactors(sf, where, fix: str) -> dict:
    """The scale factors this converter reads must be positive numbers (a JSON file or an h5ad's uns)."""
    if not isinstance(sf, Mapping):
        raise InputError(f"{where}: expected a mapping of scale factors, found {type(sf).__name__}; {fix}")
    for key in SCALE_FACTORS_READ:
        v = sf.get(key)
        if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                              or not math.isfinite(v) or v <= 0):
            raise InputError(f"{where}: {key} is {v!r}, not a positive number; {fix}")
    return dict(sf)


def check_same_image(spatial, sf, hw, image, skip):
    """The given image must be the one Space Ranger downscaled into tissue_hires_image.png."""
    s = sf.get("tissue_hires_scalef")
    hires = Path(spatial) / "tissue_hires_image.png"
    if skip or not s or not hires.is_file():
        return
    h2, w2 = image_shape(hires)
    eh, ew = hw[0] * float(s), hw[1] * float(s)
    def close(a, b):
        return abs(a - b) <= 0.01 * b + 2
    if not (close(eh, h2) and close(ew, w2)):
        # the sizes swapped: the same scan turned by 90 degrees (e.g. by an EXIF/TIFF orientation tag applied
        # by one program and not by the other)
        turned = (" (it matches turned by 90 degrees: save the image with its pixels the way Space Ranger "
                  "read them, without an orientation tag)" if close(eh, w2) and close(ew, h2) else "")
        raise InputError(f"{image}: {hw[1]} x {hw[0]} px, but Space Ranger's tissue_hires_image.png ({w2} x {h2} px, "
                         f"tissue_hires_scalef {float(s):.6g}) was made from a {w2 / float(s):.0f} x "
                         f"{h2 / float(s):.0f} px image{turned}; pass with --image the full-resolution image given to "
                         f"Space Ranger (or add --skip-image-check if you are sure it is the same image, e.g. re-saved)")


def compare_spot_diameter(sf, ps, sf_path):
    sdf = sf.get("spot_diameter_fullres")
    if not sdf:
        return None
    um = float(sdf) * ps
    log.info("%s: spot_diameter_fullres %.2f px = %.1f um at %.5g um/px (Space Ranger documents it as a theoretical "
             "%g um spot; the capture spot is 55 um)", Path(sf_path).name, float(sdf), um, ps,
             SPACERANGER_SPOT_DIAMETER_UM)
    if min(abs(um / SPACERANGER_SPOT_DIAMETER_UM - 1), abs(um / 55.0 - 1)) > 0.05:
        log.warning("%s: spot_diameter_fullres spans %.1f um at the lattice pixel size, neither 65 nor 55 um; check "
                    "that positions and scale factors come from the same run", Path(sf_path).name, um)
    return um


def visium_pixel_size(pos, sf, override, pos_path, sf_path, image):
    """um/px of the full-resolution image and how it was derived (see the module docstring)."""
    report = {}
    if override:
        ps, how = float(override), "given with --pixel-size"
    else:
        ps, report = lattice_pixel_size(pos.array_col, pos.array_row, pos.x, pos.y, COL_STEP, ROW_STEP, pos_path, "spot")
        if ps is not None:
            how = (f"affine fit of the {report['n_points']} spot positions of {Path(pos_path).name} on the 100 um "
                   f"hexagonal array (rms residual {report['rms_residual_um']:.2f} um)")
        elif sf.get("spot_diameter_fullres"):
            ps = SPACERANGER_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
            how = f"spot_diameter_fullres / {SPACERANGER_SPOT_DIAMETER_UM:g} um ({report.get('reason')})"
            log.warning("pixel size from spot_diameter_fullres (%s): %.5g um/px", report.get("reason"), ps)
        else:
            raise InputError(f"{pos_path}: the spot positions do not determine the pixel size "
                             f"({report.get('reason')}) and {sf_path} gives no spot_diameter_fullres; give the pixel "
                             f"size of the full-resolution image with --pixel-size")
    ps = check_pixel_size(ps, image, how)
    log.info("pixel size %.6g um/px (%s)", ps, how)
    report["spot_diameter_fullres_um"] = compare_spot_diameter(sf, ps, sf_path)
    return ps, how, report


# ----------------------------------------------------------------------------------------------------
# Visium


def convert_visium(args):
    spatial = find_spatial(args.source)
    outs = spatial.parent
    image, image_name, hw = open_target_image(args.image)
    pos, pos_path = read_positions(spatial)
    sf, sf_path = read_scalefactors(spatial)
    M = read_10x_matrix(find_matrix(outs, MATRIX_NAMES, args.matrix))

    sel = _in_tissue_barcodes(M, pos, pos_path, "barcodes", "same run")
    if len(sel) < 3:
        raise InputError(f"{pos_path}: only {len(sel)} in-tissue spot(s) with counts; give the run's "
                         f"filtered_feature_bc_matrix.h5 and spatial/ folder")

    ps, how, report = visium_pixel_size(pos, sf, args.pixel_size, pos_path, sf_path, image)
    check_same_image(spatial, sf, hw, image, args.skip_image_check)
    x = pos.loc[sel, "x"].to_numpy()
    y = pos.loc[sel, "y"].to_numpy()
    inside = check_inside(image, hw, x, y, "in-tissue spots")
    sel, x, y = sel[inside], x[inside], y[inside]
    X = M.rows(sel)
    radius_raw = args.spot_diameter_um / 2 / ps

    counts_name = counts_name_for(args.counts_format, len(sel), len(M.genes))
    directory = prepare_directory(args.directory, image_name, counts_name, writes_truth=False, source=args.source)
    conversion = {"converter": "python -m utils.convert visium", "source": str(Path(args.source).resolve()),
                  "image": str(image.resolve()), "positions": pos_path.name, "matrix": M.path.name,
                  "pixel_size_um": ps, "pixel_size_from": how, "lattice": report,
                  "spot_diameter_um": args.spot_diameter_um, "scalefactors": sf}
    section = section_record("10x Visium (Space Ranger)", "10x Visium: 55 um spots on a 100 um hexagonal lattice",
                             args.tissue, sel, M.genes, pos.loc[sel, "array_col"], pos.loc[sel, "array_row"],
                             conversion)
    with Stage("convert", directory, manifest=False, create=True) as st:
        out = st.out
        write_raw_layout(out, directory, source=args.source, image=image, image_name=image_name, image_mode=args.image_mode,
                         pixel_size=ps, ids=sel, genes=M.genes, X=X, x=x, y=y, radius_raw=radius_raw,
                         section=section, counts_name=counts_name, gene_ids=M.gene_ids)
    log.info("wrote %s: %d in-tissue spots x %d genes, %s (%d x %d px at %.5g um/px), radius %.2f px",
             directory, len(sel), len(M.genes), image_name, hw[1], hw[0], ps, radius_raw)
    return {"directory": str(directory), "spots": len(sel), "genes": len(M.genes), "pixel_size": ps}


# ----------------------------------------------------------------------------------------------------
# Visium HD


def find_bins(source, bin_size):
    source = Path(source)
    name = f"square_{bin_size:03d}um"
    cands = [c for c in (source / "binned_outputs" / name, source / name, source) if c.name == name and c.is_dir()]
    for cand in cands:
        if (cand / "spatial").is_dir():
            return cand
    if cands:   # the bin folder is there, its spatial/ is not: a partial copy
        raise InputError(f"{cands[0]}/spatial: not found; a Space Ranger bin folder holds spatial/ "
                         f"(tissue_positions.parquet, scalefactors_json.json) beside filtered_feature_bc_matrix.h5: "
                         f"copy the whole binned_outputs/{name} folder again")
    if (source / "spatial").is_dir() and (source / "spatial" / "tissue_positions.parquet").is_file():
        log.warning("%s: not named %s; taking its bins as %d um bins", source, name, bin_size)
        return source
    have = sorted(p.name for base in (source / "binned_outputs", source) if base.is_dir()
                  for p in base.glob("square_*um") if p.is_dir())
    usable = [n for n in have if n in ("square_002um", "square_008um")]
    hint = (f" (it holds {', '.join(have)}: pass --bin-size {int(usable[0][7:10])})" if usable else
            f" (it holds {', '.join(have)}; only 2 and 8 um bins can make 8 um truth)" if have else "")
    raise InputError(f"{source}: no binned_outputs/{name}/ folder{hint}; give the Space Ranger (>= 3.0) Visium HD "
                     f"output folder (outs/) or its binned_outputs/{name} folder")


def convert_visium_hd(args):
    bin_size = int(args.bin_size)
    bins_dir = find_bins(args.source, bin_size)
    spatial = bins_dir / "spatial"
    image, image_name, hw = open_target_image(args.image)
    pos, pos_path = read_positions(spatial)
    sf, sf_path = read_scalefactors(spatial)
    if sf.get("bin_size_um") and abs(float(sf["bin_size_um"]) - bin_size) > 1e-6:
        size = float(sf["bin_size_um"])
        fix = (f"pass --bin-size {size:g} or the square_{bin_size:03d}um folder" if size in (2, 8) else
               "only 2 and 8 um bins can make 8 um truth: give the outs/ folder or its binned_outputs/square_008um")
        raise InputError(f"{sf_path}: bin_size_um is {sf['bin_size_um']}, not {bin_size}; {fix}")
    M = read_10x_matrix(find_matrix(bins_dir, MATRIX_NAMES, args.matrix))
    sel = _in_tissue_barcodes(M, pos, pos_path, "bins", "same bin size")
    ps, how, report = _hd_pixel_size(args.pixel_size, sf, sf_path, pos, pos_path, bin_size, image)
    check_same_image(spatial, sf, hw, image, args.skip_image_check)
    sel, rows, cols, truth = _bins_to_superpixels(M, pos, sel, image, hw, ps, bin_size)
    grid_shape = superpixel_grid_shape(hw, ps)
    spots = make_pseudo_spots(truth, rows, cols, grid_shape, hw, ps, args.seed)
    counts_name = counts_name_for(args.counts_format, len(spots["ids"]), len(M.genes))
    directory = prepare_directory(args.directory, image_name, counts_name, writes_truth=True, source=args.source)
    conversion = {"converter": "python -m utils.convert visium-hd", "source": str(Path(args.source).resolve()),
                  "bins": bins_dir.name, "image": str(image.resolve()), "matrix": M.path.name,
                  "pixel_size_um": ps, "pixel_size_from": how, "lattice": report, "seed": int(args.seed),
                  "truth": f"{bin_size} um bins summed into the 8 um super-pixel holding their centre",
                  "n_bins": int(len(sel)), "scalefactors": sf}
    section = section_record("10x Visium HD (Space Ranger)",
                             "pseudo-Visium: 55 um spots on a 100 um hexagonal lattice, summed from 8 um truth "
                             f"built from Visium HD {bin_size} um bins", args.tissue, spots["ids"], M.genes,
                             spots["array_col"], spots["array_row"], conversion)
    write_with_truth(args, directory, image=image, image_name=image_name, counts_name=counts_name, pixel_size=ps,
                     spots=spots, matrix=M, section=section, truth=truth, rows=rows, cols=cols, image_hw=hw,
                     source="10x Visium HD", uns={"bin_size_um": float(bin_size)})
    log.info("wrote %s: %d pseudo-spots, truth %d super-pixels x %d genes", directory, len(spots["ids"]), len(rows),
             len(M.genes))
    return {"directory": str(directory), "spots": len(spots["ids"]), "superpixels": len(rows), "pixel_size": ps}


def _hd_pixel_size(given, sf, sf_path, pos, pos_path, bin_size, image):
    """(um/px, how it was found, the lattice fit's report): --pixel-size, else microns_per_pixel,
    else the bin lattice's affine fit, which also cross-checks the others."""
    lat_ps, report = lattice_pixel_size(pos.array_col, pos.array_row, pos.x, pos.y, bin_size, bin_size, pos_path, "bin")
    if given:
        ps, how = float(given), "given with --pixel-size"
    elif sf.get("microns_per_pixel"):
        ps, how = float(sf["microns_per_pixel"]), f"microns_per_pixel of {sf_path.name}"
    elif lat_ps is not None:
        ps, how = lat_ps, f"affine fit of the {bin_size} um bin lattice of {pos_path.name}"
    else:
        raise InputError(f"{sf_path}: no microns_per_pixel and the bin positions do not determine the pixel size; "
                         f"give it with --pixel-size")
    ps = check_pixel_size(ps, image, how)
    if lat_ps is not None and abs(lat_ps / ps - 1) > 0.03:
        log.warning("the %d um bin lattice gives %.5g um/px, %.1f%% away from %.5g um/px (%s)", bin_size, lat_ps,
                    100 * (lat_ps / ps - 1), ps, how)
    log.info("pixel size %.6g um/px (%s)", ps, how)
    return ps, how, report


def _bins_to_superpixels(M, pos, sel, image, hw, ps, bin_size):
    """(the bins kept: those on the image, super-pixel rows, cols, their summed counts): each bin
    goes to the 8 um super-pixel of the image that holds its centre."""
    x = pos.loc[sel, "x"].to_numpy()
    y = pos.loc[sel, "y"].to_numpy()
    inside = check_inside(image, hw, x, y, "in-tissue bins")
    sel, x, y = sel[inside], x[inside], y[inside]
    if len(sel) == 0:
        raise InputError(f"{M.path}: no in-tissue bin with counts; give the run's filtered_feature_bc_matrix.h5")
    grid_shape = superpixel_grid_shape(hw, ps)
    r, c = superpixel_of(x, y, ps)
    keys = r * grid_shape[1] + c
    rows, cols, truth = aggregate_to_superpixels(keys, M.rows(sel, "bins"), grid_shape)
    expected = (8.0 / bin_size) ** 2
    crowded = float((np.bincount(np.unique(keys, return_inverse=True)[1]) > expected).mean())
    log.info("%d bins -> %d super-pixels (%.2f bins each, %.1f%% with more than %g)", len(sel), len(rows),
             len(sel) / max(1, len(rows)), 100 * crowded, expected)
    if bin_size == 8 and crowded > 0.02:
        log.info("the 8 um bins are not aligned with the image's 8 um super-pixel grid (rotation/offset), so some "
                 "super-pixels get two bins and some none; --bin-size 2 builds the truth from 2 um bins instead")
    return sel, rows, cols, truth


# ----------------------------------------------------------------------------------------------------
# AnnData (scanpy Visium object)
