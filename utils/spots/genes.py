"""Gene selection and the per-gene scaling used as the training target (min-max over spots, as iStar)."""
import logging
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.raw_io import unknown_names
from ..core.text_io import read_text

DEFAULT_N_GENES = 1000
log = logging.getLogger("trihrge")


def select_genes(X, genes, n_genes=None, gene_list=None, counts_path="cnts"):
    """Indices of the selected genes: those listed in gene_list, else the top n_genes by variance
    (None: iStar's 1000, or every gene of a smaller panel).

    Genes with zero variance over spots are never selected (there is nothing to learn)."""
    var = X.var(axis=0)
    if gene_list is not None:
        path = Path(gene_list)
        if not path.exists():
            raise InputError(f"{path}: gene list not found; give a text file with one gene name per line")
        text = read_text(path, "gene list (one gene name per line)")
        wanted = [g.strip() for g in text.splitlines() if g.strip() and not g.startswith("#")]
        if not wanted:
            raise InputError(f"{path}: the gene list is empty; write one gene name per line")
        pos = {g: i for i, g in enumerate(genes)}
        missing = [g for g in wanted if g not in pos]
        if missing:
            raise InputError(f"{path}: {len(missing)} listed gene(s) are not in {counts_path} "
                             f"({unknown_names(missing, genes)}); fix the names or drop them")
        idx = np.array(list(dict.fromkeys(pos[g] for g in wanted)), dtype=np.int64)
        flat = [genes[i] for i in idx if var[i] == 0]
        if len(flat) == len(idx):
            raise InputError(f"{path}: every listed gene has the same count in all spots; list genes that vary")
        if flat:
            log.warning("%s: %d listed gene(s) have the same count in every spot (%s%s): kept, but their maps are "
                        "flat and their accuracy undefined (NaN in genes-accuracy.tsv, left out of the summary)",
                        path.name, len(flat), ", ".join(flat[:5]), ", ..." if len(flat) > 5 else "")
        return idx, var
    if n_genes is None:
        n_genes = min(DEFAULT_N_GENES, len(genes))
    if n_genes < 1:
        raise InputError(f"--n-genes {n_genes}: must be at least 1")
    if n_genes > len(genes):
        raise InputError(f"--n-genes {n_genes}: larger than the {len(genes)} genes in {counts_path}; "
                         f"pass --n-genes {len(genes)} or fewer")
    varying = np.flatnonzero(var > 0)
    if len(varying) == 0:
        raise InputError(f"{counts_path}: no gene varies across spots; give the raw counts of the whole section")
    order = varying[np.argsort(-var[varying], kind="stable")]
    return order[:n_genes], var


def minmax_scaling(X):
    """Per-gene (min, max) over spots; target = (X - min) / (max - min)."""
    lo = X.min(axis=0)
    hi = X.max(axis=0)
    return lo.astype(np.float32), hi.astype(np.float32)


def scale_counts(X, lo, hi):
    rng = np.where(hi > lo, hi - lo, 1.0)
    return ((X - lo) / rng).astype(np.float32)
