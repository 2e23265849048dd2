"""Smooth random fields and the simulated world: region fields, ducts, immune aggregates."""
import math

import numpy as np
from scipy import ndimage

from .constants import BG, DUCT, FAT, IMMUNE, LUMEN, STROMA, TUMOUR, _rng


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
