"""Spot lattice geometry derived from the coordinates alone, and the denser HR pseudo-spots.

Hexagonal (Visium), square (ST) and irregular layouts are told apart by the angles of the
nearest-neighbour vectors: six-fold symmetry concentrates exp(6i theta), four-fold exp(4i theta)."""
import numpy as np
from scipy.spatial import Delaunay, cKDTree

from ..core.errors import InputError

NEIGHBOUR_TOL = 1.25     # neighbours lie within this many nearest-neighbour spacings
ORDER_THRESHOLD = 0.8    # circular concentration above which a lattice is called regular


def nearest_neighbour_spacing(xy):
    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    return float(np.median(d[:, 1])), d[:, 1]


def neighbour_pairs(xy, max_dist):
    tree = cKDTree(xy)
    pairs = np.array(sorted(tree.query_pairs(max_dist)), dtype=np.int64).reshape(-1, 2)
    return pairs


def _spans_lattice_axes(theta, orient, n_axes, share=0.1) -> bool:
    """True when the neighbour directions populate each of the lattice's n_axes axes (mod 180 degrees),
    so that a line of spots (one axis) is never called a 2-D lattice."""
    step = np.pi / n_axes
    d = np.mod(theta - orient, np.pi)  # direction relative to the first axis, mod 180 degrees
    axis = np.round(d / step).astype(int) % n_axes
    near = np.abs(d - np.round(d / step) * step) < np.radians(15)
    counts = np.bincount(axis[near], minlength=n_axes)
    return len(theta) > 0 and bool((counts >= share * len(theta)).all())


def describe_lattice(xy):
    """Kind ('hexagonal' | 'square' | 'irregular'), spacing (px) and orientation (degrees)."""
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 3:
        raise InputError(f"only {len(xy)} spots: at least 3 are needed to derive the spot lattice")
    spacing, nn = nearest_neighbour_spacing(xy)
    if spacing <= 0:
        raise InputError("two or more spots share the same location; every spot needs its own x, y")
    pairs = neighbour_pairs(xy, NEIGHBOUR_TOL * spacing)
    v = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    theta = np.arctan2(v[:, 1], v[:, 0])
    r6 = np.abs(np.mean(np.exp(6j * theta))) if len(theta) else 0.0
    r4 = np.abs(np.mean(np.exp(4j * theta))) if len(theta) else 0.0
    cv = float(np.std(nn) / spacing)
    if r6 >= ORDER_THRESHOLD and cv < 0.2:
        kind, orient = "hexagonal", np.degrees(np.angle(np.mean(np.exp(6j * theta))) / 6)
    elif r4 >= ORDER_THRESHOLD and cv < 0.2:
        kind, orient = "square", np.degrees(np.angle(np.mean(np.exp(4j * theta))) / 4)
    else:
        kind, orient = "irregular", 0.0
    if kind != "irregular" and not _spans_lattice_axes(theta, np.radians(orient), 3 if kind == "hexagonal" else 2):
        kind, orient = "irregular", 0.0  # e.g. collinear spots: one direction has perfect 6- and 4-fold order
    degree = np.bincount(pairs.ravel(), minlength=len(xy)) if len(pairs) else np.zeros(len(xy), int)
    return {
        "kind": kind,
        "spacing_px": spacing,
        "orientation_deg": float(orient),
        "hex_order": float(r6),
        "square_order": float(r4),
        "spacing_cv": cv,
        "median_neighbours": float(np.median(degree)),
        "n_spots": int(len(xy)),
    }


def _square_cells(xy, pairs, spacing):
    """Quadruples of spots forming a unit cell of a square lattice (for the cell-centre pseudo-spot)."""
    tree = cKDTree(xy)
    diag = np.array(sorted(tree.query_pairs(NEIGHBOUR_TOL * spacing * np.sqrt(2))), dtype=np.int64).reshape(-1, 2)
    if len(diag) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    d = np.linalg.norm(xy[diag[:, 1]] - xy[diag[:, 0]], axis=1)
    diag = diag[(d > 1.2 * spacing) & (d < 1.6 * spacing)]
    # a cell has two diagonals sharing the same midpoint; group diagonals by midpoint
    mid = (xy[diag[:, 0]] + xy[diag[:, 1]]) / 2
    key = np.round(mid / (0.25 * spacing)).astype(np.int64)
    order = np.lexsort((key[:, 1], key[:, 0]))
    cells = []
    for a, b in zip(order[:-1], order[1:]):
        if (key[a] == key[b]).all() and np.linalg.norm(mid[a] - mid[b]) < 0.2 * spacing:
            cells.append([*diag[a], *diag[b]])
    return np.array(cells, dtype=np.int64).reshape(-1, 4)


def hr_pseudo_spots(xy, lattice):
    """Pseudo-spots at half spacing between measured neighbours.

    Returns (positions (m, 2), sources: list of index arrays into xy whose mean is each pseudo-spot)."""
    xy = np.asarray(xy, dtype=np.float64)
    spacing = lattice["spacing_px"]
    if lattice["kind"] == "irregular":
        if len(xy) >= 4:
            try:
                tri = Delaunay(xy)
                edges = np.concatenate([tri.simplices[:, [0, 1]], tri.simplices[:, [1, 2]], tri.simplices[:, [0, 2]]])
                edges = np.unique(np.sort(edges, axis=1), axis=0)
            except Exception:  # collinear points: fall back to neighbour pairs
                edges = neighbour_pairs(xy, 1.5 * spacing)
        else:
            edges = neighbour_pairs(xy, 1.5 * spacing)
        length = np.linalg.norm(xy[edges[:, 1]] - xy[edges[:, 0]], axis=1)
        # long Delaunay edges span gaps or the convex hull, not neighbours
        pairs = edges[length <= 1.5 * np.median(length)] if len(length) else edges
    else:
        pairs = neighbour_pairs(xy, NEIGHBOUR_TOL * spacing)
    sources = [p for p in pairs]
    if lattice["kind"] == "square":
        sources += [c for c in _square_cells(xy, pairs, spacing)]
    if not sources:
        return np.zeros((0, 2)), []
    pos = np.stack([xy[s].mean(axis=0) for s in sources])
    return pos, sources


def interpolate_counts(counts, sources):
    """Mean counts of each pseudo-spot's source spots (counts: spots x genes)."""
    import scipy.sparse as sp
    if not sources:
        return np.zeros((0, counts.shape[1]), dtype=np.float32)
    rows = np.concatenate([np.full(len(s), i) for i, s in enumerate(sources)])
    cols = np.concatenate(sources)
    vals = np.concatenate([np.full(len(s), 1.0 / len(s)) for s in sources])
    W = sp.csr_matrix((vals, (rows, cols)), shape=(len(sources), counts.shape[0]))
    return np.asarray(W @ counts, dtype=np.float32)
