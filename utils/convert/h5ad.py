"""A scanpy/AnnData Visium object (.h5ad, e.g. scanpy.read_visium(...).write_h5ad) -> the raw layout.

Spot centres come from obsm['spatial'] (full-resolution pixels), counts from layers['counts'], X or
raw.X (the first that holds raw integers), the scale factors from uns['spatial'][library]. The pixel
size is found as for Space Ranger's output (utils/convert/visium.py), from the array coordinates when
obs has them."""
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.errors import InputError
from ..core.h5ad_io import read_anndata
from ..core.stage import Stage
from .affine import lattice_pixel_size
from .constants import SPACERANGER_SPOT_DIAMETER_UM, VISIUM_SPOT_SPACING_UM
from .he_image import check_inside, check_pixel_size, open_target_image
from .raw_layout import counts_name_for, prepare_directory, write_raw_layout
from .tables import in_tissue_flags, make_unique, numeric
from .truth_layout import section_record
from .visium import COL_STEP, ROW_STEP, check_scalefactors, compare_spot_diameter

log = logging.getLogger("trihrge")

OBS_FIX = "store numbers there (as scanpy.read_visium does) before write_h5ad"


def convert_h5ad(args):
    path = Path(args.source)
    if not path.is_file():
        raise InputError(f"{path}: not found; give a .h5ad file of a Visium data set (e.g. written by "
                         f"scanpy.read_visium(...).write_h5ad)")
    image, image_name, hw = open_target_image(args.image)
    ad = read_anndata(path, "write it with write_h5ad", damaged=False)
    xy = _positions(ad, path, args.spatial_key)
    sf = _scalefactors(ad, path, args.library_id)
    X, genes, counts_from, gene_ids = _counts(ad, path)
    sel = _in_tissue(ad, path)
    array = _array_coordinates(ad, path)
    ps, how, report = _pixel_size(array, xy, sf, path, args)
    ps = check_pixel_size(ps, image, how)
    log.info("pixel size %.6g um/px (%s)", ps, how)
    report["spot_diameter_fullres_um"] = compare_spot_diameter(sf, ps, path)

    inside = np.flatnonzero(sel)[check_inside(image, hw, xy[sel, 0], xy[sel, 1], "spots")]
    ids, X, x, y = pd.Index(ad.obs_names.astype(str))[inside], X[inside], xy[inside, 0], xy[inside, 1]
    if ids.duplicated().any():
        raise InputError(f"{path}: duplicated obs names ({', '.join(ids[ids.duplicated()][:3])}); make them unique")
    if len(ids) < 3:
        raise InputError(f"{path}: only {len(ids)} spot(s) under tissue inside the image; at least 3 are needed")
    counts_name = counts_name_for(args.counts_format, len(ids), len(genes))
    directory = prepare_directory(args.directory, image_name, counts_name, writes_truth=False, source=args.source)
    array = {k: v[inside] for k, v in array.items()} if array else {"array_col": [], "array_row": []}
    conversion = {"converter": "python -m utils.convert h5ad", "source": str(path.resolve()),
                  "image": str(image.resolve()), "counts_from": counts_from, "pixel_size_um": ps,
                  "pixel_size_from": how, "lattice": {k: v for k, v in report.items() if np.isscalar(v) or v is None},
                  "spot_diameter_um": args.spot_diameter_um,
                  "scalefactors": {k: float(v) for k, v in sf.items() if np.isscalar(v)}}
    section = section_record("AnnData (scanpy Visium object)", "10x Visium: 55 um spots on a 100 um hexagonal lattice",
                             args.tissue, ids, genes, array["array_col"], array["array_row"], conversion)
    with Stage("convert", directory, manifest=False, create=True) as st:
        write_raw_layout(st.out, directory, source=args.source, image=image, image_name=image_name,
                         image_mode=args.image_mode, pixel_size=ps, ids=ids, genes=genes, X=X, x=x, y=y,
                         radius_raw=args.spot_diameter_um / 2 / ps, section=section, counts_name=counts_name,
                         gene_ids=gene_ids)
    log.info("wrote %s: %d spots x %d genes at %.5g um/px", directory, len(ids), len(genes), ps)
    return {"directory": str(directory), "spots": len(ids), "genes": len(genes), "pixel_size": ps}


def _positions(ad, path, key) -> np.ndarray:
    """The spot centres, (n, 2) x, y in full-resolution pixels (more columns are ignored)."""
    if key not in ad.obsm:
        raise InputError(f"{path}: no obsm['{key}'] (obsm holds {', '.join(ad.obsm.keys()) or 'nothing'}); "
                         f"store the spot centres in full-resolution pixels (x = column, y = row) there, as "
                         f"scanpy.read_visium does, or name the key with --spatial-key")
    xy = np.asarray(ad.obsm[key])
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"{path}: obsm['{key}'] must be an (n, 2) array of finite x, y pixel positions")
    xy = pd.DataFrame(xy[:, :2], columns=["x", "y"])
    return np.column_stack([numeric(xy, c, path, f"obsm['{key}'] column {c}", OBS_FIX) for c in ("x", "y")])


def _scalefactors(ad, path, library_id) -> dict:
    """uns['spatial'][library]['scalefactors'], checked as Space Ranger's JSON is ({} without them)."""
    spatial = ad.uns.get("spatial", {}) if hasattr(ad.uns, "get") else {}
    if not spatial:
        if library_id is not None:
            log.warning("--library-id %s: %s holds no uns['spatial'], so it does not apply", library_id, path.name)
        return {}
    libs = list(spatial.keys())
    if library_id is not None and library_id not in spatial:
        raise InputError(f"{path}: --library-id {library_id}: not in uns['spatial'] ({', '.join(libs)}); pass one "
                         f"of these")
    lib = library_id or (libs[0] if len(libs) == 1 else None)
    if lib is None:
        raise InputError(f"{path}: uns['spatial'] holds libraries {', '.join(libs)}; choose one with --library-id")
    where = f"{path}: uns['spatial']['{lib}']"
    if not isinstance(spatial[lib], Mapping):
        raise InputError(f"{where} is a {type(spatial[lib]).__name__}, not a library (images, scalefactors); "
                         f"store it as scanpy.read_visium does, or remove uns['spatial']")
    return check_scalefactors(spatial[lib].get("scalefactors", {}), f"{where}['scalefactors']",
                              "store the scale factors as Space Ranger wrote them (or remove them)")


def _counts(ad, path):
    """(X as int64 CSR, gene names, where they came from, gene ids or None): layers['counts'] > X >
    raw.X, whichever holds raw integers; only the 'Gene Expression' features where var says."""
    if "counts" in ad.layers:
        X, var, counts_from = ad.layers["counts"], ad.var, "layers['counts']"
    elif _integer_counts(ad.X):
        X, var, counts_from = ad.X, ad.var, "X"
    elif ad.raw is not None and _integer_counts(ad.raw.X):
        X, var, counts_from = ad.raw.X, ad.raw.var, "raw.X"
    elif ad.X is None and ad.raw is None:
        raise InputError(f"{path}: the AnnData holds no count matrix (no X, layers['counts'] or raw); store the raw "
                         f"UMI counts in X or layers['counts'] before write_h5ad")
    else:
        raise InputError(f"{path}: no raw integer counts (X is normalised and there is no layers['counts'] or raw); "
                         f"save the raw UMI counts in layers['counts'] before write_h5ad")
    if not _integer_counts(X):
        raise InputError(f"{path}: {counts_from} holds non-integer or negative values; give raw UMI counts")
    X, genes = sparse.csr_matrix(X).astype(np.int64), var.index
    if "feature_types" in var.columns:
        keep = np.flatnonzero(var["feature_types"].astype(str).to_numpy() == "Gene Expression")
        if keep.size == 0:
            raise InputError(f"{path}: no 'Gene Expression' feature in var['feature_types']")
        X, genes, var = X[:, keep], genes[keep], var.iloc[keep]
    gene_ids = var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var.columns else None
    return X, make_unique(genes, path), counts_from, gene_ids


def _integer_counts(X) -> bool:
    if X is None:
        return False
    data = X.data if hasattr(X, "data") and hasattr(X, "indptr") else np.asarray(X)
    return data.size == 0 or (np.all(np.isfinite(data)) and np.all(data == np.round(data)) and data.min() >= 0)


def _in_tissue(ad, path) -> np.ndarray:
    """The spots to keep: obs['in_tissue'] true where obs has it (tables.in_tissue_flags), else all."""
    if "in_tissue" not in ad.obs.columns:
        return np.ones(ad.n_obs, bool)
    sel = in_tissue_flags(ad.obs["in_tissue"], path, "obs['in_tissue']", "store 1 (under tissue) or 0 there, as "
                                                                         "scanpy.read_visium does")
    if (~sel).any():
        log.info("dropped %d of %d spots not under tissue (obs['in_tissue'] false)", int((~sel).sum()), ad.n_obs)
    return sel


def _array_coordinates(ad, path) -> dict:
    """obs array_col, array_row as finite numbers ({} when obs lacks either)."""
    keys = ("array_col", "array_row")
    if not set(keys) <= set(ad.obs.columns):
        return {}
    return {k: numeric(ad.obs, k, path, f"obs['{k}']", OBS_FIX) for k in keys}


def _pixel_size(array, xy, sf, path, args):
    """(um/px, how it was found, the lattice report): --pixel-size > the array lattice (`array`: obs
    array_col, array_row) > the nearest-neighbour spacing (100 um) > spot_diameter_fullres / 65."""
    if args.pixel_size:
        return float(args.pixel_size), "given with --pixel-size", {}
    report = {}
    if array:
        ps, report = lattice_pixel_size(array["array_col"], array["array_row"], xy[:, 0], xy[:, 1], COL_STEP,
                                        ROW_STEP, path, "spot")
        if ps is not None:
            return ps, f"affine fit of obsm['{args.spatial_key}'] on obs array_row/array_col (100 um hexagonal array)", report
    from ..spots.lattice import describe_lattice
    lat = describe_lattice(xy)
    if lat["kind"] == "hexagonal":
        return (VISIUM_SPOT_SPACING_UM / lat["spacing_px"],
                f"nearest-neighbour spacing {lat['spacing_px']:.2f} px = 100 um (hexagonal lattice)", lat)
    if sf.get("spot_diameter_fullres"):
        return SPACERANGER_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"]), "spot_diameter_fullres / 65 um", report
    raise InputError(f"{path}: the spot positions are not a hexagonal Visium lattice and there are no "
                     f"array coordinates or scale factors; give the pixel size with --pixel-size")
