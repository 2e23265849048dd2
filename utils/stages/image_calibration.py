"""Stage 1 logic: bring the H&E image and the spot geometry to 0.5 um/px.

The transform is a pure scale (x_cal = s * x_raw, y_cal = s * y_raw, s = raw um/px / 0.5) followed
by white padding at the bottom/right up to a multiple of the 224 px tile, so the origin is kept and
super-pixel (row, col) is [8 row, 8 row + 8) um from the top-left corner of he-raw."""
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import geometry as geo
from ..core.atomic import StagedOutputs, remove_stale_temporaries
from ..core.errors import InputError
from ..core.image_io import CALIBRATED_IMAGE, read_rgb, write_png
from ..core.manifest import changed_since_last_run, write_manifest
from ..core.raw_io import IMAGE_NAMES, find_one, read_locs, read_pixel_size, read_radius

log = logging.getLogger("trihrge")

STAGE = "image_calibration"
PREVIEW = "he-small.png"        # one pixel per super-pixel: the mean RGB of its 16 x 16 px
CALIBRATION = "calibration.json"
LOCS = "locs.tsv"
RADIUS = "radius.txt"
PIXEL_SIZE = "pixel-size.txt"


def resize_to_target(rgb, scale):
    import cv2
    if scale == 1.0:
        return rgb
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    # dsize=None so OpenCV uses exactly this scale factor (x_cal = scale * x_raw)
    return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=interp)


def superpixel_means(img, rows_per_chunk=64):
    """Mean RGB of every 16 x 16 px super-pixel of an (H, W, 3) uint8 array or memmap, streamed."""
    sp = geo.SUPER_PIXEL_PX
    H, W = img.shape[0] // sp, img.shape[1] // sp
    out = np.empty((H, W, 3), dtype=np.uint8)
    for r0 in range(0, H, rows_per_chunk):
        r1 = min(H, r0 + rows_per_chunk)
        block = np.asarray(img[r0 * sp:r1 * sp, :W * sp], dtype=np.float32)
        block = block.reshape(r1 - r0, sp, W, sp, 3).mean(axis=(1, 3))
        out[r0:r1] = np.round(block).astype(np.uint8)
    return out


def write_padded_tiff(path, scaled, padded_shape, rows_per_chunk=2048):
    """Write the scaled image into a white canvas of padded_shape as an uncompressed, memory-mappable TIFF."""
    import tifffile
    ph, pw = padded_shape
    h, w = scaled.shape[:2]
    mm = tifffile.memmap(path, shape=(ph, pw, 3), dtype=np.uint8, photometric="rgb")
    for r0 in range(0, ph, rows_per_chunk):
        r1 = min(ph, r0 + rows_per_chunk)
        mm[r0:r1] = 255
        if r0 < h:
            mm[r0:min(r1, h), :w] = scaled[r0:min(r1, h)]
    mm.flush()
    return mm


def calibrate(directory, pixel_size_um=geo.TARGET_PIXEL_SIZE_UM, force=False):
    directory = Path(directory)
    remove_stale_temporaries(directory)
    image_path = find_one(directory, IMAGE_NAMES, "H&E image (he-raw.jpg/png/tif)")
    raw_px = read_pixel_size(directory)
    radius_raw = read_radius(directory, raw_px)
    locs_raw, locs_path = read_locs(directory)
    inputs = [image_path, directory / "pixel-size-raw.txt", directory / "radius-raw.txt", locs_path]
    params = {"pixel_size": pixel_size_um}
    reasons = changed_since_last_run(directory, STAGE, inputs, params)
    if reasons:
        log.info("recomputing: %s", "; ".join(reasons))

    log.info("reading %s", image_path)
    rgb = read_rgb(image_path)
    raw_shape = rgb.shape[:2]
    scale = geo.calibration_scale(raw_px, pixel_size_um)
    (h, w), (ph, pw) = geo.calibrated_shape(raw_shape, raw_px, pixel_size_um)
    if min(h, w) < geo.TILE_PX:
        raise InputError(f"{image_path}: the image is {raw_shape[1]} x {raw_shape[0]} px, only {w} x {h} px at "
                         f"{pixel_size_um} um/px, smaller than one {geo.TILE_PX} px tile; give the whole "
                         f"section at full resolution (and check pixel-size-raw.txt)")
    log.info("raw %d x %d px at %.4g um/px -> %d x %d px at %.4g um/px (scale %.6g), padded to %d x %d",
             raw_shape[1], raw_shape[0], raw_px, w, h, pixel_size_um, scale, pw, ph)
    scaled = resize_to_target(rgb, scale)
    del rgb
    assert scaled.shape[:2] == (h, w), (scaled.shape, h, w)

    locs = pd.DataFrame({"x": locs_raw["x"] * scale, "y": locs_raw["y"] * scale}, index=locs_raw.index)
    inside = (locs_raw["x"] >= 0) & (locs_raw["y"] >= 0) & (locs_raw["x"] < raw_shape[1]) & (locs_raw["y"] < raw_shape[0])
    if not inside.any():
        raise InputError(f"{locs_path}: all {len(locs)} spots lie outside the {raw_shape[1]} x {raw_shape[0]} px "
                         f"image; give x (column) and y (row) in pixels of {image_path.name}")
    if not inside.all():
        log.warning("%d of %d spots lie outside the image (get_HR.py will drop them)", (~inside).sum(), len(locs))
    radius = radius_raw * scale

    transform = {
        "raw_image": image_path.name,
        "raw_pixel_size_um": raw_px,
        "pixel_size_um": pixel_size_um,
        "scale": scale,
        "matrix_raw_to_calibrated": [[scale, 0.0, 0.0], [0.0, scale, 0.0], [0.0, 0.0, 1.0]],
        "convention": "continuous pixel coordinates (pixel i covers [i, i+1)); x = column, y = row; "
                      "x_cal = scale * x_raw, y_cal = scale * y_raw; padding only at bottom/right",
        "raw_shape": list(raw_shape),
        "scaled_shape": [h, w],
        "padded_shape": [ph, pw],
        "superpixel_px": geo.SUPER_PIXEL_PX,
        "superpixel_grid": [ph // geo.SUPER_PIXEL_PX, pw // geo.SUPER_PIXEL_PX],
        "tile_px": geo.TILE_PX,
        "radius_raw_px": radius_raw,
        "radius_px": radius,
        "n_spots": int(len(locs)),
        "n_spots_outside_image": int((~inside).sum()),
    }
    with StagedOutputs() as out:
        tif = out.path(directory / CALIBRATED_IMAGE)
        mm = write_padded_tiff(tif, scaled, (ph, pw))
        del scaled
        write_png(out.path(directory / PREVIEW), superpixel_means(mm))
        del mm
        locs_out = locs.reset_index().rename(columns={locs.index.name or "index": "spot"})
        locs_out.to_csv(out.path(directory / LOCS), sep="\t", index=False, float_format="%.4f")
        out.write_text(directory / RADIUS, f"{radius:.6f}\n")
        out.write_text(directory / PIXEL_SIZE, f"{pixel_size_um}\n")
        out.write_json(directory / CALIBRATION, transform)
        outputs = out.finals
    write_manifest(directory, STAGE, params, inputs, outputs)
    log.info("wrote %s (%d x %d px), %s, %s, %s", CALIBRATED_IMAGE, pw, ph, LOCS, RADIUS, CALIBRATION)
    return transform


def load_calibration(directory):
    p = Path(directory) / CALIBRATION
    if not p.is_file():
        raise InputError(f"{p}: not found; run `python image_calibration.py --directory {directory}` first")
    return json.loads(p.read_text())


def load_calibrated_spots(directory):
    """Calibrated spot locations (DataFrame indexed by spot id, x, y) and radius in calibrated px."""
    directory = Path(directory)
    locs = pd.read_csv(directory / LOCS, sep="\t", index_col=0)
    locs.index = locs.index.astype(str)
    radius = float((directory / RADIUS).read_text().strip())
    return locs, radius
