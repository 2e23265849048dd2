"""Opening an .h5ad file: anything h5py or anndata cannot read (truncated, foreign, not HDF5 at all)
is one error line naming the file, its exception type and the fix."""
from pathlib import Path

from .errors import InputError


def read_anndata(path, fix: str, *, damaged: bool = True):
    """anndata.read_h5ad(path), or InputError `PATH: cannot be read as AnnData (Type[; truncated or
    damaged]); FIX` (damaged: the file is one we or a stage wrote, so it is damaged, not foreign)."""
    import anndata
    try:
        return anndata.read_h5ad(Path(path))
    except Exception as e:  # h5py/anndata raise many types for truncated or foreign files
        why = f"{type(e).__name__}; truncated or damaged" if damaged else type(e).__name__
        raise InputError(f"{path}: cannot be read as AnnData ({why}); {fix}") from None


def check_grid_positions(ad, path, fix: str) -> None:
    """obs row/col, each observation's super-pixel, must be whole numbers >= 0, one observation per
    super-pixel; they are stored back as int64 (a file rewritten by pandas or scanpy may hold them as
    float or category)."""
    import numpy as np
    for key in ("row", "col"):
        v = np.asarray(ad.obs[key].to_numpy()) if key in ad.obs else None
        if v is None or not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all() or (v < 0).any() \
                or (v != np.round(v)).any():
            raise InputError(f"{path}: obs '{key}' {'is missing' if v is None else 'is not whole numbers >= 0'} "
                             f"(the super-pixel of each observation); {fix}")
        ad.obs[key] = v.astype(np.int64)
    at = ad.obs[["row", "col"]]
    twice = at[at.duplicated()]
    if len(twice):
        r, c = twice.iloc[0]
        raise InputError(f"{path}: {len(twice)} observation(s) on a super-pixel that already has one (e.g. row {r}, "
                         f"col {c}; two sections concatenated?); give one observation per 8 um super-pixel")


def read_maps(path, fix: str):
    """A run's super-res.h5ad as scoring reads it: each observation's super-pixel (row, col), counts
    (not log-transformed) and finite values in X; else one InputError naming path."""
    ad = read_anndata(path, fix)
    check_grid_positions(ad, path, fix)
    check_counts(ad, path)
    check_finite_values(ad, path, fix)
    return ad


def check_counts(ad, path) -> None:
    """X must hold the predicted counts: a run whose X scanpy log-transformed (uns['log1p'], the usual
    normalize_total + log1p before write_h5ad) would be scored and analysed as counts, wrongly."""
    if "log1p" in ad.uns:
        where = "layers['counts'] back into X" if "counts" in ad.layers else "the counts back into X (rerun HISTEX.py)"
        raise InputError(f"{path}: X holds log-transformed values (uns['log1p'] is set: scanpy's log1p); put {where} "
                         f"and write the file again")


def check_finite_values(ad, path, fix: str) -> None:
    """X holds no NaN or infinity (checked in row chunks: no full-size temporary)."""
    import numpy as np

    from .chunks import row_chunks
    X = ad.X
    if hasattr(X, "data"):   # sparse: only the stored values
        bad = int((~np.isfinite(X.data)).sum())
    else:
        bad = sum(int((~np.isfinite(np.asarray(X[s]))).sum()) for s in row_chunks(*X.shape))
    if bad:
        raise InputError(f"{path}: X holds {bad} NaN or infinite value(s); {fix}")
