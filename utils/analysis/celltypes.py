"""Cell types from marker genes: one score per cell type (scanpy.tl.score_genes over its predicted
markers), the arg-max label, and a confidence (the margin of the best score over the second).

The built-in panel (`--markers breast`) uses canonical markers of the cell types of breast tissue, as
used in the single-cell breast cancer atlas of Wu et al. (Nat Genet 2021) and the Human Protein Atlas
cell-type enrichment: epithelial / tumour (EPCAM, KRT8, KRT18, KRT19, CDH1), T cells (CD3D, CD3E,
CD3G, CD2, TRAC), B cells (MS4A1, CD79A, CD79B, CD19), myeloid (CD68, CD14, LYZ, CD163, AIF1),
fibroblasts (COL1A1, COL1A2, COL3A1, DCN, LUM), endothelial (PECAM1, VWF, CDH5, CLDN5, PLVAP),
adipocytes (ADIPOQ, PLIN1, LEP, CIDEA)."""
import logging

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..scverse.keys import Key
from .genesets import score

log = logging.getLogger("trihrge")

BREAST_PANEL = {
    "epithelial": ["EPCAM", "KRT8", "KRT18", "KRT19", "CDH1"],
    "T_cell": ["CD3D", "CD3E", "CD3G", "CD2", "TRAC"],
    "B_cell": ["MS4A1", "CD79A", "CD79B", "CD19"],
    "myeloid": ["CD68", "CD14", "LYZ", "CD163", "AIF1"],
    "fibroblast": ["COL1A1", "COL1A2", "COL3A1", "DCN", "LUM"],
    "endothelial": ["PECAM1", "VWF", "CDH5", "CLDN5", "PLVAP"],
    "adipocyte": ["ADIPOQ", "PLIN1", "LEP", "CIDEA"],
}
PANELS = {"breast": BREAST_PANEL}


def panel_table(panel: dict, genes) -> pd.DataFrame:
    """The panel as used: cell_type, gene, predicted (whether the run predicts that gene)."""
    known = set(genes)
    rows = [(t, g, g in known) for t, members in panel.items() for g in members]
    return pd.DataFrame(rows, columns=[Key.CELL_TYPE, "gene", "predicted"])


def report_missing(table: pd.DataFrame, *, source: str) -> None:
    """One log line per cell type with markers that are not predicted (never silently dropped), or
    one line when the run predicts none of the panel's markers."""
    if not table["predicted"].any():     # e.g. the built-in panel on a run of other genes
        log.warning("%s: none of its %d markers is predicted by this run (its genes are get_HR.py's selection); no "
                    "cell typing; give --markers FILE with genes of the run", source, len(table))
        return
    for t, part in table.groupby(Key.CELL_TYPE, sort=False):
        missing = part.loc[~part["predicted"], "gene"].tolist()
        if missing:
            log.warning("%s: cell type %s: %d of %d markers not predicted (%s)%s", source, t, len(missing),
                        len(part), ", ".join(missing), "; the type is not scored" if len(missing) == len(part) else "")


def score_cell_types(adata, *, panel: dict, seed: int = 0) -> list:
    """obs['score_<type>'] per cell type with at least one predicted marker, obs['cell_type'] (the
    best-scoring type, 'unassigned' where no score is above 0, i.e. no type's markers exceed their
    expression-matched control genes) and obs['cell_type_confidence'] (best minus second-best score;
    the best score when only one type is scored). Returns the cell types scored.

    Parameters
    ----------
    adata
        Log-normalised expression.
    panel
        {cell type: [marker genes]}; genes not in var_names are skipped (panel_table reports them).
    seed
        Random state of the control-gene draws.
    """
    known = set(adata.var_names)
    scored = {t: [g for g in members if g in known] for t, members in panel.items()}
    scored = {t: g for t, g in scored.items() if g}
    if not scored:
        raise InputError("no marker of any cell type is predicted")
    keys = [Key.CELL_TYPE_SCORE.format(t) for t in scored]
    for t, key in zip(scored, keys):
        score(adata, genes=scored[t], key=key, seed=seed)
    S = adata.obs[keys].to_numpy(np.float64)
    order = np.argsort(-S, axis=1)
    best = S[np.arange(len(S)), order[:, 0]]
    second = S[np.arange(len(S)), order[:, 1]] if S.shape[1] > 1 else np.zeros(len(S))
    names = list(scored) + [Key.UNASSIGNED]
    codes = np.where(best > 0, order[:, 0], len(scored))
    adata.obs[Key.CELL_TYPE] = pd.Categorical.from_codes(codes, categories=names)
    adata.obs[Key.CELL_TYPE_CONFIDENCE] = (best - second).astype(np.float32)
    counts = adata.obs[Key.CELL_TYPE].value_counts()
    log.info("cell types: %s", ", ".join(f"{t} {counts[t] / len(S):.1%}" for t in names))
    return list(scored)
