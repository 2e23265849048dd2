"""Cells of the simulated tissue: lattices per region, duct rings, cell shapes, adipocytes, and the pieces of each cell on the super-pixel grid."""
import math

import numpy as np
from scipy.spatial import Voronoi

from ..core.geometry import SUPER_PIXEL_UM
from .constants import FAT, IMMUNE, STROMA, T_ADI, T_EPI, T_FIB, T_LYM, T_TUM, TUMOUR, _rng


def _jittered_lattice(rng, extent, spacing, jitter):
    dy = spacing * math.sqrt(3) / 2
    ny = int(extent / dy) + 2
    nx = int(extent / spacing) + 2
    j, i = np.mgrid[0:ny, 0:nx]
    off = rng.uniform(0, spacing, 2)
    x = i * spacing + (j % 2) * spacing / 2 + off[0] - spacing
    y = j * dy + off[1] - dy
    x = x.ravel() + rng.uniform(-jitter, jitter, x.size) * spacing
    y = y.ravel() + rng.uniform(-jitter, jitter, y.size) * spacing
    keep = (x >= 0) & (y >= 0) & (x < extent) & (y < extent)
    return x[keep], y[keep]


def _ellipse_perimeter(a, b):
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


class Cells:
    """Column arrays of every cell (um units), sorted by y."""
    FIELDS = ("x", "y", "type", "nx", "ny", "na", "nb", "nang", "ca", "cb", "cang", "hd",
              "vesic", "nucleoli", "has_nucleus", "poly")

    def __init__(self, **cols):
        for k, v in cols.items():
            setattr(self, k, v)

    def __len__(self):
        return len(self.x)


def make_cells(world, seed):
    """Every cell of the tissue (Cells), sorted by position: tumour, stroma and immune cells on
    jittered lattices thinned by region, the ducts' epithelial rings, and one adipocyte per lattice
    point of the fat."""
    rng = _rng(seed, 2)
    E = world.extent
    parts = []
    for place in (_tumour_cells, _stroma_cells, _immune_cells):
        x, y, types = place(world, rng)
        parts.append(_cell_shapes(world, rng, np.asarray(x, float), np.asarray(y, float), np.asarray(types, np.int64)))
    epithelium = _duct_epithelium(world, rng)
    if epithelium is not None:
        ex, ey, eang, eflat = epithelium
        parts.append(_cell_shapes(world, rng, ex, ey, np.full(len(ex), T_EPI), epi_angle=eang, epi_flat=eflat))
    # fat: adipocytes, one per jittered lattice point
    x, y = _jittered_lattice(rng, E, rng.uniform(48, 62), 0.22)
    keep = world.labels(x, y) == FAT
    parts.append(_cell_shapes(world, rng, x[keep], y[keep], np.full(int(keep.sum()), T_ADI)))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in Cells.FIELDS}
    # cells must lie inside the image with their whole ellipse (adipocytes are handled by Voronoi)
    r = np.maximum(cols["ca"], cols["cb"])
    ok = (cols["type"] == T_ADI) | ((cols["x"] - r >= 0) & (cols["y"] - r >= 0) &
                                    (cols["x"] + r < E) & (cols["y"] + r < E))
    cols = {k: v[ok] for k, v in cols.items()}
    order = np.lexsort((cols["x"], cols["y"]))
    return Cells(**{k: v[order] for k, v in cols.items()})


def _tumour_cells(world, rng):
    """Tumour nests: dense big atypical cells with some infiltrating lymphocytes and fibroblasts."""
    x, y = _jittered_lattice(rng, world.extent, 11.5, 0.30)
    keep = (world.labels(x, y) == TUMOUR) & (rng.random(x.size) < 0.97)
    x, y = x[keep], y[keep]
    u = rng.random(x.size)
    return x, y, np.where(u < 0.06, T_LYM, np.where(u < 0.085, T_FIB, T_TUM))


def _stroma_cells(world, rng):
    """Stroma: sparse fibroblasts and scattered lymphocytes, cellularity from a smooth field."""
    x, y = _jittered_lattice(rng, world.extent, 15.0, 0.35)
    p = np.clip(0.42 + 0.18 * world.f_cell.at(x, y), 0.15, 0.8)
    keep = (world.labels(x, y) == STROMA) & (rng.random(x.size) < p)
    x, y = x[keep], y[keep]
    return x, y, np.where(rng.random(x.size) < 0.16, T_LYM, T_FIB)


def _immune_cells(world, rng):
    """Immune aggregates: densely packed small lymphocytes."""
    x, y = _jittered_lattice(rng, world.extent, 6.6, 0.28)
    keep = (world.labels(x, y) == IMMUNE) & (rng.random(x.size) < 0.92)
    x, y = x[keep], y[keep]
    return x, y, np.where(rng.random(x.size) < 0.05, T_FIB, T_LYM)


def _duct_epithelium(world, rng):
    """(x, y, nucleus angle, flat) of the duct epithelium on the image: a luminal ring around each
    lumen and, in thick walls, a flat basal ring outside; None without ducts."""
    ex, ey, eang, eflat = [], [], [], []
    for cx, cy, a, b, ang, th, _ in world.ducts:
        la, lb = max(a - th, 1.0), max(b - th, 1.0)
        layers = [(la + 3.8, lb + 3.8, 7.0, 0)]
        if th >= 11:
            layers.append((a - 2.5, b - 2.5, 11.0, 1))
        for ra, rb, step, flat in layers:
            n = max(4, int(round(_ellipse_perimeter(ra, rb) / step)))
            t = (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
            px, py = ra * np.cos(t), rb * np.sin(t)
            nang = np.arctan2(np.sin(t) / rb, np.cos(t) / ra)   # outward normal in the duct frame
            c, s = math.cos(ang), math.sin(ang)
            ex.append(cx + px * c - py * s)
            ey.append(cy + px * s + py * c)
            eang.append(nang + ang + (np.pi / 2 if flat else 0.0))
            eflat.append(np.full(n, flat))
    if not ex:
        return None
    ex, ey, eang, eflat = map(np.concatenate, (ex, ey, eang, eflat))
    E = world.extent
    keep = (ex >= 0) & (ey >= 0) & (ex < E) & (ey < E)
    return ex[keep], ey[keep], eang[keep], eflat[keep]


def _cell_shapes(world, rng, x, y, types, epi_angle=None, epi_flat=None):
    n = x.size
    na = np.zeros(n)
    nb = np.zeros(n)
    nang = rng.uniform(0, np.pi, n)
    ca = np.zeros(n)
    cb = np.zeros(n)
    hd = np.zeros(n)
    vesic = np.zeros(n, bool)
    nucleoli = np.zeros(n, np.int64)
    has_nucleus = np.ones(n, bool)
    poly = np.zeros((n, 6))    # harmonic amplitudes (k=2,3,4) and phases of an irregular outline

    m = types == T_TUM
    k = m.sum()
    na[m] = rng.uniform(3.6, 6.0, k)
    nb[m] = na[m] * rng.uniform(0.62, 0.95, k)
    ca[m] = na[m] * rng.uniform(1.35, 1.6, k)
    cb[m] = nb[m] * rng.uniform(1.45, 1.75, k)
    hd[m] = rng.uniform(1.35, 2.2, k)
    vesic[m] = rng.random(k) < 0.55
    nucleoli[m] = rng.choice([0, 1, 1, 2], k)
    poly[m, :3] = rng.uniform(0, 1, (k, 3)) * np.array([0.10, 0.07, 0.05]) * (1 + (rng.random((k, 1)) < 0.25) * 1.2)
    poly[m, 3:] = rng.uniform(0, 2 * np.pi, (k, 3))

    m = (types != T_TUM) & (types != T_ADI)
    k = m.sum()
    poly[m, :3] = rng.uniform(0, 1, (k, 3)) * np.array([0.06, 0.04, 0.03])
    poly[m, 3:] = rng.uniform(0, 2 * np.pi, (k, 3))

    m = types == T_LYM
    k = m.sum()
    na[m] = rng.uniform(2.2, 3.0, k)
    nb[m] = na[m] * rng.uniform(0.85, 1.0, k)
    ca[m] = na[m] * 1.35
    cb[m] = nb[m] * 1.35
    hd[m] = rng.uniform(2.6, 3.3, k)

    m = types == T_FIB
    k = m.sum()
    na[m] = rng.uniform(4.0, 7.0, k)
    nb[m] = rng.uniform(1.0, 1.7, k)
    nang[m] = world.theta(x[m], y[m]) + rng.normal(0, 0.12, k)
    ca[m] = na[m] * 1.5
    cb[m] = nb[m] * 2.4
    hd[m] = rng.uniform(1.9, 2.6, k)

    m = types == T_EPI
    k = m.sum()
    if k:
        flat = epi_flat.astype(bool)
        na[m] = np.where(flat, rng.uniform(3.8, 5.0, k), rng.uniform(3.2, 4.2, k))
        nb[m] = np.where(flat, rng.uniform(1.2, 1.7, k), na[m] * rng.uniform(0.6, 0.8, k))
        nang[m] = epi_angle
        ca[m] = np.where(flat, na[m] * 1.25, na[m] * 1.4)
        cb[m] = np.where(flat, nb[m] * 1.8, nb[m] * 1.6)
        hd[m] = np.where(flat, rng.uniform(2.1, 2.6, k), rng.uniform(1.6, 2.1, k))

    m = types == T_ADI
    k = m.sum()
    ca[m] = 30.0     # replaced by the Voronoi area later
    cb[m] = 30.0
    na[m] = rng.uniform(4.0, 5.5, k)
    nb[m] = rng.uniform(1.0, 1.4, k)
    hd[m] = rng.uniform(1.8, 2.3, k)
    has_nucleus[m] = rng.random(k) < 0.25

    return {"x": x, "y": y, "type": types, "nx": x.copy(), "ny": y.copy(), "na": na, "nb": nb, "nang": nang,
            "ca": ca, "cb": cb, "cang": nang.copy(), "hd": hd, "vesic": vesic, "nucleoli": nucleoli,
            "has_nucleus": has_nucleus, "poly": poly}


def adipocyte_geometry(world, cells, seed):
    """Voronoi membranes of the adipocytes, their area pieces, and membrane-bound nuclei.

    Returns (segments (n, 2, 2) um, pieces: (cell index, x um, y um) sample points on a 2 um grid)."""
    rng = _rng(seed, 3)
    idx = np.flatnonzero(cells.type == T_ADI)
    if idx.size == 0:
        return np.zeros((0, 2, 2)), (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    pts = np.stack([cells.x[idx], cells.y[idx]], 1)
    segs, owners = _voronoi_membranes(pts, world.extent, rng)
    _membrane_nuclei(cells, idx, segs, owners, rng)
    pc_all, px_all, py_all = _fat_pieces(world, cells, idx, pts)
    # cell size from the covered area
    r = np.sqrt(np.bincount(pc_all, minlength=len(cells))[idx] * _PIECE_STEP_UM ** 2 / np.pi)
    cells.ca[idx] = r
    cells.cb[idx] = r
    return segs, (pc_all, px_all, py_all)


_PIECE_STEP_UM = 2.0   # the grid of an adipocyte's area pieces


def _voronoi_membranes(pts, E, rng):
    """(slightly wavy membranes (n, 4, 2) um: 3 sub-segments with a jittered midpoint pair, the two
    adipocytes (local indices) each ridge separates) from the Voronoi diagram of the adipocytes."""
    # far dummy points bound every region
    ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                     np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], 1) * 3 * E + E / 2
    vor = Voronoi(np.concatenate([pts, ring]))
    rp = vor.ridge_points
    rv = np.array(vor.ridge_vertices)
    ok = (rp[:, 0] < len(pts)) & (rp[:, 1] < len(pts)) & (rv[:, 0] >= 0) & (rv[:, 1] >= 0)
    # ridges between far-apart seeds (at the lobule's hull) lie outside the fat and are not drawn
    seed_gap = np.linalg.norm(pts[np.minimum(rp[:, 0], len(pts) - 1)] - pts[np.minimum(rp[:, 1], len(pts) - 1)], axis=1)
    ridge_len = np.linalg.norm(vor.vertices[rv[:, 0]] - vor.vertices[rv[:, 1]], axis=1)
    ok &= (seed_gap < 150.0) & (ridge_len < 150.0)
    a = vor.vertices[rv[ok, 0]]
    b = vor.vertices[rv[ok, 1]]
    L = np.linalg.norm(b - a, axis=1, keepdims=True)
    nrm = np.stack([-(b - a)[:, 1], (b - a)[:, 0]], 1) / np.maximum(L, 1e-9)
    p1 = a + (b - a) / 3 + nrm * rng.normal(0, 1.0, (len(a), 1))
    p2 = a + 2 * (b - a) / 3 + nrm * rng.normal(0, 1.0, (len(a), 1))
    return np.stack([a, p1, p2, b], 1), rp[ok]


def _membrane_nuclei(cells, idx, segs, owners, rng):
    """Membrane-bound nuclei for the adipocytes that have one: on the middle of one of its ridges,
    just inside the cell (an adipocyte without a ridge loses its nucleus)."""
    for ci_local in np.flatnonzero(cells.has_nucleus[idx]):
        ridge = np.flatnonzero((owners[:, 0] == ci_local) | (owners[:, 1] == ci_local))
        ci = idx[ci_local]
        if ridge.size == 0:
            cells.has_nucleus[ci] = False
            continue
        r = ridge[rng.integers(ridge.size)]
        mid = (segs[r, 1] + segs[r, 2]) / 2
        d = segs[r, 2] - segs[r, 1]
        toward = np.array([cells.x[ci], cells.y[ci]]) - mid
        toward /= max(np.linalg.norm(toward), 1e-9)
        cells.nx[ci], cells.ny[ci] = mid + toward * 1.2
        cells.nang[ci] = math.atan2(d[1], d[0])


def _fat_pieces(world, cells, idx, pts):
    """(cell index, x um, y um): the points of a 2 um grid in the fat region, each given to the nearest
    adipocyte; an adipocyte whose region holds no point keeps one at its centre."""
    from scipy.spatial import cKDTree
    tree = cKDTree(pts)
    g = (np.arange(int(world.extent // _PIECE_STEP_UM)) + 0.5) * _PIECE_STEP_UM
    px_all, py_all, pc_all = [], [], []
    for k0 in range(0, len(g), 256):
        X, Y = np.meshgrid(g, g[k0:k0 + 256])
        X, Y = X.ravel(), Y.ravel()
        pre = np.flatnonzero(world.fat_raw(X, Y) > world.f_thr)
        X, Y = X[pre], Y[pre]
        sel = world.labels(X, Y, ducts=False) == FAT
        if not sel.any():
            continue
        _, nn = tree.query(np.stack([X[sel], Y[sel]], 1))
        px_all.append(X[sel])
        py_all.append(Y[sel])
        pc_all.append(idx[nn])
    if px_all:
        px_all, py_all, pc_all = map(np.concatenate, (px_all, py_all, pc_all))
    else:
        px_all, py_all, pc_all = np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
    empty = idx[np.bincount(pc_all, minlength=len(cells))[idx] == 0]
    if empty.size:
        pc_all = np.concatenate([pc_all, empty])
        px_all = np.concatenate([px_all, cells.x[empty]])
        py_all = np.concatenate([py_all, cells.y[empty]])
    return pc_all, px_all, py_all



def _ellipse_pattern(n=8):
    u = (np.arange(n) + 0.5) / n * 2 - 1
    U, V = np.meshgrid(u, u)
    keep = U ** 2 + V ** 2 <= 1
    return U[keep], V[keep]


def cell_pieces(cells, adipo_points, grid_shape):
    """Overlap of every cell with the super-pixels: CSR-like (ptr, sp flat index, points per piece).

    Ordinary cells: a fixed pattern of points inside the cell ellipse; adipocytes: the 2 um grid points
    of their Voronoi region. Fractions are point counts / total points of the cell."""
    _, C = grid_shape
    n = len(cells)
    U, V = _ellipse_pattern(8)
    normal = np.flatnonzero(cells.type != T_ADI)
    c, s = np.cos(cells.cang[normal]), np.sin(cells.cang[normal])
    a, b = cells.ca[normal][:, None], cells.cb[normal][:, None]
    px = cells.x[normal][:, None] + a * U[None] * c[:, None] - b * V[None] * s[:, None]
    py = cells.y[normal][:, None] + a * U[None] * s[:, None] + b * V[None] * c[:, None]
    sp = (np.floor(py / SUPER_PIXEL_UM).astype(np.int64) * C + np.floor(px / SUPER_PIXEL_UM).astype(np.int64))
    cell_of = np.repeat(normal, U.size)
    sp = sp.ravel()
    pc, ppx, ppy = adipo_points
    sp_a = np.floor(ppy / SUPER_PIXEL_UM).astype(np.int64) * C + np.floor(ppx / SUPER_PIXEL_UM).astype(np.int64)
    cell_of = np.concatenate([cell_of, pc])
    sp = np.concatenate([sp, sp_a])
    # group by (cell, super-pixel)
    key_order = np.lexsort((sp, cell_of))
    cell_of, sp = cell_of[key_order], sp[key_order]
    new = np.ones(len(sp), bool)
    new[1:] = (sp[1:] != sp[:-1]) | (cell_of[1:] != cell_of[:-1])
    starts = np.flatnonzero(new)
    piece_cell = cell_of[starts]
    piece_sp = sp[starts]
    piece_n = np.diff(np.append(starts, len(sp)))
    ptr = np.zeros(n + 1, np.int64)
    np.add.at(ptr, piece_cell + 1, 1)
    ptr = np.cumsum(ptr)
    return ptr, piece_sp, piece_n, piece_cell
