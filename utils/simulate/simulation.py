"""Built-in demo tissue: a simulated H&E breast-cancer section with pseudo-Visium spots and 8 um truth.

    python -m utils.simulate --directory DIR --size small|medium|large --seed N

writes a complete raw-layout data set (he-raw.tif, pixel-size-raw.txt, cnts.tsv, locs-raw.tsv,
radius-raw.txt, section.json) plus the ground truth under DIR/truth/ (super.h5ad at 8 um super-pixels,
mask.png, regions.png, regions-colour.png, cells.tsv.gz, simulation.json), so the whole pipeline runs and
is scored without downloads.

How the world is made (all lengths in um, origin at the image's top-left corner):
- region fields: smooth Gaussian random fields, thresholded by quantiles, give an irregular tissue
  outline, tumour nests, fat lobules; immune aggregates are rasterised Gaussian bumps; ducts and lobule
  acini are ellipses (an epithelial ring around a white lumen);
- cells: jittered hexagonal lattices per region (dense in tumour and immune aggregates, sparse in
  stroma, large polygonal adipocytes in fat) plus explicit epithelial rings around the ducts;
- expression: cell-type profiles (marker genes, gamma-distributed baselines, housekeeping genes) times
  four smooth spatial programmes that the image cannot see, negative-binomial counts per cell, library
  size growing with cell area;
- truth: each cell's molecules are split multinomially over the super-pixels its area overlaps (per-cell
  totals preserved exactly); spots are sums of the truth over utils.geometry.footprint;
- image: stain densities (hematoxylin, eosin) drawn with cv2 into float maps strip by strip, mixed by
  Beer-Lambert, blurred and noised, and written into an uncompressed TIFF memmap.
"""
import argparse
import gzip
import json
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage, sparse
from scipy.spatial import Voronoi
from tqdm import tqdm

from ..core.cli import HelpFormatter, setup_logging
from ..core.errors import InputError
from ..core.geometry import SUPER_PIXEL_UM, TARGET_PIXEL_SIZE_UM, superpixel_grid_shape
from ..core.image_io import write_png
from ..core.raw_io import COUNTS_NAMES, IMAGE_NAMES, LOCS_NAMES
from ..core.stage import Stage
from ..evaluation.truth import SPOT_DIAMETER_UM, SPOT_SPACING_UM, pseudo_visium_spots, write_truth_h5ad

log = logging.getLogger("trihrge")

SIZES_MM = {"small": 1.5, "medium": 3.0, "large": 6.5}
PIXEL_SIZE_RANGE_UM = (0.1, 1.0)
MIN_GENES = 12
DENSE_LIMIT = 40_000_000     # super-pixels x genes above which truth X is written as CSR

# region labels (truth/regions.png values)
BG, STROMA, TUMOUR, IMMUNE, DUCT, LUMEN, FAT = range(7)
REGION_NAMES = ["background", "stroma", "tumour", "immune_aggregate", "duct_epithelium", "duct_lumen", "fat"]
REGION_COLOURS = [(255, 255, 255), (236, 150, 190), (120, 40, 140), (40, 50, 170), (60, 170, 90),
                  (190, 235, 240), (250, 225, 110)]

# cell types; gene-name prefix of each type's markers
CELL_TYPES = ["tumour", "epithelial", "fibroblast", "lymphocyte", "adipocyte"]
TYPE_PREFIX = ["TUMOUR", "EPITH", "STROMA", "IMMUNE", "FAT"]
T_TUM, T_EPI, T_FIB, T_LYM, T_ADI = range(5)
LIBRARY_SIZE = [320.0, 220.0, 140.0, 90.0, 200.0]   # mean counts per cell of mean size, per type
NB_DISPERSION = 0.25

# programmes: target cell types and Gaussian random field scale (um)
PROGRAMMES = [("PROG1", [T_TUM], 220.0), ("PROG2", [T_FIB, T_LYM], 380.0),
              ("PROG3", [T_TUM, T_EPI, T_FIB, T_LYM, T_ADI], 550.0), ("PROG4", [T_TUM, T_EPI], 800.0)]

# stain optical densities per unit concentration (R, G, B), natural-log Beer-Lambert; rows are unit vectors
STAIN_H = np.array([0.60, 0.72, 0.35]) / np.linalg.norm([0.60, 0.72, 0.35])
STAIN_E = np.array([0.15, 0.85, 0.45]) / np.linalg.norm([0.15, 0.85, 0.45])
GLASS_OD = np.array([0.035, 0.040, 0.030])

# per-region background stain concentrations (h, e) under the cells
REGION_H = np.array([0.0, 0.11, 0.20, 0.12, 0.12, 0.0, 0.0], np.float32)
REGION_E = np.array([0.0, 0.12, 0.40, 0.22, 0.34, 0.02, 0.01], np.float32)

STRIP_PIXELS = 6_000_000     # rows per rendered strip: this many pixels, at most 512 rows
PIXEL_NOISE = 2.2            # sd of the white noise added to each RGB channel


def _rng(seed, *stream):
    return np.random.default_rng([int(seed), *stream])


# ----------------------------------------------------------------------------------------------------
# smooth fields


class Field:
    """A scalar field on a regular grid (origin and spacing in um), read by bilinear interpolation."""

    def __init__(self, grid, origin_um, res_um):
        self.grid = np.ascontiguousarray(grid, dtype=np.float64)
        self.flat = self.grid.ravel()
        self.origin = float(origin_um)
        self.res = float(res_um)

    @classmethod
    def random(cls, rng, extent_um, scale_um, cells_per_scale=8):
        """Zero-mean, unit-variance Gaussian random field with Gaussian correlation of width scale_um."""
        res = scale_um / cells_per_scale
        pad = 3 * cells_per_scale
        n = int(math.ceil(extent_um / res)) + 2 * pad + 2
        noise = rng.standard_normal((n, n))
        g = ndimage.gaussian_filter(noise, cells_per_scale, mode="reflect", truncate=3.0)
        g *= 2.0 * math.sqrt(math.pi) * cells_per_scale
        return cls(g, -pad * res, res)

    def at(self, x, y):
        shape = np.shape(x)
        n0, n1 = self.grid.shape
        fx = np.array((np.asarray(x, dtype=np.float64) - self.origin) / self.res, ndmin=1)
        fy = np.array((np.asarray(y, dtype=np.float64) - self.origin) / self.res, ndmin=1)
        np.clip(fx, 0, n1 - 1.000001, out=fx)
        np.clip(fy, 0, n0 - 1.000001, out=fy)
        ix = fx.astype(np.int64)
        iy = fy.astype(np.int64)
        fx -= ix
        fy -= iy
        k = iy * n1 + ix
        g = self.flat
        top = g[k]
        top += (g[k + 1] - top) * fx
        bot = g[k + n1]
        bot += (g[k + n1 + 1] - bot) * fx
        bot -= top
        bot *= fy
        bot += top
        return bot.reshape(shape)


class World:
    """Region fields and explicit structures of one simulated section."""

    def __init__(self, seed, extent_um):
        self.extent = float(extent_um)
        E = self.extent
        rng = _rng(seed, 1)
        # tissue outline: an ellipse deformed by two scales of noise, thresholded to a target coverage
        self.centre = E / 2 + rng.uniform(-0.05, 0.05, 2) * E
        self.axes = (E * rng.uniform(0.40, 0.50), E * rng.uniform(0.34, 0.44))
        self.angle = rng.uniform(0, math.pi)
        self.f_tissue1 = Field.random(rng, E, E / 6.0)
        self.f_tissue2 = Field.random(rng, E, max(E / 25.0, 25.0))
        self.f_tissue3 = Field.random(rng, E, 12.0, cells_per_scale=4)
        # tumour nests: large irregular blobs (3 scales)
        self.f_tum0 = Field.random(rng, E, 450.0)
        self.f_tum1 = Field.random(rng, E, rng.uniform(90.0, 130.0))
        self.f_tum2 = Field.random(rng, E, 30.0)
        # fat lobules
        self.f_fat0 = Field.random(rng, E, 500.0)
        self.f_fat1 = Field.random(rng, E, rng.uniform(120.0, 180.0))
        # stroma cellularity, fibre orientation, stain variation
        self.f_cell = Field.random(rng, E, 80.0)
        self.f_theta0 = Field.random(rng, E, 250.0)
        self.f_theta1 = Field.random(rng, E, 30.0)
        self.f_theta2 = Field.random(rng, E, 90.0)
        self.f_stain_h = Field.random(rng, E, 600.0)
        self.f_stain_e = Field.random(rng, E, 600.0)
        self.immune = None
        self.t_thr = self.u_thr = self.f_thr = 0.0
        self.ducts = np.zeros((0, 7))   # cx, cy, a, b, angle(rad), thickness, secretion

        # thresholds from quantiles at an 8 um grid over the field
        g = (np.arange(int(E // 8)) + 0.5) * 8.0
        X, Y = np.meshgrid(g, g)
        coverage = rng.uniform(0.62, 0.72)
        t = self.tissue_raw(X, Y)
        self.t_thr = float(np.quantile(t, 1 - coverage))
        inside = t > self.t_thr
        u = self.tumour_raw(X, Y)[inside]
        self.tumour_fraction_target = rng.uniform(0.25, 0.38)
        self.u_thr = float(np.quantile(u, 1 - self.tumour_fraction_target))
        rest = inside.copy()
        rest[inside] = u <= self.u_thr
        fa = self.fat_raw(X, Y)[rest]
        self.fat_fraction_target = rng.uniform(0.15, 0.28)
        self.f_thr = float(np.quantile(fa, 1 - self.fat_fraction_target))
        tissue_area_mm2 = inside.mean() * (E / 1000) ** 2
        self._place_immune(rng, tissue_area_mm2)
        self._place_ducts(rng, tissue_area_mm2)

    # raw fields ------------------------------------------------------------------------------------
    def tissue_raw(self, x, y):
        dx, dy = x - self.centre[0], y - self.centre[1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.axes[0]
        v = (-dx * s + dy * c) / self.axes[1]
        d = np.sqrt(u * u + v * v)
        return (-d + 0.30 * self.f_tissue1.at(x, y) + 0.07 * self.f_tissue2.at(x, y)
                + 6.0 / self.axes[0] * self.f_tissue3.at(x, y))

    def tumour_raw(self, x, y):
        return 0.55 * self.f_tum0.at(x, y) + self.f_tum1.at(x, y) + 0.30 * self.f_tum2.at(x, y)

    def fat_raw(self, x, y):
        return 0.8 * self.f_fat0.at(x, y) + self.f_fat1.at(x, y)

    def values(self, x, y):
        """Signed level-set values (>0 inside) of tissue, tumour, fat and immune aggregates."""
        v = {"tissue": self.tissue_raw(x, y) - self.t_thr,
             "tumour": self.tumour_raw(x, y) - self.u_thr,
             "fat": self.fat_raw(x, y) - self.f_thr}
        v["immune"] = (self.immune.at(x, y) - 0.5) if self.immune is not None else np.full(np.shape(x), -1.0)
        return v

    @staticmethod
    def label_from_values(v):
        lab = np.full(np.shape(v["tissue"]), STROMA, np.uint8)
        lab[v["immune"] > 0] = IMMUNE
        lab[v["fat"] > 0] = FAT
        lab[v["tumour"] > 0] = TUMOUR
        lab[v["tissue"] <= 0] = BG
        return lab

    def labels(self, x, y, ducts=True):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        lab = self.label_from_values(self.values(x, y))
        if ducts and len(self.ducts):
            lab = self.apply_ducts(x, y, lab)
        inside = (x >= 0) & (y >= 0) & (x < self.extent) & (y < self.extent)
        lab[~inside] = BG
        return lab

    def apply_ducts(self, x, y, lab):
        lab = lab.copy()
        for cx, cy, a, b, ang, th, _ in self.ducts:
            sel = (np.abs(x - cx) <= a) & (np.abs(y - cy) <= a)
            if not sel.any():
                continue
            dx, dy = x[sel] - cx, y[sel] - cy
            c, s = math.cos(ang), math.sin(ang)
            u, w = dx * c + dy * s, -dx * s + dy * c
            outer = (u / a) ** 2 + (w / b) ** 2 <= 1
            inner = (u / max(a - th, 1.0)) ** 2 + (w / max(b - th, 1.0)) ** 2 <= 1
            sub = lab[sel]
            sub[outer] = DUCT
            sub[inner] = LUMEN
            lab[sel] = sub
        return lab

    # structures --------------------------------------------------------------------------------------
    def _place_immune(self, rng, tissue_area_mm2):
        E = self.extent
        res = 4.0
        n = int(math.ceil(E / res)) + 2
        grid = np.zeros((n, n))
        n_agg = rng.poisson(4.0 * tissue_area_mm2)
        # candidates screened at once: in stroma, most of them near a tumour border
        cand = rng.uniform(0, E, (max(1, n_agg) * 30, 2))
        v = self.values(cand[:, 0], cand[:, 1])
        near = (v["tumour"] > -0.9) & (v["tumour"] < 0)
        ok = (self.label_from_values(v) == STROMA) & ((rng.random(len(cand)) >= 0.6) | near)
        centres = cand[ok][:n_agg]
        for c in centres:
            for _ in range(rng.integers(2, 5)):
                bx, by = c + rng.normal(0, 22, 2)
                sig = rng.uniform(16, 32)
                amp = rng.uniform(0.8, 1.3)
                r = int(math.ceil(3 * sig / res))
                i0, j0 = int(by / res), int(bx / res)
                ii = np.arange(max(0, i0 - r), min(n, i0 + r + 1))
                jj = np.arange(max(0, j0 - r), min(n, j0 + r + 1))
                if not len(ii) or not len(jj):
                    continue
                gy = ii * res - by
                gx = jj * res - bx
                grid[np.ix_(ii, jj)] += amp * np.exp(-(gy[:, None] ** 2 + gx[None, :] ** 2) / (2 * sig * sig))
        self.immune = Field(grid, 0.0, res)
        self.n_aggregates = len(centres)

    def _fits_region(self, cx, cy, r):
        """Vectorised: centre and 16 points on a circle of radius r all in stroma, inside the image."""
        ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        px = np.concatenate([cx[:, None], cx[:, None] + r[:, None] * np.cos(ang)], 1)
        py = np.concatenate([cy[:, None], cy[:, None] + r[:, None] * np.sin(ang)], 1)
        inside = (px >= 0) & (py >= 0) & (px < self.extent) & (py < self.extent)
        lab = self.label_from_values(self.values(px, py))
        return np.all(inside & (lab == STROMA), axis=1)

    def _place_ducts(self, rng, tissue_area_mm2):
        E = self.extent
        ducts = []

        def free(cx, cy, r):
            for d in ducts:
                if math.hypot(cx - d[0], cy - d[1]) < r + max(d[2], d[3]) + 6:
                    return False
            return True

        # single ducts
        n_ducts = rng.poisson(2.5 * tissue_area_mm2)
        m = max(1, n_ducts) * 40
        cx, cy = rng.uniform(0, E, m), rng.uniform(0, E, m)
        a = rng.uniform(28, 60, m)
        b = a * rng.uniform(0.55, 1.0, m)
        ang, th, secr = rng.uniform(0, np.pi, m), rng.uniform(11, 16, m), rng.random(m) < 0.4
        ok = self._fits_region(cx, cy, a + 14)
        placed = 0
        for i in np.flatnonzero(ok):
            if placed >= n_ducts:
                break
            if free(cx[i], cy[i], a[i] + 14):
                ducts.append((cx[i], cy[i], a[i], b[i], ang[i], th[i], float(secr[i])))
                placed += 1
        # lobules: clusters of small acini
        n_lob = rng.poisson(1.2 * tissue_area_mm2)
        m = max(1, n_lob) * 40
        lx, ly = rng.uniform(0, E, m), rng.uniform(0, E, m)
        ok = self._fits_region(lx, ly, np.full(m, 105.0))
        n_lob_placed = 0
        for i in np.flatnonzero(ok):
            if n_lob_placed >= n_lob:
                break
            if not free(lx[i], ly[i], 100.0):
                continue
            k, n_acini = 0, rng.integers(9, 17)
            r = 80 * np.sqrt(rng.random(80))
            t = rng.uniform(0, 2 * np.pi, 80)
            ax, ay = lx[i] + r * np.cos(t), ly[i] + r * np.sin(t)
            a = rng.uniform(15, 23, 80)
            b = a * rng.uniform(0.7, 1.0, 80)
            ang, th = rng.uniform(0, np.pi, 80), rng.uniform(8.5, 10.5, 80)
            ok_a = self._fits_region(ax, ay, a + 3)
            for j in np.flatnonzero(ok_a):
                if k >= n_acini:
                    break
                if free(ax[j], ay[j], a[j] + 3):
                    ducts.append((ax[j], ay[j], a[j], b[j], ang[j], th[j], 0.0))
                    k += 1
            n_lob_placed += 1
        self.ducts = np.array(ducts, dtype=np.float64).reshape(-1, 7)
        self.n_ducts = placed
        self.n_lobules = n_lob_placed

    def theta(self, x, y):
        return 1.3 * self.f_theta0.at(x, y) + 0.45 * self.f_theta2.at(x, y) + 0.25 * self.f_theta1.at(x, y)


# ----------------------------------------------------------------------------------------------------
# cells


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
    rng = _rng(seed, 2)
    E = world.extent
    parts = []

    def add(x, y, types, rng):
        parts.append(_cell_shapes(world, rng, np.asarray(x, float), np.asarray(y, float),
                                  np.asarray(types, np.int64)))

    # tumour nests: dense big atypical cells with some infiltrating lymphocytes and fibroblasts
    x, y = _jittered_lattice(rng, E, 11.5, 0.30)
    lab = world.labels(x, y)
    keep = (lab == TUMOUR) & (rng.random(x.size) < 0.97)
    x, y = x[keep], y[keep]
    u = rng.random(x.size)
    types = np.where(u < 0.06, T_LYM, np.where(u < 0.085, T_FIB, T_TUM))
    add(x, y, types, rng)
    # stroma: sparse fibroblasts and scattered lymphocytes, cellularity from a smooth field
    x, y = _jittered_lattice(rng, E, 15.0, 0.35)
    lab = world.labels(x, y)
    p = np.clip(0.42 + 0.18 * world.f_cell.at(x, y), 0.15, 0.8)
    keep = (lab == STROMA) & (rng.random(x.size) < p)
    x, y = x[keep], y[keep]
    types = np.where(rng.random(x.size) < 0.16, T_LYM, T_FIB)
    add(x, y, types, rng)
    # immune aggregates: densely packed small lymphocytes
    x, y = _jittered_lattice(rng, E, 6.6, 0.28)
    lab = world.labels(x, y)
    keep = (lab == IMMUNE) & (rng.random(x.size) < 0.92)
    x, y = x[keep], y[keep]
    types = np.where(rng.random(x.size) < 0.05, T_FIB, T_LYM)
    add(x, y, types, rng)
    # duct epithelium: a luminal ring around the lumen, a flat basal ring outside
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
    if ex:
        ex, ey, eang, eflat = map(np.concatenate, (ex, ey, eang, eflat))
        keep = (ex >= 0) & (ey >= 0) & (ex < E) & (ey < E)
        parts.append(_cell_shapes(world, rng, ex[keep], ey[keep], np.full(keep.sum(), T_EPI),
                                  epi_angle=eang[keep], epi_flat=eflat[keep]))
    # fat: adipocytes, one per jittered lattice point
    x, y = _jittered_lattice(rng, E, rng.uniform(48, 62), 0.22)
    lab = world.labels(x, y)
    keep = lab == FAT
    ax, ay = x[keep], y[keep]
    adipo = _cell_shapes(world, rng, ax, ay, np.full(ax.size, T_ADI))
    parts.append(adipo)

    cols = {k: np.concatenate([p[k] for p in parts]) for k in Cells.FIELDS}
    # cells must lie inside the image with their whole ellipse (adipocytes are handled by Voronoi)
    r = np.maximum(cols["ca"], cols["cb"])
    ok = (cols["type"] == T_ADI) | ((cols["x"] - r >= 0) & (cols["y"] - r >= 0) &
                                    (cols["x"] + r < E) & (cols["y"] + r < E))
    cols = {k: v[ok] for k, v in cols.items()}
    order = np.lexsort((cols["x"], cols["y"]))
    cols = {k: v[order] for k, v in cols.items()}
    return Cells(**cols)


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
    E = world.extent
    segs = np.zeros((0, 2, 2))
    if idx.size == 0:
        return segs, (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    pts = np.stack([cells.x[idx], cells.y[idx]], 1)
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
    owners = rp[ok]
    # slightly wavy membranes: 3 sub-segments with a jittered midpoint pair
    L = np.linalg.norm(b - a, axis=1, keepdims=True)
    nrm = np.stack([-(b - a)[:, 1], (b - a)[:, 0]], 1) / np.maximum(L, 1e-9)
    p1 = a + (b - a) / 3 + nrm * rng.normal(0, 1.0, (len(a), 1))
    p2 = a + 2 * (b - a) / 3 + nrm * rng.normal(0, 1.0, (len(a), 1))
    segs = np.stack([a, p1, p2, b], 1)
    # membrane-bound nuclei for some adipocytes: on the middle of one of its ridges
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
    # area pieces: points of a 2 um grid in the fat region, assigned to the nearest adipocyte
    from scipy.spatial import cKDTree
    tree = cKDTree(pts)
    step = 2.0
    g = (np.arange(int(E // step)) + 0.5) * step
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
    # an adipocyte whose region holds no grid point keeps one point at its centre
    empty = idx[np.bincount(pc_all, minlength=len(cells))[idx] == 0]
    if empty.size:
        pc_all = np.concatenate([pc_all, empty])
        px_all = np.concatenate([px_all, cells.x[empty]])
        py_all = np.concatenate([py_all, cells.y[empty]])
    # cell size from the covered area
    area = np.bincount(pc_all, minlength=len(cells)) * step * step
    r = np.sqrt(area[idx] / np.pi)
    cells.ca[idx] = r
    cells.cb[idx] = r
    return segs, (pc_all, px_all, py_all)


# ----------------------------------------------------------------------------------------------------
# pieces of cells on the super-pixel grid

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


# ----------------------------------------------------------------------------------------------------
# genes and expression


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
    chunk = 8192
    piece_t = tissue_index.ravel()[piece_sp]
    if np.any(piece_t < 0):
        raise RuntimeError("internal error: a cell overlaps a super-pixel outside the tissue mask")
    for k, i0 in enumerate(tqdm(range(0, n, chunk), desc="expression", unit="chunk", disable=not progress)):
        rng = _rng(seed, 6, k)
        i1 = min(n, i0 + chunk)
        sl = slice(i0, i1)
        types = cells.type[sl]
        lib = np.array(LIBRARY_SIZE)[types] * (area[sl] / mean_area[types]) * np.exp(rng.normal(0, 0.2, i1 - i0))
        F = np.stack([f.at(cells.x[sl], cells.y[sl]) for f in prog_fields], 1)
        mu = lib[:, None] * prof[types] * np.exp(F @ loadings.T)
        lam = rng.gamma(shape, mu / shape)
        counts = rng.poisson(lam)
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
        t_idx = piece_t[p0 + piece]
        t0, t1 = t_idx.min(), t_idx.max()
        acc = np.bincount((t_idx - t0) * G + mol_gene, minlength=(t1 - t0 + 1) * G)
        truth[t0:t1 + 1] += acc.reshape(-1, G).astype(np.float32)
    return truth, totals, gene_totals


# ----------------------------------------------------------------------------------------------------
# fibres


def make_fibres(world, seed):
    """Collagen in stroma: broad bundles, thinner fibres, fine fibrils and pale clefts, as polylines that
    follow the orientation field; drawn in this order (each class overwrites the previous).

    Returns (points (n, k, 2) um, bucket (n,), bucket table [(thickness_um, e value)])."""
    rng = _rng(seed, 8)
    E = world.extent
    # class: (seeds per um^2, thickness um, step um range, orientation spread, e values)
    classes = [(1 / 230.0, (3.5, 7.0), (5.0, 8.0), 0.22, (0.20, 0.27, 0.34, 0.42)),
               (1 / 120.0, (1.2, 2.0), (3.5, 6.0), 0.18, (0.18, 0.28, 0.38, 0.48)),
               (1 / 110.0, (0.35, 0.5), (3.0, 5.5), 0.12, (0.32, 0.42, 0.50, 0.58)),
               (1 / 450.0, (0.5, 1.0), (3.0, 5.0), 0.10, (0.08, 0.12, 0.16, 0.20))]
    steps = 10
    pts_all, bucket_all, table = [], [], []
    for dens, thick, step_rng, spread, vals in classes:
        n = rng.poisson(dens * E * E)
        x = rng.uniform(0, E, n)
        y = rng.uniform(0, E, n)
        lab = world.labels(x, y)
        keep = (lab == STROMA) | (lab == IMMUNE)
        x, y = x[keep], y[keep]
        n = x.size
        step = rng.uniform(*step_rng, n)
        off = rng.normal(0, spread, n)
        pts = np.zeros((n, steps + 1, 2))
        th = world.theta(x, y) + off
        pts[:, 0, 0] = x - np.cos(th) * step * steps / 2
        pts[:, 0, 1] = y - np.sin(th) * step * steps / 2
        for k in range(steps):
            th = world.theta(pts[:, k, 0], pts[:, k, 1]) + off + rng.normal(0, 0.06, n)
            pts[:, k + 1, 0] = pts[:, k, 0] + np.cos(th) * step
            pts[:, k + 1, 1] = pts[:, k, 1] + np.sin(th) * step
        t_levels = np.linspace(thick[0], thick[1], 2)
        tl = rng.integers(0, 2, n)
        vl = rng.integers(0, len(vals), n)
        base = len(table)
        for a in range(2):
            for b in range(len(vals)):
                table.append((float(t_levels[a]), float(vals[b])))
        pts_all.append(pts)
        bucket_all.append(base + tl * len(vals) + vl)
    return np.concatenate(pts_all), np.concatenate(bucket_all), table


# ----------------------------------------------------------------------------------------------------
# rendering


def _upsampled_values(world, q, px, ya, yb, width):
    """World level-set values for image rows [ya, yb): sampled every q pixels on an image-wide grid
    (sample k at pixel coordinate (k + 0.5) q), linearly upsampled, so that strips join seamlessly."""
    k0 = ya // q - 1
    k1 = -(-yb // q) + 1
    xs = (np.arange(-(-width // q) + 1) + 0.5) * q * px
    ys = (np.arange(k0, k1) + 0.5) * q * px
    X, Y = np.meshgrid(xs, ys)
    v = world.values(X, Y)
    v["stain_h"] = world.f_stain_h.at(X, Y)
    v["stain_e"] = world.f_stain_e.at(X, Y)
    out = {}
    r0 = ya - k0 * q
    for k, a in v.items():
        a = a.astype(np.float32)
        up = cv2.resize(a, (a.shape[1] * q, a.shape[0] * q), interpolation=cv2.INTER_LINEAR)
        out[k] = up[r0:r0 + (yb - ya), :width]
    return out


def _smooth_noise(seed, stream, ya, yb, width, cell_px, block=64):
    """Rows [ya, yb) of an image-wide unit-variance smooth noise of correlation ~cell_px pixels.

    The coarse noise is drawn in fixed blocks of rows keyed by their global index, so strips rendered
    separately join without seams."""
    c = int(cell_px)
    g0 = ya // c - 2
    g1 = -(-yb // c) + 3
    wl = width // c + 4
    b0, b1 = max(g0, 0) // block, max(g1, 0) // block
    rows = np.concatenate([_rng(seed, 11, stream, k).standard_normal((block, wl), dtype=np.float32)
                           for k in range(b0, b1 + 1)])
    lo = g0 - b0 * block
    idx = np.clip(np.arange(lo, lo + (g1 - g0)), 0, None)       # rows above the image reuse row 0
    small = rows[idx]
    up = cv2.resize(small, (wl * c, small.shape[0] * c), interpolation=cv2.INTER_CUBIC)
    r0 = ya - g0 * c
    return up[r0:r0 + (yb - ya), :width]


class Renderer:
    def __init__(self, world, cells, fibres, membranes, raw_px, shape, seed):
        self.world, self.cells, self.px, self.seed = world, cells, raw_px, seed
        self.H, self.W = shape
        self.fib_pts, self.fib_bucket, self.fib_table = fibres
        self.membranes = membranes
        self.sigma = max(0.5, 0.40 / raw_px)
        self.margin = int(math.ceil(8 * self.sigma)) + 16   # two blurs in a row + the field upsampling
        if len(self.fib_pts):
            self.fib_ymin = self.fib_pts[..., 1].min(1)
            self.fib_ymax = self.fib_pts[..., 1].max(1)
        else:
            self.fib_ymin = self.fib_ymax = np.zeros(0)
        if len(membranes):
            self.mem_ymin = membranes[..., 1].min(1)
            self.mem_ymax = membranes[..., 1].max(1)
        else:
            self.mem_ymin = self.mem_ymax = np.zeros(0)
        self.cell_ext = float(np.max(np.maximum(cells.ca, cells.na)[cells.type != T_ADI], initial=10.0)) + 2.0
        rng = _rng(seed, 9)
        self.stain_gain = (rng.uniform(0.92, 1.08), rng.uniform(0.9, 1.1))
        # per-cell drawing attributes, fixed here so a cell cut by a strip boundary looks the same in both
        n = len(cells)
        tum = cells.type == T_TUM
        self.cyto_e = np.where(tum, rng.uniform(0.34, 0.48, n), rng.uniform(0.36, 0.46, n)).astype(np.float64)
        self.cyto_h = np.where(tum, rng.uniform(0.16, 0.26, n), rng.uniform(0.10, 0.16, n)).astype(np.float64)
        self.nucleolus_offset = rng.normal(0, 0.35, (n, 2, 2))

    def _line_canvas(self, pts_um, ya, yb):
        """A zero canvas tall enough that no polyline is clipped at its top or bottom (cv2 rasterises a
        clipped line differently), so strips join without seams; returns (canvas, rows of padding)."""
        y = pts_um[..., 1] / self.px
        pad = min(int(max(0.0, ya - float(y.min()), float(y.max()) - yb)) + 16, 4096)
        return np.zeros((yb - ya + 2 * pad, self.W), np.float32), pad

    def _xy16(self, x_um, y_um, ya):
        X = np.round((np.asarray(x_um) / self.px - 0.5) * 16).astype(np.int64)
        Y = np.round((np.asarray(y_um) / self.px - ya - 0.5) * 16).astype(np.int64)
        return X, Y

    def render(self, y0, y1, strip_index):
        px, W = self.px, self.W
        rng = _rng(self.seed, 10, strip_index)
        ya, yb = max(0, y0 - self.margin), min(self.H, y1 + self.margin)
        hb = yb - ya
        q = max(1, int(round(1.2 / px)))
        v = _upsampled_values(self.world, q, px, ya, yb, W)
        lab = np.full((hb, W), STROMA, np.uint8)
        lab[v["immune"] > 0] = IMMUNE
        lab[v["fat"] > 0] = FAT
        lab[v["tumour"] > 0] = TUMOUR
        lab[v["tissue"] <= 0] = BG
        # ducts: epithelial ring + lumen drawn exactly
        um0, um1 = ya * px, yb * px
        lumen_secretions = []
        for cx, cy, a, b, ang, th, secr in self.world.ducts:
            if cy + a < um0 or cy - a > um1:
                continue
            X, Y = self._xy16(cx, cy, ya)
            deg = math.degrees(ang)
            cv2.ellipse(lab, (int(X), int(Y)), (int(a / px * 16), int(b / px * 16)), deg, 0, 360, DUCT, -1, cv2.LINE_8, 4)
            la, lb = max(a - th, 1.0), max(b - th, 1.0)
            cv2.ellipse(lab, (int(X), int(Y)), (int(la / px * 16), int(lb / px * 16)), deg, 0, 360, LUMEN, -1, cv2.LINE_8, 4)
            if secr:
                lumen_secretions.append((int(X), int(Y), int(la * 0.6 / px * 16), int(lb * 0.55 / px * 16), deg))
        h = REGION_H[lab]
        e = REGION_E[lab]
        stroma = lab == STROMA
        # stroma ground substance: low, slightly mottled eosin
        mott = _smooth_noise(self.seed, 1, ya, yb, W, max(2, int(round(2.0 / px))))
        e += stroma * (0.05 * mott)
        # collagen fibres
        sel = np.flatnonzero((self.fib_ymax >= um0 - 3) & (self.fib_ymin <= um1 + 3))
        if sel.size:
            P = self.fib_pts[sel]
            fib, pad = self._line_canvas(P, ya, yb)
            X, Y = self._xy16(P[..., 0], P[..., 1], ya - pad)
            P16 = np.stack([X, Y], -1).astype(np.int32)
            bk = self.fib_bucket[sel]
            for b, (thick, val) in enumerate(self.fib_table):
                m = bk == b
                if m.any():
                    t = max(1, int(round(thick / px)))
                    cv2.polylines(fib, P16[m], False, float(val), t, cv2.LINE_8, 4)
            fib = fib[pad:pad + hb]
        else:
            fib = np.zeros((hb, W), np.float32)
        fib = cv2.GaussianBlur(fib, (0, 0), max(0.5, 0.35 / px))
        e += fib * stroma
        immune = lab == IMMUNE
        e += fib * immune * 0.4
        # fat: thin membranes
        fat = lab == FAT
        if fat.any() and len(self.membranes):
            sel = np.flatnonzero((self.mem_ymax >= um0 - 2) & (self.mem_ymin <= um1 + 2))
            if sel.size:
                P = self.membranes[sel]
                mem, pad = self._line_canvas(P, ya, yb)
                X, Y = self._xy16(P[..., 0], P[..., 1], ya - pad)
                P16 = np.stack([X, Y], -1).astype(np.int32)
                cv2.polylines(mem, P16, False, 1.0, max(1, int(round(0.6 / px))), cv2.LINE_8, 4)
                mem = np.ascontiguousarray(mem[pad:pad + hb])
            else:
                mem = np.zeros((hb, W), np.float32)
            # the lobule's outer boundary is a membrane too
            fat8 = fat.astype(np.uint8)
            k = 2 * max(1, int(round(0.45 / px))) + 1
            edge = fat8 - cv2.erode(fat8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
            np.maximum(mem, edge.astype(np.float32), out=mem)
            mem = cv2.GaussianBlur(mem, (0, 0), max(0.5, 0.25 / px))
            e += fat * mem * 0.48
            h += fat * mem * 0.10
        for X, Y, a16, b16, deg in lumen_secretions:
            cv2.ellipse(e, (X, Y), (max(a16, 1), max(b16, 1)), deg, 0, 360, 0.16, -1, cv2.LINE_8, 4)
        self._draw_cells(h, e, ya, yb)
        # chromatin texture, slide-level stain variation
        tex = _smooth_noise(self.seed, 2, ya, yb, W, max(1, int(round(0.5 / px))))
        tex2 = _smooth_noise(self.seed, 3, ya, yb, W, max(1, int(round(1.5 / px))))
        h *= np.clip(1.0 + 0.28 * tex + 0.12 * tex2, 0.3, None)
        h *= self.stain_gain[0] * (1.0 + 0.06 * v["stain_h"])
        e *= self.stain_gain[1] * (1.0 + 0.07 * v["stain_e"])
        h = cv2.GaussianBlur(h, (0, 0), self.sigma)
        e = cv2.GaussianBlur(e, (0, 0), self.sigma)
        r0, r1 = y0 - ya, y1 - ya
        h, e = h[r0:r1], e[r0:r1]
        out = np.empty((y1 - y0, W, 3), np.uint8)
        for c in range(3):
            od = h * np.float32(STAIN_H[c]) + e * np.float32(STAIN_E[c]) + np.float32(GLASS_OD[c])
            val = np.float32(255.0) * np.exp(-od)
            val += rng.standard_normal(val.shape, dtype=np.float32) * np.float32(PIXEL_NOISE)
            np.clip(val, 0, 255, out=val)
            out[..., c] = (val + 0.5).astype(np.uint8)
        return out

    def _draw_cells(self, h, e, ya, yb):
        c = self.cells
        px = self.px
        um0, um1 = ya * px - self.cell_ext, yb * px + self.cell_ext
        i0, i1 = np.searchsorted(c.y, [um0, um1])
        idx = np.arange(i0, i1)
        idx = idx[c.type[idx] != T_ADI]
        # adipocyte nuclei are placed on membranes, anywhere in y order
        ad = np.flatnonzero((c.type == T_ADI) & c.has_nucleus & (c.ny >= um0) & (c.ny <= um1))
        s = 16.0 / px
        # cytoplasm (tumour, epithelial): eosin + a little hematoxylin
        cyto = idx[(c.type[idx] == T_TUM) | (c.type[idx] == T_EPI)]
        if cyto.size:
            Xc, Yc = self._xy16(c.x[cyto], c.y[cyto], ya)
            A = np.maximum(1, np.round(c.ca[cyto] * s)).astype(int)
            B = np.maximum(1, np.round(c.cb[cyto] * s)).astype(int)
            D = np.degrees(c.cang[cyto])
            ev = self.cyto_e[cyto]
            hv = self.cyto_h[cyto]
            for xx, yy, aa, bb, dd, evv, hvv in zip(Xc.tolist(), Yc.tolist(), A.tolist(), B.tolist(), D.tolist(),
                                                    ev.tolist(), hv.tolist()):
                cv2.ellipse(e, (xx, yy), (aa, bb), dd, 0, 360, evv, -1, cv2.LINE_8, 4)
                cv2.ellipse(h, (xx, yy), (aa, bb), dd, 0, 360, hvv, -1, cv2.LINE_8, 4)
        # nuclei
        nuc = np.concatenate([idx, ad])
        if not nuc.size:
            return
        Xn, Yn = self._xy16(c.nx[nuc], c.ny[nuc], ya)
        A = np.maximum(1, np.round(c.na[nuc] * s)).astype(int)
        B = np.maximum(1, np.round(c.nb[nuc] * s)).astype(int)
        D = np.degrees(c.nang[nuc])
        HD = c.hd[nuc]
        # irregular outlines (harmonics 2-4) for all but the adipocyte nuclei
        ang = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        P = c.poly[nuc]
        rr = 1 + P[:, 0:1] * np.cos(2 * ang + P[:, 3:4]) + P[:, 1:2] * np.cos(3 * ang + P[:, 4:5]) \
            + P[:, 2:3] * np.cos(4 * ang + P[:, 5:6])
        ca_, sa_ = np.cos(np.radians(D))[:, None], np.sin(np.radians(D))[:, None]
        ux = A[:, None] * rr * np.cos(ang)
        uy = B[:, None] * rr * np.sin(ang)
        rx, ry = ux * ca_ - uy * sa_, ux * sa_ + uy * ca_
        outer = np.stack([Xn[:, None] + rx, Yn[:, None] + ry], -1).round().astype(np.int32)
        inner = np.stack([Xn[:, None] + 0.72 * rx, Yn[:, None] + 0.72 * ry], -1).round().astype(np.int32)
        vesic = c.vesic[nuc]
        nucleoli = c.nucleoli[nuc]
        nr = max(1, int(round(0.55 * s)))
        off = self.nucleolus_offset[nuc]
        for j in range(nuc.size):
            d = float(HD[j])
            cv2.fillPoly(h, [outer[j]], d, cv2.LINE_8, 4)
            if vesic[j]:
                cv2.fillPoly(h, [inner[j]], d * 0.62, cv2.LINE_8, 4)
            for k in range(int(nucleoli[j])):
                ox = int(Xn[j] + off[j, k, 0] * A[j])
                oy = int(Yn[j] + off[j, k, 1] * B[j])
                cv2.circle(h, (ox, oy), nr, d * 1.35, -1, cv2.LINE_8, 4)


def render_image(path, renderer, progress=True):
    """Render strip by strip into an uncompressed RGB TIFF at path (created via tifffile.memmap)."""
    import tifffile
    H, W = renderer.H, renderer.W
    mm = tifffile.memmap(str(path), shape=(H, W, 3), dtype=np.uint8, photometric="rgb")
    mm.flush()
    del mm
    rows = int(max(64, min(512, STRIP_PIXELS // W)))
    n_strips = -(-H // rows)
    for k in tqdm(range(n_strips), desc="image", unit="strip", disable=not progress):
        y0, y1 = k * rows, min(H, (k + 1) * rows)
        strip = renderer.render(y0, y1, k)
        mm = tifffile.memmap(str(path), mode="r+")
        mm[y0:y1] = strip
        mm.flush()
        del mm


# ----------------------------------------------------------------------------------------------------
# writers


def _write_gz_tsv(path, df, float_format=None):
    data = df.to_csv(sep="\t", index=False, float_format=float_format).encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)


# ----------------------------------------------------------------------------------------------------
# the whole simulation


def simulate(directory, size="small", seed=0, pixel_size=0.3, n_genes=300, extent_mm=None, progress=True):
    """Simulate one section into `directory` (raw layout + truth/). Returns a summary dict."""
    t_start = time.time()
    if size not in SIZES_MM:
        raise InputError(f"--size {size!r}: unknown size; choose one of {', '.join(SIZES_MM)} "
                         f"(1.5, 3 or 6.5 mm square)")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise InputError(f"--seed {seed}: the seed must be a non-negative integer")
    lo, hi = PIXEL_SIZE_RANGE_UM
    if not (np.isfinite(pixel_size) and lo <= pixel_size <= hi):
        raise InputError(f"--pixel-size {pixel_size}: must be between {lo} and {hi} um/px (0.25-0.5 is typical of a "
                         f"20x/40x scan)")
    if n_genes < MIN_GENES or n_genes > 20000:
        raise InputError(f"--n-genes {n_genes}: must be between {MIN_GENES} and 20000")
    extent_mm = float(extent_mm) if extent_mm is not None else SIZES_MM[size]
    if not (0.3 <= extent_mm <= 10.0):
        raise InputError(f"--extent-mm {extent_mm}: must be between 0.3 and 10 mm")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: exists and is not a directory; pass a folder for --directory")
    if directory.is_dir():
        ours = {"he-raw.tif", "cnts.tsv", "locs-raw.tsv"}
        others = [n for n in (*IMAGE_NAMES, *COUNTS_NAMES, *LOCS_NAMES) if n not in ours and (directory / n).exists()]
        if others:
            raise InputError(f"{directory}: already holds {', '.join(others)} of another data set, which would sit "
                             f"beside the simulated files; pass an empty or new folder for --directory")
    directory.mkdir(parents=True, exist_ok=True)

    px = float(pixel_size)
    W = H = int(round(extent_mm * 1000.0 / px))
    extent = W * px
    grid_shape = superpixel_grid_shape((H, W), px)
    R, C = grid_shape
    log.info("simulating a %s section (%.2f x %.2f mm, %d x %d px at %g um/px, seed %d, %d genes)",
             size, extent / 1000, extent / 1000, W, H, px, seed, n_genes)

    t = time.time()
    world = World(seed, extent)
    cells = make_cells(world, seed)
    membranes, adipo_points = adipocyte_geometry(world, cells, seed)
    fibres = make_fibres(world, seed)
    log.info("world: %d cells, %d ducts/acini, %d immune aggregates, %d fibres (%.1f s)", len(cells),
             len(world.ducts), world.n_aggregates, len(fibres[0]), time.time() - t)

    # super-pixel labels and tissue mask
    t = time.time()
    rr, cc = np.mgrid[0:R, 0:C]
    regions = world.labels((cc + 0.5) * SUPER_PIXEL_UM, (rr + 0.5) * SUPER_PIXEL_UM).astype(np.uint8)
    pieces = cell_pieces(cells, adipo_points, grid_shape)
    covered = np.zeros(R * C, bool)
    covered[pieces[1]] = True
    mask = (regions.ravel() != BG) | covered
    mask = mask.reshape(R, C)
    tissue_index = np.full((R, C), -1, np.int64)
    tissue_index[mask] = np.arange(int(mask.sum()))

    names, groups, prof, loadings, prog_info = make_genes(n_genes, seed)
    prog_fields, prog_scales = programme_fields(seed, extent)
    for (name, _, _), s in zip(PROGRAMMES, prog_scales):
        prog_info[name]["field_scale_um"] = round(float(s), 2)
    truth, cell_totals, gene_totals = simulate_expression(cells, pieces, prof, loadings, prog_fields,
                                                          tissue_index, seed, progress)
    log.info("expression: %d tissue super-pixels, %.0f counts (%.1f s)", truth.shape[0], float(gene_totals.sum()),
             time.time() - t)

    # spots (the lattice covers the square image exactly: make_spots over W * px = extent)
    rows_idx, cols_idx = np.nonzero(mask)
    radius_cal = (SPOT_DIAMETER_UM / 2) / TARGET_PIXEL_SIZE_UM
    spots = pseudo_visium_spots(truth, rows_idx, cols_idx, grid_shape, (H, W), px, seed,
                                radius_calibrated_px=radius_cal)
    spot_ids, spot_counts = spots["ids"], spots["counts"]
    n_spots = len(spot_ids)
    if n_spots == 0:
        raise InputError(f"--extent-mm {extent_mm}: the field is too small to hold any spot; use a larger size")
    log.info("spots: %d pseudo-Visium spots over tissue, median %d counts", n_spots,
             int(np.median(spot_counts.sum(1))))

    # write everything atomically
    t = time.time()
    renderer = Renderer(world, cells, fibres, membranes, px, (H, W), seed)
    with Stage("simulate", directory, manifest=False) as st:
        out = st.out
        render_image(out.path(directory / "he-raw.tif"), renderer, progress)
        out.write_text(directory / "pixel-size-raw.txt", f"{px:g}\n")
        out.write_text(directory / "radius-raw.txt", f"{SPOT_DIAMETER_UM / 2 / px:.6f}\n")
        cnts = pd.DataFrame(spot_counts, columns=names)
        cnts.insert(0, "spot", spot_ids)
        cnts.to_csv(out.path(directory / "cnts.tsv"), sep="\t", index=False)
        locs = pd.DataFrame({"spot": spot_ids, "x": spots["x"], "y": spots["y"]})
        locs.to_csv(out.path(directory / "locs-raw.tsv"), sep="\t", index=False, float_format="%.4f")
        section = {
            "source": "TriHRGE simulator",
            "technology": "pseudo-Visium: 55 um spots on a 100 um hexagonal lattice, summed from 8 um truth",
            "tissue": "simulated breast cancer section",
            "spots": n_spots, "genes": int(n_genes),
            "array_x": spots["array_col"], "array_y": spots["array_row"]}
        out.write_text(directory / "section.json", json.dumps(section) + "\n")
        _write_truth(out, directory, truth, rows_idx, cols_idx, names, groups, px, seed, size, (H, W), regions,
                     cells, cell_totals)
        sim = {
            "source": "TriHRGE simulator", "seed": int(seed), "size": size, "extent_mm": round(extent / 1000, 6),
            "raw_pixel_size_um": px, "image_shape": [H, W, 3], "super_pixel_um": SUPER_PIXEL_UM,
            "grid_shape": [R, C], "n_genes": int(n_genes), "n_cells": int(len(cells)),
            "n_spots": n_spots, "n_tissue_superpixels": int(mask.sum()),
            "tissue_fraction": round(float(mask[:int(extent // 8), :int(extent // 8)].mean()), 4),
            "spot": {"diameter_um": SPOT_DIAMETER_UM, "spacing_um": SPOT_SPACING_UM, "lattice": "hexagonal",
                     "radius_calibrated_px": radius_cal},
            "cell_types": CELL_TYPES,
            "cells_per_type": {CELL_TYPES[k]: int((cells.type == k).sum()) for k in range(len(CELL_TYPES))},
            "regions": {str(i): n for i, n in enumerate(REGION_NAMES)},
            "region_colours": {REGION_NAMES[i]: list(c) for i, c in enumerate(REGION_COLOURS)},
            "region_fractions_of_tissue": {REGION_NAMES[i]: round(float((regions[mask] == i).mean()), 4)
                                           for i in range(1, len(REGION_NAMES))},
            "structures": {"ducts": int(world.n_ducts), "lobules": int(world.n_lobules),
                           "ducts_and_acini": int(len(world.ducts)), "immune_aggregates": int(world.n_aggregates)},
            "gene_groups": {g: [n for n, gg in zip(names, groups) if gg == g] for g in dict.fromkeys(groups)},
            "marker_genes": {CELL_TYPES[t]: [n for n, gg in zip(names, groups) if gg == TYPE_PREFIX[t]]
                             for t in range(len(CELL_TYPES))},
            "programmes": prog_info,
            "expression": {"library_size_per_type": dict(zip(CELL_TYPES, LIBRARY_SIZE)),
                           "nb_dispersion": NB_DISPERSION,
                           "library_scales_with": "cell area / mean area of its type",
                           "truth_split": "multinomial over super-pixels by cell-area overlap"},
            "stains": {"hematoxylin_od": STAIN_H.tolist(), "eosin_od": STAIN_E.tolist(),
                       "blur_sigma_px": renderer.sigma},
            "total_counts": int(gene_totals.sum()),
            "gene_totals": {n: int(v) for n, v in zip(names, gene_totals)},
        }
        out.write_json(directory / "truth" / "simulation.json", sim)
    log.info("wrote %s (%.1f s writing, %.1f s in all)", directory, time.time() - t, time.time() - t_start)
    return {"directory": str(directory), "image_shape": (H, W, 3), "grid_shape": grid_shape,
            "n_cells": len(cells), "n_spots": n_spots, "n_tissue_superpixels": int(mask.sum()),
            "tissue_fraction": sim["tissue_fraction"], "seconds": time.time() - t_start}


def _write_truth(out, directory, truth, rows_idx, cols_idx, names, groups, px, seed, size, image_hw, regions, cells,
                 cell_totals):
    """truth/super.h5ad (with obs region, var group) and mask.png via utils.truth, then the simulator's own
    regions.png, regions-colour.png and cells.tsv.gz."""
    X = truth
    if truth.size > DENSE_LIMIT:     # block-wise, so the conversion never holds index arrays of the whole matrix
        X = sparse.vstack([sparse.csr_matrix(truth[i:i + 32768]) for i in range(0, truth.shape[0], 32768)],
                          format="csr")
    region = pd.Categorical.from_codes(regions[rows_idx, cols_idx].astype(np.int64), categories=REGION_NAMES)
    write_truth_h5ad(out, directory, X, rows_idx, cols_idx, names, px, image_hw,
                     uns={"seed": int(seed), "size": size, "source": "TriHRGE simulator"},
                     obs={"region": region}, var={"group": pd.Categorical(groups)})
    tdir = Path(directory) / "truth"
    write_png(out.path(tdir / "regions.png"), regions)
    write_png(out.path(tdir / "regions-colour.png"), np.array(REGION_COLOURS, np.uint8)[regions])
    cdf = pd.DataFrame({"cell": np.arange(len(cells)), "x": cells.x / px, "y": cells.y / px,
                        "type": np.array(CELL_TYPES)[cells.type],
                        "radius_um": np.sqrt(cells.ca * cells.cb), "total_counts": cell_totals})
    _write_gz_tsv(out.path(tdir / "cells.tsv.gz"), cdf, float_format="%.3f")


# ----------------------------------------------------------------------------------------------------
# command line


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m utils.simulate",
        description="Simulate the built-in demo tissue: an H&E-like breast cancer section with pseudo-Visium\n"
                    "spots (55 um, 100 um hexagonal lattice) and ground truth at 8 um super-pixels, written in\n"
                    "the raw layout (he-raw.tif, pixel-size-raw.txt, cnts.tsv, locs-raw.tsv, radius-raw.txt,\n"
                    "section.json) plus DIR/truth/ (super.h5ad, mask.png, regions.png, cells.tsv.gz,\n"
                    "simulation.json).",
        formatter_class=HelpFormatter)
    p.add_argument("--directory", "-d", required=True, type=Path,
                   help="output folder (created if missing); existing files of the data set are replaced")
    p.add_argument("--size", default="small", metavar="{small,medium,large}",
                   help="field of view: small = 1.5 x 1.5 mm (seconds), medium = 3 x 3 mm, "
                        "large = 6.5 x 6.5 mm (a Visium capture area, minutes)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives a byte-identical data set")
    p.add_argument("--pixel-size", type=float, default=0.3,
                   help="raw image pixel size in um/px (deliberately not the pipeline's 0.5)")
    p.add_argument("--n-genes", type=int, default=300, help="number of simulated genes")
    p.add_argument("--extent-mm", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")

    def error(message):
        raise InputError(f"{message} (see python -m utils.simulate --help)")
    p.error = error
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    setup_logging(args.quiet)
    simulate(args.directory, size=args.size, seed=args.seed, pixel_size=args.pixel_size, n_genes=args.n_genes,
             extent_mm=args.extent_mm, progress=not args.quiet)
    return 0

