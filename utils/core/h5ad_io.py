"""Opening an .h5ad file: anything h5py or anndata cannot read (truncated, foreign, not HDF5 at all)
is one error line naming the file, its exception type and the fix."""
from pathlib import Path
from typing import NamedTuple

from .errors import InputError


def read_anndata(path, fix: str, *, damaged: bool = True):
    """anndata.read_h5ad(path), or InputError `PATH: cannot be read as AnnData (Type[; truncated or
    damaged]); FIX` (damaged: the file is one we or a stage wrote, so it is damaged, not foreign)."""
    import warnings

    import anndata
    try:
        with warnings.catch_warnings():   # repeated names: refused (or allowed) by the caller, in its own words
            warnings.filterwarnings("ignore", message="(Variable|Observation) names are not unique")
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
    """A run's super-res.h5ad as scoring reads it: each observation's super-pixel (row, col) and
    predicted counts in X (check_predicted_counts); else one InputError naming path."""
    ad = read_anndata(path, fix)
    if ad.n_obs == 0 or ad.n_vars == 0:
        raise InputError(f"{path}: {ad.n_obs} observation(s) x {ad.n_vars} gene(s), nothing to score; {fix}")
    check_grid_positions(ad, path, fix)
    check_predicted_counts(ad, path, fix)
    return ad


def check_predicted_counts(ad, path, fix: str) -> None:
    """X holds a run's predicted counts: unique gene names, not log-transformed, finite, not negative
    (scaled?) and not all zero."""
    from .raw_io import examples
    if ad.X is None:
        raise InputError(f"{path}: has no X (the predicted counts); {fix}")
    if ad.var_names.duplicated().any():
        raise InputError(f"{path}: duplicated gene names ({examples(ad.var_names[ad.var_names.duplicated()].unique())}); "
                         f"make them unique (or {fix})")
    check_counts(ad, path)
    values = check_finite_values(ad, path, fix)
    if values.negative:
        raise InputError(f"{path}: X holds {values.negative} negative value(s) (scaled, e.g. sc.pp.scale?); put the "
                         f"predicted counts back into X (or {fix})")
    if not values.positive:
        raise InputError(f"{path}: every value of X is zero; {fix}")


def check_counts(ad, path) -> None:
    """X must hold the predicted counts: a run whose X scanpy log-transformed (uns['log1p'], the usual
    normalize_total + log1p before write_h5ad) would be scored and analysed as counts, wrongly."""
    if "log1p" in ad.uns:
        where = "layers['counts'] back into X" if "counts" in ad.layers else "the counts back into X (rerun HISTEX.py)"
        raise InputError(f"{path}: X holds log-transformed values (uns['log1p'] is set: scanpy's log1p); put {where} "
                         f"and write the file again")


class Values(NamedTuple):
    negative: int   # how many values of X are below 0
    positive: bool  # whether any is above 0


def check_finite_values(ad, path, fix: str) -> Values:
    """X holds no NaN or infinity (checked in row chunks: no full-size temporary); returns what the
    same pass saw of its signs."""
    import numpy as np
    from scipy import sparse

    from .chunks import row_chunks
    X = ad.X
    blocks = [X.data] if sparse.issparse(X) else (np.asarray(X[s]) for s in row_chunks(*X.shape))  # sparse: stored values
    bad = negative = 0
    positive = False
    for b in blocks:
        bad += int((~np.isfinite(b)).sum())
        negative += int((b < 0).sum())
        positive = positive or bool((b > 0).any())
    if bad:
        raise InputError(f"{path}: X holds {bad} NaN or infinite value(s); {fix}")
    return Values(negative, positive)
