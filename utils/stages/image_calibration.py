"""Stage 1 logic: bring the H&E image and the spot geometry to 0.5 um/px.

The transform is a pure scale (x_cal = s * x_raw, y_cal = s * y_raw, s = raw um/px / 0.5) followed
by white padding at the bottom/right up to a multiple of the 224 px tile, so the origin is kept and
super-pixel (row, col) is [8 row, 8 row + 8) um from the top-left corner of he-raw."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import geometry as geo
from ..core import layout as L
from ..core.atomic import rgb_tiff_memmap
from ..core.chunks import row_chunks
from ..core.errors import InputError
from ..core.image_io import open_rgb_bands, write_png
from ..core.raw_io import IMAGE_NAMES, find_one, read_locs, read_pixel_size, read_radius
from ..core.resize import scaled_bands
from ..core.stage import Stage

log = logging.getLogger("trihrge")

STAGE = "image_calibration"


def superpixel_means(img, rows_per_chunk=None):
    """Mean RGB of every 16 x 16 px super-pixel of an (H, W, 3) uint8 array or memmap, streamed in
    float32 blocks of about CHUNK_BYTES (64 super-pixel rows were 400 MB at 32,000 px wide)."""
    sp = geo.SUPER_PIXEL_PX
    H, W = img.shape[0] // sp, img.shape[1] // sp
    out = np.empty((H, W, 3), dtype=np.uint8)
    for rows in row_chunks(H, W * sp * sp * 3, rows_per_chunk):
        block = np.asarray(img[rows.start * sp:rows.stop * sp, :W * sp], dtype=np.float32)
        out[rows] = np.round(block.reshape(-1, sp, W, sp, 3).mean(axis=(1, 3))).astype(np.uint8)
    return out


def write_padded_tiff(path, bands, scaled_shape, padded_shape, rows_per_chunk=2048, progress=False):
    """Write consecutive row bands of the scaled image into a white canvas of padded_shape as an
    uncompressed, memory-mappable TIFF (with progress: a bar of the rows written)."""
    from tqdm import tqdm
    (h, w), (ph, pw) = scaled_shape, padded_shape
    mm = rgb_tiff_memmap(path, ph, pw)
    row = 0
    with tqdm(total=h, desc="image_calibration", unit="row", unit_scale=True, disable=not progress,
              mininterval=1.0, leave=False) as bar:
        for band in bands:
            if band.shape[1] != w or row + len(band) > h:
                raise RuntimeError(f"scaled band of {band.shape[:2]} at row {row} does not fit {h} x {w}")
            mm[row:row + len(band), :w] = band
            mm[row:row + len(band), w:] = 255
            row += len(band)
            bar.update(len(band))
    if row != h:
        raise RuntimeError(f"the scaled image has {row} rows, not {h}")
    for rows in row_chunks(ph - h, pw, rows_per_chunk):
        mm[h + rows.start:h + rows.stop] = 255
    mm.flush()
    return mm


def calibrate(directory, pixel_size_um=geo.TARGET_PIXEL_SIZE_UM, force=False, progress=False):
    directory = Path(directory)
    with Stage(STAGE, directory, force=force) as st:
        return _calibrate(st, directory, pixel_size_um, progress)


def _transform(image_path, raw_px, pixel_size_um, scale, raw_shape, shapes, radius_raw, n_spots, n_outside):
    """calibration.json: the exact raw -> calibrated transform and the grids it defines."""
    (h, w), (ph, pw) = shapes
    return {
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
        "radius_px": radius_raw * scale,
        "n_spots": int(n_spots),
        "n_spots_outside_image": int(n_outside),
    }


def _calibrate(st, directory, pixel_size_um, progress):
    image_path = find_one(directory, IMAGE_NAMES, "H&E image (he-raw.jpg/png/tif)")
    raw_px = read_pixel_size(directory)
    radius_raw = read_radius(directory, raw_px)
    locs_raw, locs_path = read_locs(directory)
    st.record(inputs=[image_path, directory / L.RAW_PIXEL_SIZE, directory / L.RAW_RADIUS, locs_path],
              parameters={"pixel_size": pixel_size_um})

    log.info("reading %s", image_path)
    with open_rgb_bands(image_path) as image:   # a TIFF is read band by band as it is scaled
        raw_shape = image.shape
        scale = geo.calibration_scale(raw_px, pixel_size_um)
        (h, w), (ph, pw) = geo.calibrated_shape(raw_shape, raw_px, pixel_size_um)
        if min(h, w) < geo.TILE_PX:
            raise InputError(f"{image_path}: the image is {raw_shape[1]} x {raw_shape[0]} px, only {w} x {h} px at "
                             f"{pixel_size_um} um/px, smaller than one {geo.TILE_PX} px tile; give the whole "
                             f"section at full resolution (and check pixel-size-raw.txt)")
        log.info("raw %d x %d px at %.4g um/px -> %d x %d px at %.4g um/px (scale %.6g), padded to %d x %d",
                 raw_shape[1], raw_shape[0], raw_px, w, h, pixel_size_um, scale, pw, ph)
        locs = pd.DataFrame({"x": locs_raw["x"] * scale, "y": locs_raw["y"] * scale}, index=locs_raw.index)
        inside = (locs_raw["x"] >= 0) & (locs_raw["y"] >= 0) & (locs_raw["x"] < raw_shape[1]) & (locs_raw["y"] < raw_shape[0])
        if not inside.any():
            raise InputError(f"{locs_path}: all {len(locs)} spots lie outside the {raw_shape[1]} x {raw_shape[0]} px "
                             f"image; give x (column) and y (row) in pixels of {image_path.name}")
        if not inside.all():
            log.warning("%d of %d spots lie outside the image (get_HR.py will drop them)", (~inside).sum(), len(locs))
        transform = _transform(image_path, raw_px, pixel_size_um, scale, raw_shape, ((h, w), (ph, pw)), radius_raw,
                               len(locs), (~inside).sum())
        st.require_space(ph * pw * 3 * 1.1 + 2 * len(locs) * 40, L.CALIBRATED_IMAGE.name)
        _write(st.out, directory, scaled_bands(image.bands(), raw_shape, scale), locs, transform, progress)
    log.info("wrote %s (%d x %d px), %s, %s, %s", L.CALIBRATED_IMAGE.name, pw, ph, L.LOCS.name, L.RADIUS.name,
             L.CALIBRATION.name)
    return transform


def _write(out, directory, scaled_bands, locs, transform, progress):
    mm = write_padded_tiff(out.path(L.CALIBRATED_IMAGE.path(directory)), scaled_bands, transform["scaled_shape"],
                           transform["padded_shape"], progress=progress)
    write_png(out.path(L.PREVIEW.path(directory)), superpixel_means(mm))
    del mm
    locs_out = locs.reset_index().rename(columns={locs.index.name or "index": "spot"})
    locs_out.to_csv(out.path(L.LOCS.path(directory)), sep="\t", index=False, float_format="%.4f")
    out.write_text(L.RADIUS.path(directory), f"{transform['radius_px']:.6f}\n")
    out.write_text(L.PIXEL_SIZE.path(directory), f"{transform['pixel_size_um']}\n")
    out.write_json(L.CALIBRATION.path(directory), transform)


