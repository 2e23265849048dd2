"""The weights-free `stain` backbone: hand-made colour and texture statistics per 8 um super-pixel.

What it is (and is not): no learned model. Each pixel's optical density is split into hematoxylin
(nuclei) and eosin (cytoplasm, stroma) concentrations by colour deconvolution, with stain vectors
estimated from the slide itself (Macenko et al. 2009; the fixed Ruifrok-Johnston vectors when the
slide holds too little tissue for an estimate). From these, per super-pixel:

- micro (24 channels): means / spreads / maxima of the stain densities, the fractions of empty,
  nuclear and eosin-rich pixels, nuclei found by multi-scale Laplacian-of-Gaussian blob detection
  (count and mean radius), blob, gradient, structure-tensor (fibre alignment) and ridge responses at
  several scales, and a fine texture measure from the full-resolution image.
- meso (29): the micro channels pooled by a Gaussian of sigma 3.5 super-pixels (~95 % of the weight
  inside the 14 x 14 super-pixel = 112 um tile around the super-pixel), plus the local spread
  (standard deviation over the same window) of five key channels: heterogeneity.
- macro (29): the same with sigma 14 super-pixels (~448 um context).

Everything except the fine texture runs at 1 um/px (half the calibrated resolution, 8 x 8 px per
super-pixel). The slide is processed in bands of super-pixel rows with a halo wider than every
filter, and the image edges are mirrored the same way whatever the band, so the result does not
depend on where band boundaries fall (tested) and there is no tile grid at all: shifted passes are
not needed for this backbone.
"""
import logging
import math

import numpy as np

from ..core import geometry as geo

log = logging.getLogger("trihrge")

NAME = "stain"
VERSION = 1
SP = geo.SUPER_PIXEL_PX          # 16 px at 0.5 um/px
DOWN = 2                         # analysis at 1 um/px
SPD = SP // DOWN                 # 8 px per super-pixel at the analysis resolution
HALO_SP = 3                      # super-pixels of context above/below a band (24 px at 1 um/px)

MICRO_CHANNELS = [
    "h_mean", "e_mean", "od_mean", "h_std", "e_std", "od_std", "h_max",
    "empty_frac", "nuclear_frac", "eosin_frac",
    "nuclei_count", "nuclei_radius_um",
    "blob_h_1um", "blob_h_2.5um", "blob_h_5um",
    "texture_fine", "grad_h_1um", "grad_e_1um", "grad_h_3um", "grad_e_3um",
    "coherence_e", "coherence_h", "ridge_e", "lumen_4um",
]
# per-super-pixel statistics that use no spatial filter: a square of colour changes exactly these
POINTWISE_CHANNELS = MICRO_CHANNELS[:10]
SPREAD_CHANNELS = ["h_mean", "e_mean", "od_mean", "nuclei_count", "empty_frac"]
CONTEXT_SIGMA_SP = {"meso": 3.5, "macro": 14.0}


def micro_channels(nuclei: bool = False):
    """The micro channel names; with `nuclei`, the segmentation's morphology (nuclei_morphology.py) after them."""
    from .nuclei_morphology import CHANNELS
    return MICRO_CHANNELS + (CHANNELS if nuclei else [])


def context_channels(nuclei: bool = False):
    return micro_channels(nuclei) + [f"{c}_spread" for c in SPREAD_CHANNELS]


# Ruifrok & Johnston (2001) optical density vectors (R, G, B) for hematoxylin and eosin
RUIFROK_H = (0.650, 0.704, 0.286)
RUIFROK_E = (0.072, 0.990, 0.105)
# Macenko's reference maximum concentrations (natural-log OD), used to put slides on one scale
REF_MAX_CONC = (1.9705, 1.0308)
OD_BETA = 0.15                  # OD below this in every channel: empty (background, lumen, fat)
BACKGROUND = 255.0


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


_OD_LUT = (-np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / BACKGROUND)).astype(np.float32)


def _od(rgb_u8):
    """Natural-log optical density of uint8 RGB (any shape), via a lookup table (float32)."""
    return _OD_LUT[rgb_u8]


def stain_matrix(h, e):
    """3 x 3 matrix whose rows are the unit OD vectors of H, E and their complement; the inverse maps
    OD -> concentrations."""
    h, e = _unit(h), _unit(e)
    r = np.cross(h, e)
    r = _unit(np.abs(r)) if np.linalg.norm(r) > 1e-6 else _unit((0.27, 0.57, 0.78))
    return np.stack([h, e, r])


def estimate_stains(pixels_u8, method="macenko"):
    """Stain vectors and concentration scales from a sample of tissue pixels (N x 3 uint8 RGB).

    Returns a dict with 'h', 'e' (unit OD vectors), 'scale' (per-stain factor applied to the
    concentrations), 'method' (what was actually used) and 'reason' when it fell back."""
    ruifrok = {"h": list(map(float, _unit(RUIFROK_H))), "e": list(map(float, _unit(RUIFROK_E))),
               "scale": [1.0, 1.0], "method": "ruifrok"}
    if method == "ruifrok":
        return ruifrok
    px = np.asarray(pixels_u8, dtype=np.float64).reshape(-1, 3)
    od = -np.log(np.maximum(px, 1.0) / BACKGROUND)
    od = od[(od > OD_BETA).all(axis=1)]
    if len(od) < 2000:
        return dict(ruifrok, reason=f"only {len(od)} stained pixels sampled (need 2000)")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]                          # the two largest eigenvectors
    plane = plane * np.sign(plane.sum(axis=0))    # point them into the positive octant
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [1, 99])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    if (v1 < 0).any() or (v2 < 0).any():
        return dict(ruifrok, reason="estimated stain vectors have negative OD components")
    angle = math.degrees(math.acos(np.clip(np.dot(_unit(v1), _unit(v2)), -1, 1)))
    if angle < 8.0:
        return dict(ruifrok, reason=f"colours too uniform to separate two stains ({angle:.1f} deg apart)")
    # hematoxylin absorbs more red than eosin does
    h, e = (v1, v2) if v1[0] / np.linalg.norm(v1) > v2[0] / np.linalg.norm(v2) else (v2, v1)
    M = stain_matrix(h, e)
    conc = od @ np.linalg.inv(M)
    maxc = np.percentile(conc[:, :2], 99, axis=0)
    if (maxc <= 1e-3).any():
        return dict(ruifrok, reason="degenerate stain concentrations")
    return {"h": list(map(float, _unit(h))), "e": list(map(float, _unit(e))),
            "scale": [float(REF_MAX_CONC[0] / maxc[0]), float(REF_MAX_CONC[1] / maxc[1])],
            "method": "macenko", "angle_deg": round(angle, 2)}


def sample_tissue_pixels(img, small, max_superpixels=600, release=None):
    """RGB pixels (N x 3, uint8) from up to max_superpixels stained super-pixels spread evenly over the
    slide (chosen from he-small.png), read at the analysis resolution; deterministic. release(img, r0, r1)
    is called for pixel rows already sampled (keeps memory-mapped pages from piling up)."""
    od_small = -np.log(np.maximum(small.astype(np.float64), 1.0) / BACKGROUND).mean(axis=2)
    idx = np.flatnonzero(od_small.ravel() > OD_BETA)
    if len(idx) == 0:
        return np.zeros((0, 3), np.uint8)
    pick = idx[np.unique(np.linspace(0, len(idx) - 1, min(max_superpixels, len(idx))).round().astype(int))]
    rows, cols = np.unravel_index(pick, od_small.shape)   # row-major order
    out = []
    for k, (r, c) in enumerate(zip(rows, cols)):
        block = np.asarray(img[r * SP:(r + 1) * SP, c * SP:(c + 1) * SP])
        if block.shape[:2] == (SP, SP):
            out.append(block.reshape(SPD, DOWN, SPD, DOWN, 3).mean(axis=(1, 3)).round().astype(np.uint8).reshape(-1, 3))
        if release is not None and (k + 1 == len(rows) or rows[k + 1] != r):
            release(img, 0, (r + 1) * SP)
    return np.concatenate(out) if out else np.zeros((0, 3), np.uint8)


def choose_thresholds(pixels_u8, stains):
    """Slide-level thresholds on the normalised H and E concentrations (Otsu among stained pixels,
    clamped to a sensible range; defaults when there are too few)."""
    from skimage.filters import threshold_otsu
    thr = {"h": 0.6, "e": 0.4, "source": "default"}
    if len(pixels_u8) >= 2000:
        od = _od(np.ascontiguousarray(pixels_u8.reshape(-1, 1, 3))).reshape(-1, 3).astype(np.float64)
        keep = (od > OD_BETA).all(axis=1)
        if keep.sum() >= 2000:
            conc = od[keep] @ np.linalg.inv(stain_matrix(stains["h"], stains["e"]))
            h = conc[:, 0] * stains["scale"][0]
            e = conc[:, 1] * stains["scale"][1]
            thr = {"h": float(np.clip(threshold_otsu(h), 0.3, 1.5)),
                   "e": float(np.clip(threshold_otsu(e), 0.2, 1.0)), "source": "otsu"}
    return thr


# ---------------------------------------------------------------------------------------------
# filters (explicit kernels with radius ceil(3 sigma), so the halo is known exactly)

def _gauss_kernels(sigma):
    r = int(math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    d1 = -x / sigma ** 2 * g
    d1 -= d1.mean()
    d1 *= -1.0 / np.sum(x * d1)                      # unit response to a unit ramp
    d2 = (x ** 2 / sigma ** 4 - 1.0 / sigma ** 2) * g
    d2 -= d2.mean()                                  # zero response to a constant
    d2 *= 2.0 / np.sum(x ** 2 * d2)                  # response 2 to x^2
    # sepFilter2D correlates; flip the odd kernel so the derivative has the right sign
    return g.astype(np.float32), d1[::-1].astype(np.float32).copy(), d2.astype(np.float32)


def _sep(img, kx, ky):
    import cv2
    return cv2.sepFilter2D(img, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT_101)


def _blur(img, sigma):
    g, _, _ = _gauss_kernels(sigma)
    return _sep(img, g, g)


def _grad(img, sigma):
    g, d1, _ = _gauss_kernels(sigma)
    return _sep(img, d1, g), _sep(img, g, d1)


def _hessian(img, sigma):
    g, d1, d2 = _gauss_kernels(sigma)
    return _sep(img, d2, g), _sep(img, g, d2), _sep(img, d1, d1)


def _neg_log(img, sigma):
    """Scale-normalised -LoG: positive on bright blobs of radius ~ sigma * sqrt(2)."""
    g, _, d2 = _gauss_kernels(sigma)
    return -(sigma ** 2) * (_sep(img, d2, g) + _sep(img, g, d2))


def _block_mean(a):
    """(H, W) float32 at the analysis resolution -> per super-pixel means (H/8, W/8); an exact 8 x 8
    box average (OpenCV's area interpolation with an integer factor)."""
    import cv2
    return cv2.resize(a, (a.shape[1] // SPD, a.shape[0] // SPD), interpolation=cv2.INTER_AREA)


def _block_max(a):
    h, w = a.shape[0] // SPD, a.shape[1] // SPD
    return a.reshape(h, SPD, w, SPD).max(axis=(1, 3))


NUCLEUS_SIGMAS = (1.5, 2.2, 3.2)   # px at 1 um/px: radii sigma*sqrt(2) = 2.1 .. 4.5 um
NUCLEUS_RESPONSE = 0.3           # LoG response threshold, as a fraction of the nuclear H threshold
MAX_FILTER_RADIUS = 16             # px at 1 um/px; must stay within HALO_SP * SPD


class StainExtractor:
    """Computes micro features for bands of super-pixel rows of a calibrated image (memmap)."""

    def __init__(self, stains, thresholds, *, nuclei: bool = False):
        self.stains = stains
        self.nuclei = nuclei
        self.thresholds = thresholds
        M = stain_matrix(stains["h"], stains["e"])
        inv = np.linalg.inv(M)                       # od_row @ inv -> concentrations
        scale = np.array([stains["scale"][0], stains["scale"][1], 1.0])
        # cv2.transform computes m @ pixel, so give it the transposed, scaled inverse
        self._m = (inv * scale[None, :]).T.astype(np.float32)
        self.channels = micro_channels(nuclei)
        assert HALO_SP * SPD >= MAX_FILTER_RADIUS

    @property
    def dim(self):
        return len(self.channels)

    def read_band(self, img, r0, r1):
        """Full-resolution rows of super-pixel rows [r0, r1) plus the halo, mirrored at the image edges
        exactly as a whole-image filter would, so results never depend on the band split."""
        import cv2
        H = img.shape[0] // SP
        a0, a1 = max(0, r0 - HALO_SP), min(H, r1 + HALO_SP)
        band = np.ascontiguousarray(img[a0 * SP:a1 * SP, : (img.shape[1] // SP) * SP])
        top, bottom = (HALO_SP - (r0 - a0)) * SP, (HALO_SP - (a1 - r1)) * SP
        if top or bottom:
            if band.shape[0] > max(top, bottom):
                band = cv2.copyMakeBorder(band, top, bottom, 0, 0, cv2.BORDER_REFLECT_101)
            else:                                    # tiny image: mirror repeatedly (same rule)
                band = np.pad(band, ((top, bottom), (0, 0), (0, 0)), mode="reflect")
        return band

    def micro_band(self, img, r0, r1):
        """(r1 - r0, grid_cols, self.dim) float32 micro features of super-pixel rows [r0, r1)."""
        import cv2
        full = self.read_band(img, r0, r1)
        f = {"texture_fine": _fine_texture(full)}
        # analysis resolution: 1 um/px (exact 2 x 2 means, aligned with the super-pixels)
        half = cv2.resize(full, (full.shape[1] // DOWN, full.shape[0] // DOWN), interpolation=cv2.INTER_AREA)
        del full
        H, E, odm, empty = self._stain_planes(half)
        th, te = self.thresholds["h"], self.thresholds["e"]
        f.update(_density_statistics(H, E, odm, empty, th, te))
        del empty
        f.update(_nuclei(H, th))
        f.update(_structure(H, E, odm))
        out = np.stack([f[c] for c in MICRO_CHANNELS], axis=2)[HALO_SP:HALO_SP + (r1 - r0)]
        if self.nuclei:
            from .nuclei_morphology import morphology_band
            nuc = morphology_band(H, th, spd=SPD, halo_sp=HALO_SP, n_rows=r1 - r0, blur=_blur)
            out = np.concatenate([out, nuc], axis=2)
        return out

    def _stain_planes(self, half):
        """(H, E, mean OD, empty mask) at 1 um/px: colour deconvolution of the optical density."""
        import cv2
        od = _od(half)                                           # (h, w, 3) natural-log OD
        conc = cv2.transform(od, self._m)                        # (h, w, 3): H, E, residual
        H = np.ascontiguousarray(np.maximum(conc[..., 0], 0))
        E = np.ascontiguousarray(np.maximum(conc[..., 1], 0))
        del conc
        odm = cv2.transform(od, np.full((1, 3), 1 / 3, np.float32))
        empty = np.maximum(np.maximum(od[..., 0], od[..., 1]), od[..., 2]) < OD_BETA
        return H, E, odm, empty


def _fine_texture(full):
    """Fine texture at 0.5 um/px: the mean Sobel gradient magnitude of the grey level (0..1) per super-pixel."""
    import cv2
    grey = cv2.cvtColor(full, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3, scale=1 / (8 * 255.0), borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3, scale=1 / (8 * 255.0), borderType=cv2.BORDER_REFLECT_101)
    fine = cv2.magnitude(gx, gy)
    return cv2.resize(fine, (fine.shape[1] // SP, full.shape[0] // SP), interpolation=cv2.INTER_AREA)


def _density_statistics(H, E, odm, empty, th, te):
    """Means, spreads and maximum of the stain densities; the empty, nuclear and eosin-rich fractions."""
    m = {k: _block_mean(v) for k, v in (("h", H), ("e", E), ("od", odm), ("hh", H * H), ("ee", E * E),
                                         ("oo", odm * odm))}
    return {"h_mean": m["h"], "e_mean": m["e"], "od_mean": m["od"],
            "h_std": np.sqrt(np.maximum(m["hh"] - m["h"] ** 2, 0)),
            "e_std": np.sqrt(np.maximum(m["ee"] - m["e"] ** 2, 0)),
            "od_std": np.sqrt(np.maximum(m["oo"] - m["od"] ** 2, 0)),
            "h_max": _block_max(H),
            "empty_frac": _block_mean(empty.astype(np.float32)),
            "nuclear_frac": _block_mean((H > th).astype(np.float32)),
            "eosin_frac": _block_mean((E > te).astype(np.float32))}


def _nuclei(H, th):
    """Nuclei as scale-normalised LoG blobs of H, local maxima over space (5 x 5) and scale: their
    count and mean radius per super-pixel."""
    import cv2
    rmax, best = None, None
    for k, s in enumerate(NUCLEUS_SIGMAS):
        r = _neg_log(H, s)
        if rmax is None:
            rmax, best = r, np.zeros(r.shape, np.uint8)
        else:
            best[r > rmax] = k
            rmax = np.maximum(rmax, r)
    peak = (rmax >= cv2.dilate(rmax, np.ones((5, 5), np.uint8), borderType=cv2.BORDER_REFLECT_101))
    peak &= rmax > NUCLEUS_RESPONSE * th
    peak &= _blur(H, 1.0) > 0.5 * th
    radii = (np.asarray(NUCLEUS_SIGMAS, np.float32) * math.sqrt(2) * DOWN * geo.TARGET_PIXEL_SIZE_UM)[best]
    count = np.rint(_block_mean(peak.astype(np.float32)) * (SPD * SPD))
    radius = _block_mean(np.where(peak, radii, 0).astype(np.float32)) * (SPD * SPD) / np.maximum(count, 1)
    return {"nuclei_count": count, "nuclei_radius_um": radius}


def _structure(H, E, odm):
    """Blob, gradient, structure-tensor (fibre alignment), ridge and lumen responses at several scales."""
    import cv2
    f = {}
    for name, s in (("blob_h_1um", 1.0), ("blob_h_2.5um", 2.5), ("blob_h_5um", 5.0)):
        f[name] = _block_mean(np.maximum(_neg_log(H, s), 0))
    for stain, img_ in (("h", H), ("e", E)):
        for name, s in ((f"grad_{stain}_1um", 1.0), (f"grad_{stain}_3um", 3.0)):
            gx, gy = _grad(img_, s)
            f[name] = _block_mean(cv2.magnitude(gx, gy))
    # structure tensor (derivative sigma 1, integration sigma 3): coherence = fibre alignment
    for stain, img_ in (("e", E), ("h", H)):
        gx, gy = _grad(img_, 1.0)
        jxx, jyy, jxy = _blur(gx * gx, 3.0), _blur(gy * gy, 3.0), _blur(gx * gy, 3.0)
        del gx, gy
        tr = jxx + jyy
        f[f"coherence_{stain}"] = _block_mean(((jxx - jyy) ** 2 + 4 * jxy ** 2) / (tr ** 2 + 1e-4))
    # ridges of E (fibres): strongly negative curvature across, sigma 1.5
    xx, yy, xy = _hessian(E, 1.5)
    lam_min = 0.5 * (xx + yy) - np.sqrt(0.25 * (xx - yy) ** 2 + xy ** 2)
    f["ridge_e"] = _block_mean(np.maximum(-(1.5 ** 2) * lam_min, 0))
    # bright round structures (lumens, vacuoles, fat) of ~6 um radius: blobs of (-OD)
    f["lumen_4um"] = _block_mean(np.maximum(_neg_log(-odm, 4.0), 0))
    return f


def context_band(micro, r0, r1, sigma_sp):
    """Meso/macro features of super-pixel rows [r0, r1) from the micro map (memmap or array, H x W x C),
    read with a halo of ceil(3 sigma) rows and mirrored at the grid edges; Gaussian pooling of every
    micro channel plus the local spread (standard deviation) of SPREAD_CHANNELS."""
    import cv2
    H, W = micro.shape[:2]
    g, _, _ = _gauss_kernels(sigma_sp)
    r = len(g) // 2
    a0, a1 = max(0, r0 - r), min(H, r1 + r)
    band = np.asarray(micro[a0:a1], dtype=np.float32)
    top, bottom = r - (r0 - a0), r - (a1 - r1)
    row_mode = "reflect" if band.shape[0] > 1 else "edge"
    col_mode = "reflect" if W > 1 else "edge"
    band = np.pad(band, ((top, bottom), (r, r), (0, 0)), mode=row_mode) if row_mode == col_mode else \
        np.pad(np.pad(band, ((top, bottom), (0, 0), (0, 0)), mode=row_mode), ((0, 0), (r, r), (0, 0)), mode=col_mode)
    idx = [MICRO_CHANNELS.index(c) for c in SPREAD_CHANNELS]
    n = band.shape[2]
    pooled = []
    for k in list(range(n)) + idx:
        c = np.ascontiguousarray(band[..., k] if len(pooled) < n else band[..., k] ** 2)
        pooled.append(cv2.sepFilter2D(c, cv2.CV_32F, g, g, borderType=cv2.BORDER_REFLECT_101)[r:r + (r1 - r0), r:r + W])
    spreads = [np.sqrt(np.maximum(pooled[n + j] - pooled[i] ** 2, 0)) for j, i in enumerate(idx)]
    return np.stack(pooled[:n] + spreads, axis=2)
