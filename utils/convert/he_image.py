"""The H&E image of a conversion: refusing downscaled images, its shape, placing it as he-raw.*, pixel-size and inside checks."""
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.image_io import image_size, sniff_format
from ..core.raw_io import PIXEL_SIZE_RANGE_UM
from ..core.text_io import require_file
from .constants import CONTENT_NAMES, DOWNSCALED_IMAGES, OME_SUFFIXES

log = logging.getLogger("trihrge")


def refuse_downscaled(path):
    stem = Path(path).name.lower()
    for key, what in DOWNSCALED_IMAGES.items():
        if stem.startswith(key):
            raise InputError(
                f"{path}: this is {what}, far too coarse for 8 um super-pixels (at several um per pixel a "
                f"super-pixel is one or two pixels and the histology the model learns from is gone); pass with "
                f"--image the full-resolution H&E that was given to Space Ranger (its --image; typically "
                f"0.2-0.5 um/px, tens of thousands of pixels wide)")


def image_target_name(path):
    """he-raw.<ext> for an input image, by its content (a PNG saved as .jpg is placed as he-raw.png):
    TIFF kept as TIFF, OME-TIFF as OME-TIFF."""
    path = require_file(path, fix="pass the full-resolution H&E image file with --image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; copy the H&E image again")
    kind = sniff_format(path)
    if kind == "TIFF":
        return "he-raw.ome.tif" if path.name.lower().endswith(OME_SUFFIXES) else "he-raw.tif"
    if kind in CONTENT_NAMES:
        return CONTENT_NAMES[kind]
    raise InputError(f"{path}: unsupported image format ({kind}); give the H&E as TIFF/OME-TIFF (.tif, .tiff, .btf), "
                     f"JPEG or PNG (convert other whole-slide formats to TIFF first, e.g. with vips or QuPath)")


def open_target_image(path):
    """The --image of a conversion, checked: (path, its he-raw.* name, (height, width))."""
    image = Path(path)
    refuse_downscaled(image)
    return image, image_target_name(image), image_shape(image)


def image_shape(path):
    """(height, width) of an image from its header, without decoding the pixels."""
    path = require_file(path, fix="pass the full-resolution H&E image file with --image")
    try:
        return image_size(path)
    except InputError:
        raise
    except Exception as e:  # readers raise many types for damaged files
        raise InputError(f"{path}: cannot read the image header ({type(e).__name__}: {str(e)[:100]}); give a "
                         f"complete TIFF, JPEG or PNG") from None


def place_image(out, src, final, mode):
    """Put the H&E at `final` (inside DIR) by hard link (falls back to a copy), copy or symbolic link."""
    src, final = Path(src), Path(final)
    if final.exists() and os.path.samefile(src, final):
        log.info("%s is already in place", final)
        return
    tmp = out.path(final)
    if mode == "symlink":
        os.symlink(os.path.abspath(src), tmp)
        return
    if mode == "hardlink":
        try:
            os.link(os.path.realpath(src), tmp)   # the image itself, not a (relative) symbolic link to it
            return
        except OSError as e:
            log.info("cannot hard-link %s (%s); copying it", src, e.strerror or e)
    log.info("copying %s (%.1f MB) to %s", src, src.stat().st_size / 2 ** 20, final.name)
    shutil.copyfile(src, tmp)


def _beside(v, bounds):
    """v to 4 significant digits, or to all of them where 4 would print a bound it lies outside of (2.0000001 as 2)."""
    short = f"{v:.4g}"
    return repr(float(v)) if float(short) in bounds else short


def check_pixel_size(ps, image, how):
    lo, hi = PIXEL_SIZE_RANGE_UM
    if not (np.isfinite(ps) and lo <= ps <= hi):
        raise InputError(f"{image}: its pixel size comes out as {_beside(ps, (lo, hi))} um/px ({how}), outside "
                         f"{lo}-{hi} um/px; "
                         f"{'this image is far too coarse: pass the full-resolution H&E with --image' if ps > hi else 'check the inputs'}"
                         f" (or give the pixel size with --pixel-size if you know it)")
    return float(ps)


def check_inside(image, shape, x, y, what, tolerance=0.01):
    """Error when more than `tolerance` of the points fall outside the image (a wrong or downscaled image)."""
    h, w = shape
    inside = (x >= 0) & (y >= 0) & (x < w) & (y < h)
    frac_out = 1.0 - float(inside.mean()) if len(x) else 0.0
    if frac_out > tolerance:
        raise InputError(f"{image}: {frac_out:.0%} of the {len(x)} {what} fall outside this {w} x {h} px image "
                         f"(x up to {np.max(x):.0f}, y up to {np.max(y):.0f} px); the coordinates are in pixels of the "
                         f"full-resolution image used by the 10x software: pass that image with --image")
    if not inside.all():
        log.warning("%d of %d %s fall outside the image and are dropped", int((~inside).sum()), len(x), what)
    return inside
