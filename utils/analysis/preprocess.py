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
    import warnings

    import scanpy as sc
    X = adata.X   # a file rewritten by scanpy may hold a sparse X
    adata.X = (X.toarray() if hasattr(X, "toarray") else np.asarray(X)).astype(np.float32, copy=False)
    if empty := int((adata.X.sum(axis=1) == 0).sum()):   # e.g. a spot off the tissue mask: no super-pixel of its own
        log.info("%d of the %d observations have no predicted counts; they stay at 0", empty, adata.n_obs)
    with warnings.catch_warnings():   # scanpy's 'Some cells have zero counts', said above in our words
        warnings.filterwarnings("ignore", message="Some cells have zero counts")
        sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
