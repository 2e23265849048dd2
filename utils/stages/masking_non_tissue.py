"""Stage 4 (masking_non_tissue.py): the tissue mask on the 8 um super-pixel grid, its overlay for
people and its summary (mask.json). The method is in utils/histology/tissue_mask.py."""
import logging
from pathlib import Path

import numpy as np

from ..core import layout as L
from ..core.cli import NON_NEGATIVE, Number
from ..core.errors import InputError
from ..core.image_io import write_png
from ..core.stage import Stage
from ..histology import tissue_mask as tm
from ..histology.mask_overlay import make_overlay

log = logging.getLogger("trihrge")

STAGE = "masking_non_tissue"
SPOTS_INSIDE_WARN = 0.9
OD_THRESHOLD = Number(float, lo=0, hi=3, lo_open=True, hi_open=True,
                      note=f"glass is 0, stained tissue ~0.2; automatic values are {tm.OD_RANGE[0]}-{tm.OD_RANGE[1]}")
TEXTURE_THRESHOLD = Number(float, lo=0, hi=128, lo_open=True, hi_open=True,
                           note=f"grey levels; automatic values are {tm.TEXTURE_RANGE[0]}-{tm.TEXTURE_RANGE[1]}")
BACKGROUNDS = ("auto", "light", "dark")


def _check_options(threshold, texture_threshold, min_region_um2, fill_holes_um2, background):
    if threshold is not None:
        OD_THRESHOLD.check("--threshold", threshold)
    if texture_threshold is not None:
        TEXTURE_THRESHOLD.check("--texture-threshold", texture_threshold)
    NON_NEGATIVE.check("--min-region-um2", min_region_um2)
    NON_NEGATIVE.check("--fill-holes-um2", fill_holes_um2)
    if background not in BACKGROUNDS:
        raise InputError(f"--background {background}: choose {', '.join(BACKGROUNDS)}")


def mask_tissue(directory, *, threshold=None, min_region_um2=tm.DEFAULT_MIN_REGION_UM2,
                fill_holes_um2=tm.DEFAULT_FILL_HOLES_UM2, texture_threshold=None, background="auto", force=False):
    """Compute and write DIR/mask.png, DIR/mask-overlay.png and DIR/mask.json; returns the summary."""
    directory = Path(directory)
    _check_options(threshold, texture_threshold, min_region_um2, fill_holes_um2, background)
    params = {"threshold": threshold, "texture_threshold": texture_threshold, "min_region_um2": min_region_um2,
              "fill_holes_um2": fill_holes_um2, "background": background}
    with Stage(STAGE, directory, force=force) as st:
        cal = L.load_calibration(directory)
        rgb = L.read_preview(directory, cal)
        locs, radius = L.load_calibrated_spots(directory)
        st.record(inputs=[a.path(directory) for a in (L.CALIBRATED_IMAGE, L.PREVIEW, L.CALIBRATION, L.LOCS, L.RADIUS)],
                  parameters=params)
        he = L.open_calibrated_image(directory, cal)
        log.info("measuring texture on %s (%d x %d super-pixels)", L.CALIBRATED_IMAGE.name, *L.grid_of(cal)[::-1])
        texture = tm.superpixel_texture(he)
        del he
        valid = tm.valid_region(cal)
        mask, info = tm.compute_mask(rgb, texture, valid, threshold=threshold, texture_threshold=texture_threshold,
                                     min_region_sp=min_region_um2 / tm.SUPER_PIXEL_UM2,
                                     fill_holes_sp=fill_holes_um2 / tm.SUPER_PIXEL_UM2, background=background)
        on_image = tm.spots_inside(valid, locs)   # get_HR.py drops the others: they count for neither
        if not on_image.all():
            log.info("%d of %d spot centres lie outside the image; the mask's figures count the %d on it",
                     int((~on_image).sum()), len(locs), int(on_image.sum()))
            locs = locs[on_image]
        inside = _check_mask(directory, mask, info, locs, valid)
        summary = _summary(mask, info, valid, locs, inside, min_region_um2, fill_holes_um2)
        _report(directory, summary)
        caption = [f"tissue {100 * summary['tissue_fraction']:.1f}% ({summary['tissue_area_mm2']:.2f} mm2), "
                   f"{summary['spots_inside']}/{len(locs)} spots on it",
                   f"OD >= {info['threshold']:.3g}, texture >= {info['texture_threshold']:.3g}"]
        write_png(st.out.path(L.MASK.path(directory)), np.where(mask, 255, 0).astype(np.uint8))
        write_png(st.out.path(L.MASK_OVERLAY.path(directory)),
                  make_overlay(rgb, mask, valid, locs, radius, inside, caption=caption))
        st.out.write_json(L.MASK_JSON.path(directory), summary)
    log.info("wrote %s, %s, %s", L.MASK.name, L.MASK_OVERLAY.name, L.MASK_JSON.name)
    return summary


def _check_mask(directory, mask, info, locs, valid):
    """Stop when there is no tissue or no spot centre on it; the spots on the tissue."""
    if not mask.any():
        raise InputError(f"{L.CALIBRATED_IMAGE.path(directory)}: no tissue found ({info.get('empty_reason', 'empty mask')}); "
                         f"check that the image shows the stained section, or lower --threshold / "
                         f"--texture-threshold / --min-region-um2")
    inside = tm.spots_inside(mask, locs)
    if len(locs) and not inside.any():
        raise InputError(f"{L.LOCS.path(directory)}: none of the {len(locs)} spot centres lies on the tissue mask "
                         f"(tissue covers {100 * mask.sum() / max(1, valid.sum()):.1f}% of the image); check that "
                         f"locs-raw.tsv belongs to this image (x = column, y = row, in pixels of he-raw), or adjust "
                         f"--threshold / --min-region-um2")
    return inside


def _summary(mask, info, valid, locs, inside, min_region_um2, fill_holes_um2):
    """mask.json: the thresholds used and what the mask covers."""
    n_tissue, n_in = int(mask.sum()), int(inside.sum())
    keys = ("threshold", "threshold_source", "texture_threshold", "texture_threshold_source")
    return {
        **{k: info[k] for k in keys},
        "od_definition": "mean over R, G, B of log10(glass / colour) of the super-pixel's mean colour, 3 x 3 mean",
        "texture_definition": "std of the grey level over the super-pixel's 16 x 16 px, 3 x 3 mean",
        **{k: info[k] for k in ("glass_rgb", "glass_source", "background", "texture_used")},
        "superpixel_grid": list(mask.shape),
        "tissue_superpixels": n_tissue,
        "tissue_fraction": round(n_tissue / max(1, int(valid.sum())), 6),
        "tissue_fraction_of": "the image's super-pixels, padding excluded",
        "tissue_area_mm2": round(n_tissue * tm.SUPER_PIXEL_UM2 / 1e6, 4),
        "regions": info["regions"],
        "membrane_enclosed_superpixels_added": info["fat_superpixels"],
        "n_spots": int(len(locs)),
        "spots_inside": n_in,
        "fraction_spots_inside": round(n_in / max(1, len(locs)), 6),
        "spots_outside": [str(s) for s in locs.index[~inside]][:1000],
        "min_region_um2": min_region_um2,
        "fill_holes_um2": fill_holes_um2,
    }


def _report(directory, s):
    log.info("tissue: %d super-pixels (%.1f%% of the image, %.2f mm^2) in %d region(s); OD threshold %.3g (%s), "
             "texture threshold %.3g (%s), glass RGB %s",
             s["tissue_superpixels"], 100 * s["tissue_fraction"], s["tissue_area_mm2"], s["regions"], s["threshold"],
             s["threshold_source"], s["texture_threshold"], s["texture_threshold_source"],
             "/".join(f"{g:.0f}" for g in s["glass_rgb"]))
    msg = (f"{s['spots_inside']} of {s['n_spots']} spot centres ({100 * s['fraction_spots_inside']:.1f}%) lie on "
           f"the tissue mask")
    if s["fraction_spots_inside"] < SPOTS_INSIDE_WARN:
        log.warning("%s; expected most of them (is locs-raw.tsv from this image? are off-tissue spots included?); "
                    "look at %s and adjust --threshold / --min-region-um2 / --fill-holes-um2 if the mask is wrong",
                    msg, L.MASK_OVERLAY.path(directory))
    else:
        log.info("%s", msg)
