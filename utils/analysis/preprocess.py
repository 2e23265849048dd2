"""The expression every analysis step reads: counts per observation normalised to the median total,
then log1p, in place (scanpy), so the slide-sized matrix is held once."""
import logging

import numpy as np

log = logging.getLogger("trihrge")


def normalise_log(adata, *, target_sum: float = None) -> None:
    """Normalise each observation to `target_sum` counts (default: the median total) and log1p, in
    place on adata.X (float32).

    Parameters
    ----------
    adata
        Observations (super-pixels or spots) x genes, predicted counts in X.
    target_sum
        Total counts after normalisation; None for the median total over observations.
    """
    import scanpy as sc
    X = adata.X   # a file rewritten by scanpy may hold a sparse X
    adata.X = (X.toarray() if hasattr(X, "toarray") else np.asarray(X)).astype(np.float32, copy=False)
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
