"""Genes and expression: cell-type profiles, smooth programmes the image cannot see, negative-binomial counts split over super-pixels."""
import math

import numpy as np
from tqdm import tqdm

from .constants import (
    CELL_TYPES,
    CELLS_PER_CHUNK,
    LIBRARY_SIZE,
    NB_DISPERSION,
    PROGRAMMES,
    T_EPI,
    T_TUM,
    TYPE_PREFIX,
    _rng,
)
from .world import Field


def make_genes(n_genes, seed):
    """Gene names, groups and per-type mean profiles (rows sum to 1), and the programme loadings."""
    rng = _rng(seed, 4)
    fr = {"HK": 0.08, **{p: 0.09 for p in TYPE_PREFIX}, **{p[0]: 0.06 for p in PROGRAMMES}}
    counts = {k: max(1, int(round(v * n_genes))) for k, v in fr.items()}
    while sum(counts.values()) > n_genes - 1:
        k = max(counts, key=counts.get)
        counts[k] -= 1
    counts["SHARED"] = n_genes - sum(counts.values())
    names, groups = [], []
    for grp in ["HK", *TYPE_PREFIX, *[p[0] for p in PROGRAMMES], "SHARED"]:
        k = counts[grp]
        width = max(2, len(str(k)))
        names += [f"{grp}_{i + 1:0{width}d}" for i in range(k)]
        groups += [grp] * k
    groups = np.array(groups)
    G, T = n_genes, len(CELL_TYPES)
    base = rng.gamma(0.6, 1.0, G) + 0.02
    prof = base[None, :] * np.exp(rng.normal(0, 0.35, (T, G)))
    hk = groups == "HK"
    prof[:, hk] = (rng.gamma(5.0, 1.0, hk.sum()) * 2.0)[None, :] * np.exp(rng.normal(0, 0.1, (T, hk.sum())))
    for t, pre in enumerate(TYPE_PREFIX):
        m = np.flatnonzero(groups == pre)
        fold = np.exp(rng.normal(math.log(15.0), 0.5, m.size))
        prof[:, m] *= 0.25
        prof[t, m] *= fold / 0.25
        if t == T_EPI:      # luminal markers partly shared by the tumour
            shared = m[rng.random(m.size) < 0.5]
            prof[T_TUM, shared] *= np.exp(rng.normal(math.log(15.0), 0.5, shared.size)) / 4.0 / 0.25
    shared = groups == "SHARED"
    prof[:, shared] *= np.exp(rng.normal(0, 0.8, (T, shared.sum())))
    loadings = np.zeros((G, len(PROGRAMMES)))
    programme_info = {}
    for k, (name, targets, _) in enumerate(PROGRAMMES):
        m = np.flatnonzero(groups == name)
        others = [t for t in range(T) if t not in targets]
        prof[np.ix_(targets, m)] *= 4.0
        if others:
            prof[np.ix_(others, m)] *= 0.5
        sign = np.where(rng.random(m.size) < 0.25, -1.0, 1.0)
        loadings[m, k] = sign * rng.uniform(0.7, 1.3, m.size)
        # a few marker genes of the target types follow the programme weakly
        markers = np.flatnonzero(np.isin(groups, [TYPE_PREFIX[t] for t in targets]))
        extra = markers[rng.random(markers.size) < 0.15]
        loadings[extra, k] += rng.uniform(0.25, 0.5, extra.size)
        programme_info[name] = {"genes": [names[i] for i in m],
                                "also_modulates": [names[i] for i in extra],
                                "target_cell_types": [CELL_TYPES[t] for t in targets],
                                "field_scale_um": None,
                                "loadings": {names[i]: round(float(loadings[i, k]), 4)
                                             for i in np.flatnonzero(loadings[:, k])}}
    prof /= prof.sum(1, keepdims=True)
    return names, groups, prof, loadings, programme_info


def programme_fields(seed, extent):
    rng = _rng(seed, 5)
    scales = [s * rng.uniform(0.9, 1.1) for _, _, s in PROGRAMMES]
    return [Field.random(rng, extent, s) for s in scales], scales


def simulate_expression(cells, pieces, prof, loadings, prog_fields, tissue_index, seed, progress=True):
    """Negative-binomial counts per cell, split multinomially over its super-pixel pieces.

    Returns (truth float32 array (n_tissue, G), cell totals, per-gene cell totals)."""
    ptr, piece_sp, piece_n, _ = pieces
    n, G = len(cells), prof.shape[1]
    n_tissue = int(tissue_index.max()) + 1 if tissue_index.size else 0
    truth = np.zeros((n_tissue, G), np.float32)
    totals = np.zeros(n, np.int64)
    gene_totals = np.zeros(G, np.int64)
    area = cells.ca * cells.cb
    mean_area = np.ones(len(CELL_TYPES))
    for t in range(len(CELL_TYPES)):
        m = cells.type == t
        if m.any():
            mean_area[t] = area[m].mean()
    shape = 1.0 / NB_DISPERSION
    piece_t = tissue_index.ravel()[piece_sp]
    if np.any(piece_t < 0):
        raise RuntimeError("internal error: a cell overlaps a super-pixel outside the tissue mask")
    for k, i0 in enumerate(tqdm(range(0, n, CELLS_PER_CHUNK), desc="expression", unit="chunk", disable=not progress)):
        rng = _rng(seed, 6, k)
        i1 = min(n, i0 + CELLS_PER_CHUNK)
        sl = slice(i0, i1)
        types = cells.type[sl]
        lib = np.array(LIBRARY_SIZE)[types] * (area[sl] / mean_area[types]) * np.exp(rng.normal(0, 0.2, i1 - i0))
        F = np.stack([f.at(cells.x[sl], cells.y[sl]) for f in prog_fields], 1)
        counts = _nb_counts(rng, lib, prof, types, F, loadings, shape)
        totals[sl] = counts.sum(1)
        gene_totals += counts.sum(0)
        # molecules -> pieces by inverse CDF on a cumulative array offset by the local cell index
        p0, p1 = ptr[i0], ptr[i1]
        pn = piece_n[p0:p1]
        local_cell = np.repeat(np.arange(i1 - i0), np.diff(ptr[i0:i1 + 1]))
        cum_n = np.cumsum(pn)
        cell_start = np.concatenate([[0], cum_n])[ptr[i0:i1] - p0]
        cell_total = np.add.reduceat(pn, ptr[i0:i1] - p0) if p1 > p0 else np.zeros(0)
        cumfrac = local_cell + (cum_n - cell_start[local_cell]) / cell_total[local_cell]
        ci, gi = np.nonzero(counts)
        nm = counts[ci, gi]
        mol_cell = np.repeat(ci, nm)
        mol_gene = np.repeat(gi, nm)
        if mol_cell.size == 0:
            continue
        u = rng.random(mol_cell.size)
        piece = np.searchsorted(cumfrac, mol_cell + u, side="right")
        # molecules counted per (super-pixel, gene) entry of truth: memory by molecules, not by the chunk's
        # span of super-pixels x genes (a bincount over that span took GBs at 20000 genes)
        entry, n_mol = np.unique(piece_t[p0 + piece] * G + mol_gene, return_counts=True)
        truth.reshape(-1)[entry] += n_mol.astype(np.float32)   # a view: truth is C-contiguous
    return truth, totals, gene_totals


def _nb_counts(rng, lib, prof, types, F, loadings, shape):
    """Negative-binomial counts (cells x genes) of mean library x type profile x exp(programmes), with at
    most two (cells x genes) arrays alive at a time: at 20000 genes each is 1.3 GB."""
    mu = lib[:, None] * prof[types]
    e = F @ loadings.T
    mu *= np.exp(e, out=e)
    del e
    mu /= shape
    lam = rng.gamma(shape, mu)
    del mu
    return rng.poisson(lam)
