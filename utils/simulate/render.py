"""The H&E image: fibres, stain densities drawn strip by strip, Beer-Lambert mixing, blur and noise, written into an uncompressed TIFF memmap."""
import math

import cv2
import numpy as np
from tqdm import tqdm

from ..core.atomic import rgb_tiff_memmap
from .constants import (
    BG,
    DUCT,
    FAT,
    GLASS_OD,
    IMMUNE,
    LUMEN,
    PIXEL_NOISE,
    REGION_E,
    REGION_H,
    STAIN_E,
    STAIN_H,
    STRIP_PIXELS,
    STROMA,
    T_ADI,
    T_EPI,
    T_TUM,
    TUMOUR,
    _rng,
)


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


def _to_rgb(h, e, rng):
    """uint8 RGB from the H and E densities (Beer-Lambert on glass) with the camera's pixel noise."""
    out = np.empty((*h.shape, 3), np.uint8)
    for c in range(3):
        od = h * np.float32(STAIN_H[c]) + e * np.float32(STAIN_E[c]) + np.float32(GLASS_OD[c])
        val = np.float32(255.0) * np.exp(-od)
        val += rng.standard_normal(val.shape, dtype=np.float32) * np.float32(PIXEL_NOISE)
        np.clip(val, 0, 255, out=val)
        out[..., c] = (val + 0.5).astype(np.uint8)
    return out


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
        """uint8 RGB rows [y0, y1) of the H&E, drawn with a margin above and below so that no blur
        or shape depends on where strips are cut."""
        ya, yb = max(0, y0 - self.margin), min(self.H, y1 + self.margin)
        v = _upsampled_values(self.world, max(1, int(round(1.2 / self.px))), self.px, ya, yb, self.W)
        lab, secretions = self._labels(v, ya, yb)
        h, e = REGION_H[lab], REGION_E[lab]
        stroma, immune, fat = lab == STROMA, lab == IMMUNE, lab == FAT
        # stroma ground substance: low, slightly mottled eosin
        e += stroma * (0.05 * _smooth_noise(self.seed, 1, ya, yb, self.W, max(2, int(round(2.0 / self.px)))))
        fib = self._fibres(ya, yb)
        e += fib * stroma
        e += fib * immune * 0.4
        if fat.any() and len(self.membranes):
            mem = self._membranes(fat, ya, yb)
            e += fat * mem * 0.48
            h += fat * mem * 0.10
        for X, Y, a16, b16, deg in secretions:
            cv2.ellipse(e, (X, Y), (max(a16, 1), max(b16, 1)), deg, 0, 360, 0.16, -1, cv2.LINE_8, 4)
        self._draw_cells(h, e, ya, yb)
        h, e = self._stain_variation(h, e, v, ya, yb)
        return _to_rgb(h[y0 - ya:y1 - ya], e[y0 - ya:y1 - ya], _rng(self.seed, 10, strip_index))

    def _labels(self, v, ya, yb):
        """(region label per pixel, the ducts' lumen secretions to draw) of rows [ya, yb)."""
        px = self.px
        lab = np.full((yb - ya, self.W), STROMA, np.uint8)
        lab[v["immune"] > 0] = IMMUNE
        lab[v["fat"] > 0] = FAT
        lab[v["tumour"] > 0] = TUMOUR
        lab[v["tissue"] <= 0] = BG
        # ducts: epithelial ring + lumen drawn exactly
        um0, um1 = ya * px, yb * px
        secretions = []
        for cx, cy, a, b, ang, th, secr in self.world.ducts:
            if cy + a < um0 or cy - a > um1:
                continue
            X, Y = self._xy16(cx, cy, ya)
            deg = math.degrees(ang)
            cv2.ellipse(lab, (int(X), int(Y)), (int(a / px * 16), int(b / px * 16)), deg, 0, 360, DUCT, -1, cv2.LINE_8, 4)
            la, lb = max(a - th, 1.0), max(b - th, 1.0)
            cv2.ellipse(lab, (int(X), int(Y)), (int(la / px * 16), int(lb / px * 16)), deg, 0, 360, LUMEN, -1, cv2.LINE_8, 4)
            if secr:
                secretions.append((int(X), int(Y), int(la * 0.6 / px * 16), int(lb * 0.55 / px * 16), deg))
        return lab, secretions

    def _fibres(self, ya, yb):
        """The collagen fibres' eosin of rows [ya, yb), blurred."""
        px = self.px
        sel = np.flatnonzero((self.fib_ymax >= ya * px - 3) & (self.fib_ymin <= yb * px + 3))
        bucket = self.fib_bucket[sel]

        def draw(canvas, lines):
            for b, (thick, val) in enumerate(self.fib_table):
                if (bucket == b).any():
                    cv2.polylines(canvas, lines[bucket == b], False, float(val), max(1, int(round(thick / px))),
                                  cv2.LINE_8, 4)
        return cv2.GaussianBlur(self._lines(self.fib_pts[sel], ya, yb, draw), (0, 0), max(0.5, 0.35 / px))

    def _membranes(self, fat, ya, yb):
        """The fat cells' thin membranes and the lobules' outer boundary in rows [ya, yb), blurred."""
        px = self.px
        sel = np.flatnonzero((self.mem_ymax >= ya * px - 2) & (self.mem_ymin <= yb * px + 2))
        mem = self._lines(self.membranes[sel], ya, yb, lambda canvas, lines: cv2.polylines(
            canvas, lines, False, 1.0, max(1, int(round(0.6 / px))), cv2.LINE_8, 4))
        fat8 = fat.astype(np.uint8)
        k = 2 * max(1, int(round(0.45 / px))) + 1
        edge = fat8 - cv2.erode(fat8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        np.maximum(mem, edge.astype(np.float32), out=mem)
        return cv2.GaussianBlur(mem, (0, 0), max(0.5, 0.25 / px))

    def _lines(self, P, ya, yb, draw):
        """float32 rows [ya, yb) with the polylines P (um; lines x points x 2) drawn by draw(canvas,
        points in the 1/16 px fixed point of cv2's shift 4); zeros without lines."""
        if not len(P):
            return np.zeros((yb - ya, self.W), np.float32)
        canvas, pad = self._line_canvas(P, ya, yb)
        X, Y = self._xy16(P[..., 0], P[..., 1], ya - pad)
        draw(canvas, np.stack([X, Y], -1).astype(np.int32))
        return np.ascontiguousarray(canvas[pad:pad + yb - ya])

    def _stain_variation(self, h, e, v, ya, yb):
        """Chromatin texture, the slide's stain variation and the optics' blur."""
        px, W = self.px, self.W
        tex = _smooth_noise(self.seed, 2, ya, yb, W, max(1, int(round(0.5 / px))))
        tex2 = _smooth_noise(self.seed, 3, ya, yb, W, max(1, int(round(1.5 / px))))
        h *= np.clip(1.0 + 0.28 * tex + 0.12 * tex2, 0.3, None)
        h *= self.stain_gain[0] * (1.0 + 0.06 * v["stain_h"])
        e *= self.stain_gain[1] * (1.0 + 0.07 * v["stain_e"])
        return cv2.GaussianBlur(h, (0, 0), self.sigma), cv2.GaussianBlur(e, (0, 0), self.sigma)

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
    """Render strip by strip into an uncompressed RGB TIFF at path (atomic.rgb_tiff_memmap)."""
    import tifffile
    H, W = renderer.H, renderer.W
    rgb_tiff_memmap(path, H, W).flush()
    rows = int(max(64, min(512, STRIP_PIXELS // W)))
    n_strips = -(-H // rows)
    for k in tqdm(range(n_strips), desc="image", unit="strip", disable=not progress):
        y0, y1 = k * rows, min(H, (k + 1) * rows)
        strip = renderer.render(y0, y1, k)
        mm = tifffile.memmap(str(path), mode="r+")
        mm[y0:y1] = strip
        mm.flush()
        del mm
