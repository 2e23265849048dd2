"""10x feature-barcode matrices (HDF5 or Matrix Market) as one Matrix of Gene Expression features."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.errors import InputError
from ..core.raw_io import examples
from .constants import GENE_EXPRESSION
from .tables import decode, make_unique

log = logging.getLogger("trihrge")


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
                             f"({examples(missing)}); give the matrix of the same run")
        return self.X[pos]


def _finish_matrix(path, barcodes, names, ids, types, X):
    n_bc, n_feat = X.shape
    if len(barcodes) != n_bc or not len(names) == len(ids) == len(types) == n_feat:
        raise InputError(f"{path}: the matrix is {n_feat} features x {n_bc} barcodes but lists {len(names)} feature "
                         f"names, {len(ids)} ids, {len(types)} types and {len(barcodes)} barcodes; the file is "
                         f"damaged, copy it again")
    types = np.asarray(types, dtype=object)
    keep = np.flatnonzero(types == GENE_EXPRESSION)
    if keep.size == 0:
        raise InputError(f"{path}: no '{GENE_EXPRESSION}' feature (feature types: {examples(sorted(set(types)))}); "
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
    genes = make_unique(_named(np.asarray(names, dtype=object), np.asarray(ids, dtype=object), path)[keep], path)
    bc = pd.Index(decode(barcodes))
    if bc.duplicated().any():
        raise InputError(f"{path}: duplicated barcodes ({examples(bc[bc.duplicated()].unique())}); the file is damaged")
    return Matrix(bc, genes, np.asarray(ids, dtype=object)[keep], X, path)


def _named(names, ids, path):
    """Feature names with an empty one replaced by its feature id (pandas would write it as "Unnamed: N"):
    the id names the same gene, so the conversion goes on, with a warning; refused when the id is empty too."""
    blank = np.flatnonzero(pd.Index(names, dtype=object).astype(str).str.strip() == "")
    if blank.size == 0:
        return names
    no_id = [int(i) for i in blank if not str(ids[i]).strip()]
    if no_id:
        raise InputError(f"{path}: feature(s) {examples(no_id)} (0-based) have neither a name nor an id; the file "
                         f"is damaged, copy it again from the 10x software's output")
    log.warning("%s: %d feature(s) without a name take their feature id as name (%s)", Path(path).name, blank.size,
                examples([f"#{i} -> {ids[i]}" for i in blank]))
    names = names.copy()
    names[blank] = ids[blank]
    return names


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
            raise InputError(f"{path}: no 'matrix' group (found {examples(list(f.keys()))}); give a 10x feature-barcode "
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
        shape = np.atleast_1d(g["shape"][()])
        data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
        barcodes = g["barcodes"][:]
        names = decode(g["features/name"][:])
        ids = decode(g["features/id"][:])
        types = decode(g["features/feature_type"][:])
    X = _barcodes_by_features(path, data, indices, indptr, shape)
    return _finish_matrix(path, barcodes, names, ids, types, X)


def _barcodes_by_features(path, data, indices, indptr, shape):
    """The stored CSC by barcode (genes x barcodes) as CSR of barcodes x genes, its structure checked in full:
    a truncated or edited file would otherwise give a traceback or silently wrong counts."""
    def damaged(problem):
        return InputError(f"{path}: damaged feature-barcode matrix ({problem}); copy the file again from the 10x "
                          f"software's output (Space Ranger's outs/, the Xenium output folder)")
    if len(shape) != 2:
        raise damaged(f"matrix/shape holds {len(shape)} value(s), not 2")
    try:
        n_feat, n_bc = (int(v) for v in shape)
        X = sparse.csr_matrix((data, indices, indptr), shape=(n_bc, n_feat))
        X.check_format(full_check=True)   # indices in range, indptr non-decreasing
    except (ValueError, TypeError) as e:
        raise damaged(str(e)[:120]) from None
    if len(data) != indptr[-1]:   # scipy drops a tail past indptr[-1]: values that belong to no barcode
        raise damaged(f"{len(data)} values where indptr ends at {indptr[-1]}")
    return X


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
        feats = pd.read_csv(f_p, sep="\t", header=None, dtype=str, keep_default_na=False)   # "" and "NA" stay names
        bcs = pd.read_csv(b_p, sep="\t", header=None, dtype=str)[0].to_numpy()
    except Exception as e:
        raise InputError(f"{folder}: cannot read the Matrix Market folder ({type(e).__name__}: {str(e)[:100]}); "
                         f"copy it again") from None
    if feats.shape[1] < 2:
        raise InputError(f"{f_p}: {feats.shape[1]} column(s); features.tsv needs the feature id and name columns (and "
                         f"the feature type), tab-separated, as Space Ranger writes them: copy the folder again")
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
