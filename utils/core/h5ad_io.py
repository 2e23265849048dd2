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
