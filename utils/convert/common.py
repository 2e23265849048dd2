"""Shared pieces of the 10x converters (`python -m utils.convert`, see utils/convert.py).

- reading 10x feature-barcode matrices (HDF5 with h5py, or the Matrix Market folder), keeping only
  'Gene Expression' features and making gene names unique;
- the H&E image: refusing Space Ranger's downscaled/QC images, reading its shape from the header only,
  linking or copying it into DIR as he-raw.<ext>;
- affine fits (array lattice -> pixels, alignment matrices) and the pixel size they imply;
- the raw layout writer (he-raw, pixel-size-raw.txt, cnts.*, locs-raw.tsv, radius-raw.txt, section.json);
- the 8 um truth writer (truth/super.h5ad, truth/mask.png in the layout of utils/simulate.py) and the
  pseudo-Visium spots summed from it over utils.geometry.footprint: both through utils/truth.py, which the
  simulator uses too.
"""
import gzip
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.errors import InputError
from ..core.geometry import SUPER_PIXEL_UM
from ..core.raw_io import COUNTS_NAMES, IMAGE_NAMES, LOCS_NAMES, PIXEL_SIZE_RANGE_UM
from ..evaluation.truth import SPOT_DIAMETER_UM, SPOT_SPACING_UM, pseudo_visium_spots, write_truth_h5ad

log = logging.getLogger("trihrge")

GENE_EXPRESSION = "Gene Expression"
VISIUM_SPOT_DIAMETER_UM = SPOT_DIAMETER_UM  # physical capture spot: 55 um
VISIUM_SPOT_SPACING_UM = SPOT_SPACING_UM    # centre to centre, hexagonal: 100 um
SPACERANGER_SPOT_DIAMETER_UM = 65.0  # what scalefactors' spot_diameter_fullres spans (Space Ranger >= 1.3 docs)
TSV_LIMIT = 20_000_000               # spots x genes above which --counts-format auto writes cnts.h5ad

# Space Ranger's downscaled and QC images: never the main image
DOWNSCALED_IMAGES = {
    "tissue_hires_image": "Space Ranger's downscaled 'hires' image (2,000 px on its longest side for a 6.5 mm "
                          "Visium capture area, 4,000-6,000 px for 11 mm / Visium HD)",
    "tissue_lowres_image": "Space Ranger's downscaled 'lowres' image (600 px on its longest side)",
    "aligned_fiducials": "a Space Ranger QC image (the size of tissue_hires_image.png)",
    "detected_tissue_image": "a Space Ranger QC image (the size of tissue_hires_image.png)",
    "aligned_tissue_image": "a Space Ranger QC image (the CytAssist/microscope registration checkerboard)",
    "cytassist_image": "the CytAssist instrument image (about 3,000 px, eosin only)",
}
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.btf")
OTHER_SUFFIXES = {".jpg": "he-raw.jpg", ".jpeg": "he-raw.jpg", ".png": "he-raw.png"}


# ----------------------------------------------------------------------------------------------------
# small helpers


def decode(values):
    """bytes / numbers -> array of str (10x HDF5 and parquet files store ids as bytes in some versions)."""
    out = [v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in values]
    return np.array(out, dtype=object)


def make_unique(names, path, what="gene"):
    """Unique names: later duplicates get -1, -2, ... (as anndata's var_names_make_unique), with a log line."""
    names = [str(n) for n in names]
    seen = set(names)
    counts = {}
    out, renamed = [], []
    first = set()
    for n in names:
        if n not in first:
            first.add(n)
            out.append(n)
            continue
        k = counts.get(n, 0)
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in seen:
                break
        counts[n] = k
        seen.add(cand)
        out.append(cand)
        renamed.append(f"{n} -> {cand}")
    if renamed:
        log.info("%s: %d duplicated %s name(s) made unique by a suffix (%s%s)", Path(path).name, len(renamed), what,
                 ", ".join(renamed[:5]), ", ..." if len(renamed) > 5 else "")
    return pd.Index(out)


def _examples(items, k=3):
    items = list(items)
    return ", ".join(map(str, items[:k])) + (", ..." if len(items) > k else "")


def read_json(path, what):
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({type(e).__name__}); give the {what} written by the "
                         f"10x software, unchanged") from None


def read_table(path, what, **kw):
    """A parquet or (gzipped) CSV table as a DataFrame."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".parquet"):
            return pd.read_parquet(path)
        return pd.read_csv(path, **kw)
    except Exception as e:  # pyarrow/pandas raise many types for damaged files
        raise InputError(f"{path}: cannot be read as the {what} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}); check that the file is complete") from None


def require_columns(df, columns, path, what):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: column(s) {', '.join(missing)} missing from the {what} (found "
                         f"{_examples(df.columns, 8)}); give the file written by the 10x software")


def numeric(df, column, path):
    v = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(v).all():
        raise InputError(f"{path}: column {column} holds {int((~np.isfinite(v)).sum())} missing or non-numeric "
                         f"value(s); give the file written by the 10x software, unchanged")
    return v


# ----------------------------------------------------------------------------------------------------
# 10x feature-barcode matrices


class Matrix:
    """barcodes x genes raw counts (CSR, int64), gene names unique, gene ids alongside."""

    def __init__(self, barcodes, genes, gene_ids, X, path):
        self.barcodes = pd.Index(barcodes)
        self.genes = pd.Index(genes)
        self.gene_ids = np.asarray(gene_ids, dtype=object)
        self.X = X
        self.path = Path(path)

    def rows(self, barcodes, what="spots"):
        """Sub-matrix for the given barcodes (all must be present)."""
        pos = self.barcodes.get_indexer(pd.Index(barcodes))
        if (pos < 0).any():
            missing = pd.Index(barcodes)[pos < 0]
            raise InputError(f"{self.path}: {len(missing)} {what} have no column in the matrix "
                             f"({_examples(missing)}); give the matrix of the same run")
        return self.X[pos]


def _finish_matrix(path, barcodes, names, ids, types, X):
    n_bc, n_feat = X.shape
    if len(barcodes) != n_bc or len(names) != n_feat:
        raise InputError(f"{path}: the matrix is {n_feat} features x {n_bc} barcodes but lists {len(names)} features "
                         f"and {len(barcodes)} barcodes; the file is damaged, copy it again")
    types = np.asarray(types, dtype=object)
    keep = np.flatnonzero(types == GENE_EXPRESSION)
    if keep.size == 0:
        raise InputError(f"{path}: no '{GENE_EXPRESSION}' feature (feature types: {_examples(sorted(set(types)))}); "
                         f"give the gene expression matrix")
    if keep.size < n_feat:
        dropped = pd.Series(types[types != GENE_EXPRESSION]).value_counts()
        log.info("%s: kept %d '%s' features, dropped %s", path.name, keep.size, GENE_EXPRESSION,
                 ", ".join(f"{v} {k!r}" for k, v in dropped.items()))
    X = X[:, keep].tocsr()
    if X.nnz and not np.all(X.data == np.round(X.data)):
        raise InputError(f"{path}: the matrix holds non-integer values; give the raw UMI count matrix written by the "
                         f"10x software (filtered_feature_bc_matrix.h5 / cell_feature_matrix.h5)")
    if X.nnz and X.data.min() < 0:
        raise InputError(f"{path}: the matrix holds negative values; give the raw UMI count matrix")
    X.data = X.data.astype(np.int64)
    X.sum_duplicates()
    genes = make_unique(np.asarray(names, dtype=object)[keep], path)
    bc = pd.Index(decode(barcodes))
    if bc.duplicated().any():
        raise InputError(f"{path}: duplicated barcodes ({_examples(bc[bc.duplicated()].unique())}); the file is damaged")
    return Matrix(bc, genes, np.asarray(ids, dtype=object)[keep], X, path)


def read_10x_h5(path):
    """Read a 10x feature-barcode matrix HDF5 (Cell Ranger >= 3 / Space Ranger / Xenium schema) with h5py."""
    import h5py
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: cannot be opened as HDF5 ({str(e)[:100]}); copy the file again") from None
    with f:
        if "matrix" not in f:
            raise InputError(f"{path}: no 'matrix' group (found {_examples(list(f.keys()))}); give a 10x feature-barcode "
                             f"matrix .h5 written by Space Ranger >= 1.0 or Xenium Onboard Analysis (Cell Ranger 2 "
                             f"files with a per-genome group are not supported)")
        g = f["matrix"]
        need = ["data", "indices", "indptr", "shape", "barcodes", "features"]
        missing = [k for k in need if k not in g]
        if not missing:
            missing = [f"features/{k}" for k in ("name", "id", "feature_type") if k not in g["features"]]
        if missing:
            raise InputError(f"{path}: matrix/{', matrix/'.join(missing)} missing; give the 10x feature-barcode matrix "
                             f".h5 unchanged")
        n_feat, n_bc = (int(v) for v in g["shape"][:2])
        data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
        barcodes = g["barcodes"][:]
        names = decode(g["features/name"][:])
        ids = decode(g["features/id"][:])
        types = decode(g["features/feature_type"][:])
    if len(indptr) != n_bc + 1 or len(data) != len(indices):
        raise InputError(f"{path}: inconsistent sparse matrix arrays (indptr {len(indptr)} for {n_bc} barcodes); "
                         f"the file is damaged, copy it again")
    # stored CSC by barcode (genes x barcodes) == CSR of barcodes x genes
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_bc, n_feat))
    return _finish_matrix(path, barcodes, names, ids, types, X)


def read_10x_mtx(folder):
    """Read a 10x Matrix Market folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)."""
    from scipy.io import mmread
    folder = Path(folder)

    def pick(stem):
        for n in (f"{stem}.gz", stem):
            if (folder / n).is_file():
                return folder / n
        raise InputError(f"{folder}/{stem}.gz: not found; a 10x matrix folder holds matrix.mtx.gz, features.tsv.gz "
                         f"and barcodes.tsv.gz")
    m_p, f_p, b_p = pick("matrix.mtx"), pick("features.tsv"), pick("barcodes.tsv")
    try:
        M = sparse.csr_matrix(mmread(str(m_p)).T)
        feats = pd.read_csv(f_p, sep="\t", header=None, dtype=str)
        bcs = pd.read_csv(b_p, sep="\t", header=None, dtype=str)[0].to_numpy()
    except Exception as e:
        raise InputError(f"{folder}: cannot read the Matrix Market folder ({type(e).__name__}: {str(e)[:100]}); "
                         f"copy it again") from None
    types = feats[2].to_numpy() if feats.shape[1] > 2 else np.full(len(feats), GENE_EXPRESSION, dtype=object)
    return _finish_matrix(folder, bcs, feats[1].to_numpy(), feats[0].to_numpy(), types, M)


def read_10x_matrix(path):
    path = Path(path)
    if path.is_dir():
        return read_10x_mtx(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; give the 10x feature-barcode matrix (.h5 or Matrix Market folder)")
    return read_10x_h5(path)


def find_matrix(folder, names, override=None, what="feature-barcode matrix"):
    """The matrix to read: --matrix when given, else the first of `names` that exists in folder."""
    if override is not None:
        return Path(override)
    for n in names:
        if (Path(folder) / n).exists():
            return Path(folder) / n
    raise InputError(f"{folder}/{names[0]}: {what} not found (looked for {', '.join(names)}); point SOURCE at the "
                     f"10x output folder, or give the matrix with --matrix")


# ----------------------------------------------------------------------------------------------------
# the H&E image


def refuse_downscaled(path):
    stem = Path(path).name.lower()
    for key, what in DOWNSCALED_IMAGES.items():
        if stem.startswith(key):
            raise InputError(
                f"{path}: this is {what}, far too coarse for 8 um super-pixels (at several um per pixel a "
                f"super-pixel is one or two pixels and the histology the model learns from is gone); pass with "
                f"--image the full-resolution H&E that was given to Space Ranger (its --image; typically "
                f"0.2-0.5 um/px, tens of thousands of pixels wide)")


def image_target_name(path):
    """he-raw.<ext> for an input image (TIFF kept as TIFF, OME-TIFF as OME-TIFF)."""
    name = Path(path).name.lower()
    if name.endswith(OME_SUFFIXES):
        return "he-raw.ome.tif"
    if name.endswith(TIFF_SUFFIXES):
        return "he-raw.tif"
    suffix = Path(name).suffix
    if suffix in OTHER_SUFFIXES:
        return OTHER_SUFFIXES[suffix]
    raise InputError(f"{path}: unsupported image format {suffix or '(no extension)'}; give the H&E as TIFF/OME-TIFF "
                     f"(.tif, .tiff, .btf), JPEG or PNG (convert other whole-slide formats to TIFF first, e.g. with "
                     f"vips or QuPath)")


def open_target_image(path):
    """The --image of a conversion, checked: (path, its he-raw.* name, (height, width))."""
    image = Path(path)
    refuse_downscaled(image)
    return image, image_target_name(image), image_shape(image)


def image_shape(path):
    """(height, width) of an image from its header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; pass the full-resolution H&E with --image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; copy the H&E image again")
    name = path.name.lower()
    try:
        if name.endswith(TIFF_SUFFIXES + OME_SUFFIXES):
            import tifffile
            with tifffile.TiffFile(path) as tf:
                s = tf.series[0]
                axes, shape = s.axes, s.shape
            if "Y" not in axes or "X" not in axes:
                raise ValueError(f"axes {axes}")
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except InputError:
        raise
    except Exception as e:  # readers raise many types for damaged files
        raise InputError(f"{path}: cannot read the image header ({type(e).__name__}: {str(e)[:100]}); give a "
                         f"complete TIFF, JPEG or PNG") from None


def place_image(out, src, final, mode):
    """Put the H&E at `final` (inside DIR) by hard link (falls back to a copy), copy or symbolic link."""
    src, final = Path(src), Path(final)
    if final.exists() and os.path.samefile(src, final):
        log.info("%s is already in place", final)
        return
    tmp = out.path(final)
    if mode == "symlink":
        os.symlink(os.path.abspath(src), tmp)
        return
    if mode == "hardlink":
        try:
            os.link(src, tmp)
            return
        except OSError as e:
            log.info("cannot hard-link %s (%s); copying it", src, e.strerror or e)
    log.info("copying %s (%.1f MB) to %s", src, src.stat().st_size / 2 ** 20, final.name)
    shutil.copyfile(src, tmp)


def check_pixel_size(ps, image, how):
    lo, hi = PIXEL_SIZE_RANGE_UM
    if not (np.isfinite(ps) and lo <= ps <= hi):
        raise InputError(f"{image}: its pixel size comes out as {ps:.4g} um/px ({how}), outside {lo}-{hi} um/px; "
                         f"{'this image is far too coarse: pass the full-resolution H&E with --image' if ps > hi else 'check the inputs'}"
                         f" (or give the pixel size with --pixel-size if you know it)")
    return float(ps)


def check_inside(image, shape, x, y, what, tolerance=0.01):
    """Error when more than `tolerance` of the points fall outside the image (a wrong or downscaled image)."""
    h, w = shape
    inside = (x >= 0) & (y >= 0) & (x < w) & (y < h)
    frac_out = 1.0 - float(inside.mean()) if len(x) else 0.0
    if frac_out > tolerance:
        raise InputError(f"{image}: {frac_out:.0%} of the {len(x)} {what} fall outside this {w} x {h} px image "
                         f"(x up to {np.max(x):.0f}, y up to {np.max(y):.0f} px); the coordinates are in pixels of the "
                         f"full-resolution image used by the 10x software: pass that image with --image")
    if not inside.all():
        log.warning("%d of %d %s fall outside the image and are dropped", int((~inside).sum()), len(x), what)
    return inside


# ----------------------------------------------------------------------------------------------------
# affine geometry


def fit_affine(src, dst):
    """Least-squares dst = src @ A.T + t. Returns (A (2x2), t (2,), rms residual in dst units)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    D = np.column_stack([src, np.ones(len(src))])
    B, *_ = np.linalg.lstsq(D, dst, rcond=None)
    res = dst - D @ B
    return B[:2].T, B[2], float(np.sqrt(np.mean(np.sum(res ** 2, axis=1))))


def affine_scale(A):
    """(geometric mean scale sqrt|det A|, anisotropy = ratio of singular values)."""
    s = np.linalg.svd(np.asarray(A, dtype=np.float64), compute_uv=False)
    return float(math.sqrt(abs(np.linalg.det(A)))), float(s[0] / s[1]) if s[1] > 0 else float("inf")


def lattice_pixel_size(col, row, x, y, dx_um, dy_um, path, what):
    """um/px from an array lattice: column step dx_um, row step dy_um (physical) vs their pixel positions.

    Returns (pixel size, report dict) or (None, reason) when the array does not determine it."""
    col = np.asarray(col, dtype=np.float64)
    row = np.asarray(row, dtype=np.float64)
    uv = np.column_stack([col * dx_um, row * dy_um])
    if len(uv) < 3 or np.linalg.matrix_rank(uv - uv.mean(0)) < 2:
        return None, {"reason": "fewer than 3 non-collinear array positions"}
    A, t, rms_px = fit_affine(uv, np.column_stack([x, y]))
    px_per_um, aniso = affine_scale(A)
    ps = 1.0 / px_per_um
    rotation = math.degrees(math.atan2(A[1, 0], A[0, 0]))
    rep = {"pixel_size_um": ps, "anisotropy": aniso, "rotation_deg": rotation, "rms_residual_um": rms_px * ps,
           "n_points": int(len(uv))}
    if aniso > 1.03:
        log.warning("%s: the %s lattice is stretched by %.1f%% between its axes in the image; the pixel size is "
                    "their geometric mean", Path(path).name, what, (aniso - 1) * 100)
    if rms_px * ps > 0.1 * min(dx_um, dy_um):
        log.warning("%s: the %s positions deviate from a regular lattice by %.1f um (rms); check that the positions "
                    "and the image belong together", Path(path).name, what, rms_px * ps)
    return ps, rep


# ----------------------------------------------------------------------------------------------------
# output directory and the raw layout


def prepare_directory(directory, image_name, counts_name, writes_truth):
    """Create DIR; refuse when it already holds raw-layout files of another data set that ours would not replace."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a directory; pass a folder for --directory")
    if directory.is_dir():
        ours = {image_name, counts_name, "locs-raw.tsv"}
        others = [n for n in (*IMAGE_NAMES, *COUNTS_NAMES, *LOCS_NAMES) if n not in ours and (directory / n).exists()]
        if not writes_truth and (directory / "truth" / "super.h5ad").exists():
            others.append("truth/super.h5ad")
        if others:
            raise InputError(f"{directory}: already holds {', '.join(others)} of another data set, which would sit "
                             f"beside the converted files; remove them or pass an empty or new folder for --directory")
    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"{directory}: no write permission; make it writable or pass another --directory")
    return directory


def counts_name_for(fmt, n_spots, n_genes):
    if fmt == "auto":
        fmt = "tsv" if n_spots * n_genes <= TSV_LIMIT else "h5ad"
    return "cnts.tsv.gz" if fmt == "tsv" else "cnts.h5ad"


def _write_counts_tsv_gz(path, ids, genes, X, rows_per_chunk=2000):
    """Dense TSV (spot, gene columns) gzipped with mtime 0 (byte-identical reruns), written in chunks."""
    X = sparse.csr_matrix(X)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(("spot\t" + "\t".join(genes) + "\n").encode())
        for i in range(0, X.shape[0], rows_per_chunk):
            block = pd.DataFrame(X[i:i + rows_per_chunk].toarray(), columns=list(genes))
            block.insert(0, "spot", list(ids[i:i + rows_per_chunk]))
            gz.write(block.to_csv(sep="\t", index=False, header=False).encode())


def _write_counts_h5ad(path, ids, genes, X, gene_ids=None):
    import anndata
    var = pd.DataFrame(index=pd.Index(list(genes)))
    if gene_ids is not None:
        var["gene_ids"] = [str(g) for g in gene_ids]
    ad = anndata.AnnData(X=sparse.csr_matrix(X, dtype=np.int32), obs=pd.DataFrame(index=pd.Index(list(ids))), var=var)
    ad.write_h5ad(path)


def write_raw_layout(out, directory, *, image, image_name, image_mode, pixel_size, ids, genes, X, x, y, radius_raw,
                     section, counts_name, gene_ids=None):
    """Write the raw layout into DIR through StagedOutputs `out`."""
    directory = Path(directory)
    ids = [str(i) for i in ids]
    genes = [str(g) for g in genes]
    place_image(out, image, directory / image_name, image_mode)
    out.write_text(directory / "pixel-size-raw.txt", f"{pixel_size:.8g}\n")
    out.write_text(directory / "radius-raw.txt", f"{radius_raw:.6f}\n")
    if counts_name.endswith(".h5ad"):
        _write_counts_h5ad(out.path(directory / counts_name), ids, genes, X, gene_ids)
    else:
        _write_counts_tsv_gz(out.path(directory / counts_name), ids, genes, X)
    locs = pd.DataFrame({"spot": ids, "x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64)})
    locs.to_csv(out.path(directory / "locs-raw.tsv"), sep="\t", index=False, float_format="%.4f")
    out.write_text(directory / "section.json", json.dumps(section) + "\n")


# ----------------------------------------------------------------------------------------------------
# 8 um truth and pseudo-Visium spots


def superpixel_of(x_raw, y_raw, pixel_size):
    """(row, col) of the super-pixel holding raw-pixel point (x, y): [8 row, 8 row + 8) um from the top-left."""
    f = pixel_size / SUPER_PIXEL_UM
    return (np.floor(np.asarray(y_raw, np.float64) * f).astype(np.int64),
            np.floor(np.asarray(x_raw, np.float64) * f).astype(np.int64))


def aggregate_to_superpixels(keys, X, grid_shape):
    """Sum rows of X (n x G) into super-pixels given linear keys (row * cols + col); keys < 0 are dropped.

    Returns (rows, cols, truth CSR) in row-major super-pixel order (the order of np.nonzero(mask))."""
    keys = np.asarray(keys, dtype=np.int64)
    ok = keys >= 0
    uk, inv = np.unique(keys[ok], return_inverse=True)
    S = sparse.csr_matrix((np.ones(int(ok.sum()), np.int64), (inv, np.flatnonzero(ok))), shape=(len(uk), X.shape[0]))
    T = (S @ sparse.csr_matrix(X)).tocsr()
    T.sum_duplicates()
    return uk // grid_shape[1], uk % grid_shape[1], T


def make_pseudo_spots(truth, rows, cols, grid_shape, image_hw, pixel_size, seed):
    """Pseudo-Visium spots (55 um, 100 um hexagonal lattice) summed from the 8 um truth, as utils/simulate.py does
    (utils.truth.pseudo_visium_spots, footprint radius as the pipeline derives it from radius-raw.txt); at least 3.

    Returns dict(ids, x, y (raw px, rounded as written), counts CSR, array_col, array_row, radius_raw)."""
    spots = pseudo_visium_spots(truth, rows, cols, grid_shape, image_hw, pixel_size, seed)
    if len(spots["ids"]) < 3:
        raise InputError(f"only {len(spots['ids'])} pseudo-Visium spot(s) of 55 um fit on the measured tissue inside "
                         f"the image; at least 3 are needed (is the image the one that covers the measured region?)")
    return spots


def write_truth(out, directory, truth, rows, cols, genes, pixel_size, image_hw, source, uns=None, gene_ids=None):
    """truth/super.h5ad (one observation per super-pixel: obs row, col, x, y = centre in raw px; X counts as int32
    CSR; var gene_ids when given; uns source, then `uns`) and truth/mask.png (255 = super-pixels holding truth),
    in the layout utils/simulate.py writes (utils.truth.write_truth_h5ad)."""
    var = {"gene_ids": [str(g) for g in gene_ids]} if gene_ids is not None else None
    return write_truth_h5ad(out, directory, sparse.csr_matrix(truth, dtype=np.int32), rows, cols, genes, pixel_size,
                            image_hw, uns={"source": source, **(uns or {})}, var=var)


def section_record(source, technology, tissue, ids, genes, array_x, array_y, conversion):
    return {"source": source, "technology": technology, "tissue": tissue, "spots": int(len(ids)),
            "genes": int(len(genes)), "array_x": [int(v) for v in array_x], "array_y": [int(v) for v in array_y],
            "conversion": conversion}
