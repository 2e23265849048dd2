"""The tissue-mask method of masking_non_tissue.py: which 8 um super-pixels show tissue.

Two per-super-pixel measurements, both read from the calibrated image:
- optical density (OD) of the super-pixel's mean colour relative to the colour of the bare glass,
  OD = mean over R, G, B of log10(glass / colour), from he-small.png. Stained tissue absorbs;
  glass does not (0 by construction).
- texture: the standard deviation of the grey level over the super-pixel's 16 x 16 px, streamed
  from he.tif. At 0.5 um/px tissue is full of nuclei, fibres and membranes (std ~10-50 grey
  levels), while glass, out-of-focus smudges, the faint printed spot-array dots of ST slides and
  colour haze are smooth (std ~0-2).
A super-pixel is tissue when both are high. Thresholds: Otsu's threshold of each measurement over the
image (OD linear, texture on a log scale), clamped to a range that stays sensible when the slide has
almost no glass or almost no tissue, and applied with hysteresis (seed super-pixels above the
thresholds grow into neighbours above half of them). Fat is added: adipocytes are glass-coloured
holes enclosed by thin, textured membranes, so holes in (tissue | textured super-pixels) next to the
tissue are tissue when each is at most 20,000 um^2 (and at most --fill-holes-um2). Then a morphological closing (16 um), holes up to
--fill-holes-um2 filled (lumina, tears), regions smaller than --min-region-um2 removed.

Failure modes handled on purpose (iStar's k-means mask is reported all-black or inverted):
- the direction is fixed (tissue = absorbs + textured), so the mask cannot flip;
- the padding added by image_calibration.py and black "not scanned" fill are always background and do
  not take part in the thresholds;
- the glass colour is measured (dark or tinted images), or taken as white when there is no glass;
- an image whose smooth background is darker than its tissue (inverted / dark field) is detected and
  inverted, with a warning (--background light|dark overrides the detection);
- no tissue, or no spot on the tissue, stops with one line that says what to check.
"""
import logging

import numpy as np
from scipy import ndimage as ndi

from ..core import geometry as geo

log = logging.getLogger("trihrge")

SUPER_PIXEL_UM2 = geo.SUPER_PIXEL_UM ** 2      # 64 um^2
DEFAULT_MIN_REGION_UM2 = 10000.0               # ~ a 110 um wide fragment (~156 super-pixels)
DEFAULT_FILL_HOLES_UM2 = 40000.0               # ~ a 225 um wide hole: fat lobules, small lumina
FAT_CELL_MAX_UM2 = 20000.0                     # holes enclosed by textured membranes up to this size are fat cells
CLOSING_RADIUS_SP = 2                          # 16 um: bridges thin gaps between cells / fat walls
OD_RANGE = (0.02, 0.15)                        # automatic OD threshold is clamped to this range
TEXTURE_RANGE = (2.0, 8.0)                     # automatic texture threshold (grey levels), clamped
HYSTERESIS = 0.5                               # grow seeds into neighbours above this x the thresholds


# ---------------------------------------------------------------------------------------------
# measurements

def superpixel_texture(img, max_band_bytes=64 * 2 ** 20):
    """Std of the grey level (mean of R, G, B, rounded) over each 16 x 16 px super-pixel of an (H, W, 3)
    uint8 array or memmap, read in row bands of at most ~max_band_bytes."""
    import cv2
    sp = geo.SUPER_PIXEL_PX
    H, W = img.shape[0] // sp, img.shape[1] // sp
    out = np.empty((H, W), dtype=np.float32)
    rows = max(1, int(max_band_bytes // max(1, img.shape[1] * 3 * sp)))
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        band = np.asarray(img[r0 * sp:r1 * sp, :W * sp])
        # grey = mean of R, G, B rounded to an integer (fast in uint8; the rounding adds ~0.3 grey levels
        # of std to perfectly flat areas, far below the texture of tissue)
        grey = cv2.transform(band, np.full((1, 3), 1.0 / 3.0)).astype(np.float32)
        # INTER_AREA with an integer factor is the exact block mean
        m = cv2.resize(grey, (W, r1 - r0), interpolation=cv2.INTER_AREA)
        m2 = cv2.resize(grey * grey, (W, r1 - r0), interpolation=cv2.INTER_AREA)
        out[r0:r1] = np.sqrt(np.maximum(m2 - m * m, 0.0))
    return out


def valid_region(calibration):
    """Super-pixels that lie (at least half) inside the scaled image, i.e. not in the white padding."""
    H, W = calibration["superpixel_grid"]
    h, w = calibration["scaled_shape"]
    sp = geo.SUPER_PIXEL_PX
    valid = np.zeros((H, W), dtype=bool)
    valid[:min(H, int(np.floor(h / sp + 0.5))), :min(W, int(np.floor(w / sp + 0.5)))] = True
    return valid


def _otsu(values, log_scale=False):
    """Otsu's threshold of a 1-D sample (None when the sample is constant or empty)."""
    from skimage.filters import threshold_otsu
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or np.ptp(v) <= 1e-9:
        return None
    if log_scale:
        return float(np.expm1(threshold_otsu(np.log1p(v))))
    return float(threshold_otsu(v))


def glass_colour(rgb, candidates):
    """Per-channel colour of bare glass: the median of the brighter half of the smooth super-pixels.

    Returns (colour float[3], how) where how says whether it was measured or assumed white."""
    n = int(candidates.sum())
    if n < max(25, 0.002 * candidates.size):
        return np.array([255.0, 255.0, 255.0]), "assumed white (too little smooth background to measure it)"
    c = rgb[candidates].astype(np.float64)
    lum = c.mean(axis=1)
    bright = c[lum >= np.median(lum)]
    return np.median(bright, axis=0), f"measured on {n} smooth super-pixels"


def optical_density(rgb, glass):
    """Mean over channels of log10(glass / colour), >= 0 (colour below 1 counts as 1)."""
    c = np.maximum(rgb.astype(np.float32), 1.0)
    od = np.log10(np.asarray(glass, dtype=np.float32)[None, None, :] / c).mean(axis=2)
    return np.maximum(od, 0.0)


def _local_mean(values, usable, size=3):
    """size x size mean over usable super-pixels only (padding and no-data do not bleed in)."""
    w = ndi.uniform_filter(usable.astype(np.float32), size, mode="constant")
    v = ndi.uniform_filter(np.where(usable, values, 0).astype(np.float32), size, mode="constant")
    return np.where(usable, v / np.maximum(w, 1e-6), 0).astype(np.float32)


def _disk(radius):
    d = np.arange(-radius, radius + 1)
    return (d[:, None] ** 2 + d[None, :] ** 2) <= radius * radius


def _remove_small(mask, min_size):
    if min_size <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def _fill_small_holes(mask, max_size):
    if max_size <= 0 or not mask.any():
        return mask
    lab, n = ndi.label(~mask)  # 4-connected background
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = sizes <= max_size
    fill[0] = False
    fill[border] = False
    return mask | fill[lab]


def choose_threshold(given, auto, bounds, option, uniform_note):
    """(threshold, source): the user's value, else Otsu's clamped to `bounds`, else the upper bound."""
    if given is not None:
        return float(given), option
    if auto is None:
        return bounds[1], f"upper bound ({uniform_note})"
    t = float(np.clip(auto, *bounds))
    return t, "otsu" if t == auto else f"otsu {auto:.3g} clamped to {bounds}"


def _usable(rgb, texture, valid):
    """Super-pixels that take part: not padding, not black "not scanned" fill (nor its edge)."""
    no_data = (rgb.max(axis=2) <= 10) & (texture < 1.0)
    no_data = ndi.binary_dilation(no_data, structure=np.ones((3, 3), bool))
    return valid & ~no_data, int((valid & no_data).sum())


def _orient(rgb, lum_smooth, lum_textured, background, info):
    """Invert a dark-field image (smooth background darker than the textured tissue) for the mask."""
    bg = float(np.median(lum_smooth)) if lum_smooth.size >= 25 else None
    fg = float(np.median(lum_textured)) if lum_textured.size >= 25 else None
    info["background_brightness"] = None if bg is None else round(bg, 1)
    info["tissue_brightness"] = None if fg is None else round(fg, 1)
    looks_dark = bg is not None and fg is not None and bg < fg - 10 and bg < 128
    if background == "dark" or (background == "auto" and looks_dark):
        if background == "auto":
            log.warning("the smooth background (brightness %.0f/255) is darker than the textured tissue (%.0f/255): "
                        "treating the image as inverted / dark-field and inverting it for the mask; pass "
                        "--background light if this is a bright-field H&E", bg, fg)
        info["background"] = "dark (image inverted for the mask)"
        return 255 - rgb
    info["background"] = "light"
    return rgb


def _grow(seeds, weak):
    """The connected regions of `weak` that hold a seed."""
    lab, n = ndi.label(weak, structure=np.ones((3, 3), bool))
    has_seed = np.zeros(n + 1, bool)
    has_seed[np.unique(lab[seeds])] = True
    has_seed[0] = False
    return has_seed[lab]


def _hysteresis(m, t_od, t_tex, min_region_sp, texture_given, info):
    """Seeds above both thresholds grown into neighbours above HYSTERESIS x them; colour alone when the
    image has no textured region at all. m: the measurements (od, od_s, texture, tex_s, usable)."""
    od, od_s, texture, tex_s, usable = m
    seeds = usable & (od_s >= t_od) & (tex_s >= t_tex)
    # the super-pixel itself must show something, so the 3 x 3 mean does not push the outline onto glass
    itself = (od >= HYSTERESIS * t_od) | (texture >= HYSTERESIS * t_tex)
    weak = usable & itself & (od_s >= HYSTERESIS * t_od) & (tex_s >= HYSTERESIS * t_tex)
    info["texture_used"] = True
    if _remove_small(seeds, min_region_sp).sum() == 0 and not texture_given:
        colour_only = _remove_small(usable & (od_s >= t_od), min_region_sp)
        if colour_only.any():
            # a smooth rendering (synthetic, very blurry or heavily compressed image): colour alone
            # rather than no tissue
            log.warning("no textured region found (texture threshold %.3g grey levels), but %d super-pixels absorb "
                        "(OD >= %.3g): the image looks smooth or blurred, so the mask uses colour alone; check "
                        "the overlay, and pass --texture-threshold to force the texture rule",
                        t_tex, int(colour_only.sum()), t_od)
            seeds = usable & (od_s >= t_od)
            weak = usable & (od >= HYSTERESIS * t_od) & (od_s >= HYSTERESIS * t_od)
            info["texture_used"] = False
    info["seed_superpixels"] = int(seeds.sum())
    return _grow(seeds, weak)


def _add_fat(mask, texture, smooth, usable, t_tex, fill_holes_sp):
    """Adipocytes: glass-coloured cells enclosed by thin membranes that barely change a super-pixel's
    mean colour but make it textured, so they are small holes in (tissue | textured); fill them and
    keep their membranes. Membranes must stand clearly above the glass's own texture (noise)."""
    glass_noise = float(np.median(texture[smooth])) if smooth.any() else 0.0
    walls = usable & (texture >= max(t_tex, 2.0 * glass_noise + 1.0))
    ext = mask | walls
    cells = _fill_small_holes(ext, min(fill_holes_sp, FAT_CELL_MAX_UM2 / SUPER_PIXEL_UM2)) & ~ext & usable
    if not cells.any():
        return mask, 0
    fat = cells | (walls & ndi.binary_dilation(cells, structure=np.ones((3, 3), bool)))
    fat &= _grow(mask, mask | fat)   # only fat that touches the tissue (a lone net of lines is not fat)
    return mask | fat, int((fat & ~mask).sum())


def _clean_up(mask, usable, min_region_sp, fill_holes_sp):
    """Closing (CLOSING_RADIUS_SP), small holes filled, small regions removed; the region count."""
    mask = ndi.binary_closing(np.pad(mask, CLOSING_RADIUS_SP), structure=_disk(CLOSING_RADIUS_SP))
    mask = mask[CLOSING_RADIUS_SP:-CLOSING_RADIUS_SP, CLOSING_RADIUS_SP:-CLOSING_RADIUS_SP] & usable
    mask = _fill_small_holes(mask, fill_holes_sp) & usable
    mask = _remove_small(mask, min_region_sp)
    return mask, int(ndi.label(mask, structure=np.ones((3, 3), bool))[1])


def compute_mask(rgb, texture, valid, threshold=None, texture_threshold=None,
                 min_region_sp=DEFAULT_MIN_REGION_UM2 / SUPER_PIXEL_UM2,
                 fill_holes_sp=DEFAULT_FILL_HOLES_UM2 / SUPER_PIXEL_UM2, background="auto"):
    """The tissue mask (bool, grid shape) and a dict describing how it was made.

    rgb: (H, W, 3) mean colour per super-pixel (he-small.png); texture: (H, W) grey-level std per
    super-pixel; valid: (H, W) bool, False on padding. threshold / texture_threshold override the
    automatic ones; background: 'auto' | 'light' | 'dark'."""
    rgb = np.asarray(rgb)
    texture = np.asarray(texture, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if rgb.shape[:2] != texture.shape or texture.shape != valid.shape:
        raise ValueError(f"shape mismatch: rgb {rgb.shape}, texture {texture.shape}, valid {valid.shape}")
    usable, n_no_data = _usable(rgb, texture, valid)
    info = {"no_data_superpixels": n_no_data}
    if not usable.any():
        return np.zeros(valid.shape, bool), dict(info, empty_reason="the image holds no pixels besides padding")

    tex_s = _local_mean(texture, usable)
    # texture first: it does not depend on colour, so it also decides what the glass is
    t_tex, info["texture_threshold_source"] = choose_threshold(
        texture_threshold, _otsu(tex_s[usable], log_scale=True), TEXTURE_RANGE, "--texture-threshold",
        "the texture is uniform")
    info["texture_threshold"] = round(t_tex, 4)
    smooth = usable & (tex_s < HYSTERESIS * t_tex)
    lum = rgb.astype(np.float32).mean(axis=2)
    rgb = _orient(rgb, lum[smooth], lum[usable & (tex_s >= t_tex)], background, info)

    glass, info["glass_source"] = glass_colour(rgb, smooth)
    info["glass_rgb"] = [round(float(g), 1) for g in glass]
    od = optical_density(rgb, glass)
    od_s = _local_mean(od, usable)
    t_od, info["threshold_source"] = choose_threshold(threshold, _otsu(od_s[usable]), OD_RANGE, "--threshold",
                                                      "the optical density is uniform")
    info["threshold"] = round(t_od, 4)

    mask = _hysteresis((od, od_s, texture, tex_s, usable), t_od, t_tex, min_region_sp,
                       texture_threshold is not None, info)
    info["fat_superpixels"] = 0
    if info["texture_used"] and mask.any():
        mask, info["fat_superpixels"] = _add_fat(mask, texture, smooth, usable, t_tex, fill_holes_sp)
    mask, info["regions"] = _clean_up(mask, usable, min_region_sp, fill_holes_sp)
    if not mask.any():
        info["empty_reason"] = (f"no super-pixel has optical density >= {t_od:.3g} and texture >= {t_tex:.3g} "
                                f"in a region of at least {min_region_sp * SUPER_PIXEL_UM2:.0f} um^2")
    return mask, info


def spots_inside(mask, locs):
    """Bool per spot: the super-pixel under the spot centre is tissue (False outside the grid)."""
    H, W = mask.shape
    r = np.floor(np.asarray(locs["y"], dtype=np.float64) / geo.SUPER_PIXEL_PX).astype(np.int64)
    c = np.floor(np.asarray(locs["x"], dtype=np.float64) / geo.SUPER_PIXEL_PX).astype(np.int64)
    ok = (r >= 0) & (c >= 0) & (r < H) & (c < W)
    out = np.zeros(len(r), bool)
    out[ok] = mask[r[ok], c[ok]]
    return out
