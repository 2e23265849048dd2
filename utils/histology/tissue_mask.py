"""Stage logic of masking_non_tissue.py: which 8 um super-pixels show tissue.

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
import json
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..core import geometry as geo
from ..core.atomic import StagedOutputs, remove_stale_temporaries
from ..core.errors import InputError
from ..core.image_io import CALIBRATED_IMAGE, open_calibrated, read_png, write_png
from ..core.manifest import changed_since_last_run, check_upstream, write_manifest

log = logging.getLogger("trihrge")

STAGE = "masking_non_tissue"
SCRIPT = "masking_non_tissue.py"
MASK = "mask.png"
OVERLAY = "mask-overlay.png"
MASK_JSON = "mask.json"

SUPER_PIXEL_UM2 = geo.SUPER_PIXEL_UM ** 2      # 64 um^2
DEFAULT_MIN_REGION_UM2 = 10000.0               # ~ a 110 um wide fragment (~156 super-pixels)
DEFAULT_FILL_HOLES_UM2 = 40000.0               # ~ a 225 um wide hole: fat lobules, small lumina
FAT_CELL_MAX_UM2 = 20000.0                     # holes enclosed by textured membranes up to this size are fat cells
CLOSING_RADIUS_SP = 2                          # 16 um: bridges thin gaps between cells / fat walls
OD_RANGE = (0.02, 0.15)                        # automatic OD threshold is clamped to this range
TEXTURE_RANGE = (2.0, 8.0)                     # automatic texture threshold (grey levels), clamped
HYSTERESIS = 0.5                               # grow seeds into neighbours above this x the thresholds
SPOTS_INSIDE_WARN = 0.9


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
    info = {}
    # black "not scanned" fill: no signal at all, never tissue, not part of the statistics
    no_data = (rgb.max(axis=2) <= 10) & (texture < 1.0)
    no_data = ndi.binary_dilation(no_data, structure=np.ones((3, 3), bool))  # its edge is an edge, not tissue
    usable = valid & ~no_data
    info["no_data_superpixels"] = int((valid & no_data).sum())
    if not usable.any():
        return np.zeros(valid.shape, bool), dict(info, empty_reason="the image holds no pixels besides padding")

    tex_s = _local_mean(texture, usable)
    # texture threshold (independent of colour, so it also decides what the glass is)
    t_tex_auto = _otsu(tex_s[usable], log_scale=True)
    if texture_threshold is not None:
        t_tex = float(texture_threshold)
        info["texture_threshold_source"] = "--texture-threshold"
    elif t_tex_auto is None:
        t_tex = TEXTURE_RANGE[1]
        info["texture_threshold_source"] = "upper bound (the texture is uniform)"
    else:
        t_tex = float(np.clip(t_tex_auto, *TEXTURE_RANGE))
        info["texture_threshold_source"] = ("otsu" if t_tex == t_tex_auto else
                                            f"otsu {t_tex_auto:.3g} clamped to {TEXTURE_RANGE}")
    info["texture_threshold"] = round(t_tex, 4)

    smooth = usable & (tex_s < HYSTERESIS * t_tex)
    textured = usable & (tex_s >= t_tex)
    # light or dark background: smooth background brighter than the textured tissue (bright field)?
    lum = rgb.astype(np.float32).mean(axis=2)
    bg_lum = float(np.median(lum[smooth])) if smooth.sum() >= 25 else None
    fg_lum = float(np.median(lum[textured])) if textured.sum() >= 25 else None
    info["background_brightness"] = None if bg_lum is None else round(bg_lum, 1)
    info["tissue_brightness"] = None if fg_lum is None else round(fg_lum, 1)
    looks_dark = bg_lum is not None and fg_lum is not None and bg_lum < fg_lum - 10 and bg_lum < 128
    if background == "dark" or (background == "auto" and looks_dark):
        if background == "auto":
            log.warning("the smooth background (brightness %.0f/255) is darker than the textured tissue (%.0f/255): "
                        "treating the image as inverted / dark-field and inverting it for the mask; pass "
                        "--background light if this is a bright-field H&E", bg_lum, fg_lum)
        rgb = 255 - rgb
        info["background"] = "dark (image inverted for the mask)"
    else:
        info["background"] = "light"

    glass, how = glass_colour(rgb, smooth)
    info["glass_rgb"] = [round(float(g), 1) for g in glass]
    info["glass_source"] = how
    od = optical_density(rgb, glass)
    od_s = _local_mean(od, usable)
    t_od_auto = _otsu(od_s[usable])
    if threshold is not None:
        t_od = float(threshold)
        info["threshold_source"] = "--threshold"
    elif t_od_auto is None:
        t_od = OD_RANGE[1]
        info["threshold_source"] = "upper bound (the optical density is uniform)"
    else:
        t_od = float(np.clip(t_od_auto, *OD_RANGE))
        info["threshold_source"] = "otsu" if t_od == t_od_auto else f"otsu {t_od_auto:.3g} clamped to {OD_RANGE}"
    info["threshold"] = round(t_od, 4)

    seeds = usable & (od_s >= t_od) & (tex_s >= t_tex)
    # grown region: the neighbourhood is above half the thresholds and the super-pixel itself shows
    # something (so the 3 x 3 mean does not push the outline one super-pixel onto the glass)
    itself = (od >= HYSTERESIS * t_od) | (texture >= HYSTERESIS * t_tex)
    weak = usable & itself & (od_s >= HYSTERESIS * t_od) & (tex_s >= HYSTERESIS * t_tex)
    info["texture_used"] = True
    if _remove_small(seeds, min_region_sp).sum() == 0 and texture_threshold is None:
        colour_only = _remove_small(usable & (od_s >= t_od), min_region_sp)
        if colour_only.any():
            # nothing textured, yet a region absorbs: a smooth rendering (synthetic, very blurry or
            # heavily compressed image); fall back to colour alone rather than return no tissue
            log.warning("no textured region found (texture threshold %.3g grey levels), but %d super-pixels absorb "
                        "(OD >= %.3g): the image looks smooth or blurred, so the mask uses colour alone; check "
                        "the overlay, and pass --texture-threshold to force the texture rule",
                        t_tex, int(colour_only.sum()), t_od)
            seeds = usable & (od_s >= t_od)
            weak = usable & (od >= HYSTERESIS * t_od) & (od_s >= HYSTERESIS * t_od)
            info["texture_used"] = False
    lab, n = ndi.label(weak, structure=np.ones((3, 3), bool))
    has_seed = np.zeros(n + 1, bool)
    has_seed[np.unique(lab[seeds])] = True
    has_seed[0] = False
    mask = has_seed[lab]
    info["seed_superpixels"] = int(seeds.sum())

    # fat: adipocytes are glass-coloured cells enclosed by thin membranes. The membranes barely change a
    # super-pixel's mean colour but make it textured, so the cells are small holes in (tissue | textured
    # super-pixels); fill those holes (and keep the membranes around them). Membranes must stand clearly
    # above the texture of the glass, so a noisy image does not turn its glass into "fat".
    info["fat_superpixels"] = 0
    if info["texture_used"] and mask.any():
        glass_noise = float(np.median(texture[smooth])) if smooth.any() else 0.0
        t_wall = max(t_tex, 2.0 * glass_noise + 1.0)
        walls = usable & (texture >= t_wall)
        ext = mask | walls
        cells = _fill_small_holes(ext, min(fill_holes_sp, FAT_CELL_MAX_UM2 / SUPER_PIXEL_UM2)) & ~ext & usable
        if cells.any():
            near = ndi.binary_dilation(cells, structure=np.ones((3, 3), bool))
            fat = cells | (walls & near)
            # only fat that touches the tissue found so far (a lone net of textured lines is not fat)
            lab, n = ndi.label(mask | fat, structure=np.ones((3, 3), bool))
            touching = np.zeros(n + 1, bool)
            touching[np.unique(lab[mask])] = True
            touching[0] = False
            fat &= touching[lab]
            info["fat_superpixels"] = int((fat & ~mask).sum())
            mask = mask | fat

    # clean-up on the super-pixel grid
    mask = ndi.binary_closing(np.pad(mask, CLOSING_RADIUS_SP), structure=_disk(CLOSING_RADIUS_SP))
    mask = mask[CLOSING_RADIUS_SP:-CLOSING_RADIUS_SP, CLOSING_RADIUS_SP:-CLOSING_RADIUS_SP]
    mask &= usable
    mask = _fill_small_holes(mask, fill_holes_sp)
    mask &= usable
    mask = _remove_small(mask, min_region_sp)
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    info["regions"] = int(n)
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


# ---------------------------------------------------------------------------------------------
# the overlay for people

def make_overlay(rgb, mask, valid, locs, radius_px, inside, scale=None, caption=None):
    """RGB preview: the H&E (one pixel per super-pixel, enlarged `scale` times: 2 by default, 1 above
    2000 super-pixels, up to 8 for grids under 200 super-pixels), background tinted
    blue-grey, padding hatched, the tissue outline in green, spot footprints as circles (yellow
    on tissue, red off it) with a dot at each centre."""
    import cv2
    H, W = mask.shape
    if scale is None:  # 2x; 1x for very large grids; more for tiny ones so that a person can read it
        scale = 1 if max(H, W) > 2000 else max(2, min(8, int(np.ceil(400 / max(H, W)))))
    img = cv2.resize(np.ascontiguousarray(rgb), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST)
    m = cv2.resize(mask.astype(np.uint8), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST).astype(bool)
    v = cv2.resize(valid.astype(np.uint8), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = img.astype(np.float32)
    tint = np.array([70, 90, 130], np.float32)
    out[~m] = 0.55 * out[~m] + 0.45 * tint
    yy = np.arange(H * scale, dtype=np.int32)[:, None]
    xx = np.arange(W * scale, dtype=np.int32)[None, :]
    hatch = ~v & (((yy + xx) // 6) % 2 == 0)
    out[hatch] = (160, 160, 160)
    out = np.clip(out, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 200, 0), min(2, scale), lineType=cv2.LINE_8)
    f = scale / geo.SUPER_PIXEL_PX
    r = max(1, int(round(radius_px * f)))
    for (x, y), ins in zip(np.asarray(locs[["x", "y"]], dtype=np.float64), inside):
        colour = (255, 215, 0) if ins else (255, 30, 30)
        cx, cy = int(round(x * f)), int(round(y * f))
        cv2.circle(out, (cx, cy), r, colour, 1, lineType=cv2.LINE_AA)
        cv2.circle(out, (cx, cy), min(3, scale), colour, -1)
    if caption:
        lines = [caption] if isinstance(caption, str) else list(caption)
        font = cv2.FONT_HERSHEY_SIMPLEX
        width = max(cv2.getTextSize(t, font, 1.0, 1)[0][0] for t in lines)
        size = float(np.clip(out.shape[1] * 0.45 / max(1, width), 0.3, 0.9))  # about 45% of the width
        th = max(1, int(round(size * 1.5)))
        y = 4
        for t in lines:
            (tw, tht), base = cv2.getTextSize(t, font, size, th)
            cv2.rectangle(out, (0, y - 4), (min(out.shape[1], tw + 8), y + tht + base + 2), (255, 255, 255), -1)
            cv2.putText(out, t, (4, y + tht), font, size, (0, 0, 0), th, cv2.LINE_AA)
            y += tht + base + 6
    return out


# ---------------------------------------------------------------------------------------------
# the stage

def mask_tissue(directory, threshold=None, min_region_um2=DEFAULT_MIN_REGION_UM2,
                fill_holes_um2=DEFAULT_FILL_HOLES_UM2, texture_threshold=None, background="auto", force=False):
    """Compute and write DIR/mask.png, DIR/mask-overlay.png and DIR/mask.json; returns the summary."""
    from ..stages.image_calibration import CALIBRATION, LOCS, PREVIEW, RADIUS, load_calibrated_spots, load_calibration
    directory = Path(directory)
    if threshold is not None and not 0 < threshold < 3:
        raise InputError(f"--threshold {threshold}: the optical-density threshold must be between 0 and 3 "
                         f"(automatic values are {OD_RANGE[0]}-{OD_RANGE[1]}; glass is 0, stained tissue ~0.2)")
    if texture_threshold is not None and not 0 < texture_threshold < 128:
        raise InputError(f"--texture-threshold {texture_threshold}: must be between 0 and 128 grey levels "
                         f"(automatic values are {TEXTURE_RANGE[0]}-{TEXTURE_RANGE[1]})")
    for name, v in (("--min-region-um2", min_region_um2), ("--fill-holes-um2", fill_holes_um2)):
        if not np.isfinite(v) or v < 0:
            raise InputError(f"{name} {v}: must be a non-negative area in um^2 (0 switches it off)")
    if background not in ("auto", "light", "dark"):
        raise InputError(f"--background {background}: choose auto, light or dark")
    check_upstream(directory, STAGE, force=force, log=log)
    remove_stale_temporaries(directory)

    cal = load_calibration(directory)
    grid = tuple(cal["superpixel_grid"])
    small_path = directory / PREVIEW
    rgb = read_png(small_path)
    if rgb.shape[:2] != grid:
        raise InputError(f"{small_path}: is {rgb.shape[1]} x {rgb.shape[0]} px but the super-pixel grid in "
                         f"{CALIBRATION} is {grid[1]} x {grid[0]}; rerun `python image_calibration.py "
                         f"--directory {directory}`")
    locs, radius = load_calibrated_spots(directory)
    params = {"threshold": threshold, "texture_threshold": texture_threshold, "min_region_um2": min_region_um2,
              "fill_holes_um2": fill_holes_um2, "background": background}
    inputs = [directory / CALIBRATED_IMAGE, small_path, directory / CALIBRATION, directory / LOCS, directory / RADIUS]
    reasons = changed_since_last_run(directory, STAGE, inputs, params)
    if reasons:
        log.info("recomputing: %s", "; ".join(reasons))

    he = open_calibrated(directory)
    if tuple(s // geo.SUPER_PIXEL_PX for s in he.shape[:2]) != grid:
        raise InputError(f"{directory / CALIBRATED_IMAGE}: its size {he.shape[1]} x {he.shape[0]} px does not match the "
                         f"super-pixel grid in {CALIBRATION}; rerun `python image_calibration.py --directory {directory}`")
    log.info("measuring texture on %s (%d x %d super-pixels)", CALIBRATED_IMAGE, grid[1], grid[0])
    texture = superpixel_texture(he)
    del he
    valid = valid_region(cal)
    mask, info = compute_mask(rgb, texture, valid, threshold=threshold, texture_threshold=texture_threshold,
                              min_region_sp=min_region_um2 / SUPER_PIXEL_UM2,
                              fill_holes_sp=fill_holes_um2 / SUPER_PIXEL_UM2, background=background)
    n_tissue = int(mask.sum())
    n_valid = int(valid.sum())
    if n_tissue == 0:
        raise InputError(f"{directory / CALIBRATED_IMAGE}: no tissue found ({info.get('empty_reason', 'empty mask')}); "
                         f"check that the image shows the stained section, or lower --threshold / "
                         f"--texture-threshold / --min-region-um2")
    inside = spots_inside(mask, locs)
    n_in = int(inside.sum())
    frac_in = n_in / max(1, len(locs))
    tissue_frac = n_tissue / max(1, n_valid)
    if len(locs) and n_in == 0:
        raise InputError(f"{directory / LOCS}: none of the {len(locs)} spot centres lies on the tissue mask "
                         f"(tissue covers {100 * tissue_frac:.1f}% of the image); check that locs-raw.tsv belongs "
                         f"to this image (x = column, y = row, in pixels of he-raw), or adjust --threshold / "
                         f"--min-region-um2")
    summary = {
        "threshold": info["threshold"],
        "threshold_source": info["threshold_source"],
        "texture_threshold": info["texture_threshold"],
        "texture_threshold_source": info["texture_threshold_source"],
        "od_definition": "mean over R, G, B of log10(glass / colour) of the super-pixel's mean colour, 3 x 3 mean",
        "texture_definition": "std of the grey level over the super-pixel's 16 x 16 px, 3 x 3 mean",
        "glass_rgb": info["glass_rgb"],
        "glass_source": info["glass_source"],
        "background": info["background"],
        "texture_used": info["texture_used"],
        "superpixel_grid": list(grid),
        "tissue_superpixels": n_tissue,
        "tissue_fraction": round(tissue_frac, 6),
        "tissue_fraction_of": "the image's super-pixels, padding excluded",
        "tissue_area_mm2": round(n_tissue * SUPER_PIXEL_UM2 / 1e6, 4),
        "regions": info["regions"],
        "membrane_enclosed_superpixels_added": info["fat_superpixels"],
        "n_spots": int(len(locs)),
        "spots_inside": n_in,
        "fraction_spots_inside": round(frac_in, 6),
        "spots_outside": [str(s) for s in locs.index[~inside]][:1000],
        "min_region_um2": min_region_um2,
        "fill_holes_um2": fill_holes_um2,
    }
    log.info("tissue: %d super-pixels (%.1f%% of the image, %.2f mm^2) in %d region(s); OD threshold %.3g (%s), "
             "texture threshold %.3g (%s), glass RGB %s",
             n_tissue, 100 * tissue_frac, summary["tissue_area_mm2"], info["regions"], info["threshold"],
             info["threshold_source"], info["texture_threshold"], info["texture_threshold_source"],
             "/".join(f"{g:.0f}" for g in info["glass_rgb"]))
    msg = f"{n_in} of {len(locs)} spot centres ({100 * frac_in:.1f}%) lie on the tissue mask"
    if frac_in < SPOTS_INSIDE_WARN:
        log.warning("%s; expected most of them (is locs-raw.tsv from this image? are off-tissue spots included?); "
                    "look at %s and adjust --threshold / --min-region-um2 / --fill-holes-um2 if the mask is wrong",
                    msg, directory / OVERLAY)
    else:
        log.info("%s", msg)

    caption = [f"tissue {100 * tissue_frac:.1f}% ({summary['tissue_area_mm2']:.2f} mm2), {n_in}/{len(locs)} spots on it",
               f"OD >= {info['threshold']:.3g}, texture >= {info['texture_threshold']:.3g}"]
    overlay = make_overlay(rgb, mask, valid, locs, radius, inside, caption=caption)
    with StagedOutputs() as out:
        write_png(out.path(directory / MASK), np.where(mask, 255, 0).astype(np.uint8))
        write_png(out.path(directory / OVERLAY), overlay)
        out.write_json(directory / MASK_JSON, summary)
        outputs = out.finals
    write_manifest(directory, STAGE, params, inputs, outputs)
    log.info("wrote %s, %s, %s", MASK, OVERLAY, MASK_JSON)
    return summary


def load_mask(directory):
    """The tissue mask as a bool array on the super-pixel grid (True = tissue)."""
    directory = Path(directory)
    p = directory / MASK
    if not p.is_file():
        raise InputError(f"{p}: not found; run `python {SCRIPT} --directory {directory}` first")
    m = read_png(p, grey=True)
    cal_path = directory / "calibration.json"
    if cal_path.is_file():
        grid = tuple(json.loads(cal_path.read_text())["superpixel_grid"])
        if m.shape != grid:
            raise InputError(f"{p}: is {m.shape[1]} x {m.shape[0]} but the super-pixel grid is {grid[1]} x {grid[0]}; "
                             f"rerun `python {SCRIPT} --directory {directory}`")
    return m > 127
