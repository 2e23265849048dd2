"""Reading H&E images of any common kind as 8-bit RGB; PNG artifacts in and out."""
import logging
from pathlib import Path

import numpy as np

from .errors import InputError

log = logging.getLogger("trihrge")

def _to_rgb8(img, path):
    """Any array an image reader returns -> uint8 (H, W, 3), with a log line for each conversion."""
    img = np.asarray(img)
    img = np.squeeze(img)
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        log.info("%s: channels-first image %s, moved channels last", path.name, img.shape)
        img = np.moveaxis(img, 0, -1)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 2, 3, 4)):
        raise InputError(f"{path}: unsupported image layout {img.shape}; give a 2-D RGB, RGBA or greyscale image")
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating):
            hi = float(np.nanmax(img)) if img.size else 1.0
            scale = 255.0 if hi <= 1.0 else (255.0 / hi if hi > 255 else 1.0)
        else:
            # scale by the bit depth the values use (8/10/12/14/16/32 bit), not by the image maximum,
            # so that colours keep their meaning
            hi = int(img.max()) if img.size else 255
            bits = next(b for b in (8, 10, 12, 14, 16, 32, 64) if hi < 2 ** b)
            scale = 255.0 / (2 ** bits - 1)
        log.info("%s: %s image converted to 8 bit (scaled by %.5g)", path.name, img.dtype, scale)
        img = np.clip(np.nan_to_num(img.astype(np.float32) * scale), 0, 255).round().astype(np.uint8)
    if img.ndim == 2:
        log.info("%s: greyscale image converted to RGB", path.name)
        return np.repeat(img[:, :, None], 3, axis=2)
    c = img.shape[-1]
    if c == 1:
        log.info("%s: single-channel image converted to RGB", path.name)
        return np.repeat(img, 3, axis=2)
    if c == 2:  # grey + alpha
        img = np.concatenate([np.repeat(img[:, :, :1], 3, axis=2), img[:, :, 1:]], axis=2)
        c = 4
    if c == 4:
        log.info("%s: RGBA image composited onto white", path.name)
        rgb = img[:, :, :3].astype(np.float32)
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        return np.clip(rgb * a + 255.0 * (1.0 - a), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(img)


def _check_jpeg_complete(path):
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read()
    if head != b"\xff\xd8":
        raise InputError(f"{path}: not a JPEG file (bad header); give the H&E image as JPEG, PNG or TIFF "
                         f"with the matching extension")
    if b"\xff\xd9" not in tail:
        raise InputError(f"{path}: the JPEG is truncated (no end marker); copy the complete file again")


def read_rgb(path):
    """Read an H&E image (JPEG/PNG/TIFF/OME-TIFF; RGB, RGBA, grey, 16 bit, float) as uint8 (H, W, 3)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; copy the H&E image again")
    name = path.name.lower()
    if name.endswith((".tif", ".tiff")):
        import tifffile
        try:
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]  # level 0 of a pyramid is the full resolution
                img = series.asarray()
        except Exception as e:  # tifffile raises many types for damaged files
            raise InputError(f"{path}: cannot be read as TIFF ({type(e).__name__}: {str(e)[:100]}); "
                             f"check that the file is complete") from None
    else:
        import cv2
        if name.endswith((".jpg", ".jpeg")):
            _check_jpeg_complete(path)
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise InputError(f"{path}: cannot be decoded as an image; give a complete JPEG, PNG or TIFF file")
        if img.ndim == 3 and img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return _to_rgb8(img, path)


def write_png(path, rgb_or_grey):
    """PNG via OpenCV (RGB input)."""
    import cv2
    a = np.asarray(rgb_or_grey)
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), a):
        raise OSError(f"could not write {path}")


def read_png(path, grey=False, fix="write it again"):
    """An 8-bit PNG artifact as RGB (or grey); `fix` says how to rewrite a damaged one."""
    import cv2
    a = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    if a is None:
        raise InputError(f"{path}: cannot be read as an image (truncated or damaged); {fix}")
    return a if grey else cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
