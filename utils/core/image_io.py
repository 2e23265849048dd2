"""Reading H&E images of any common kind as 8-bit RGB; PNG artifacts in and out."""
import logging
import os
from pathlib import Path

import numpy as np

from .errors import InputError

log = logging.getLogger("trihrge")

def _to_rgb8(img, path):
    """Any array an image reader returns -> uint8 (H, W, 3), with a log line for each conversion."""
    img = np.asarray(img)
    while img.ndim > 3 and img.shape[0] == 1:  # singleton leading axes (TIFF series); never squeeze pixels
        img = img[0]
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


_ORIENTATION = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped", 5: "transposed",
                6: "rotated 90 degrees clockwise", 7: "transversed", 8: "rotated 90 degrees counter-clockwise"}


def _log_orientation(path, tag) -> None:
    """EXIF / TIFF orientation is ignored, loudly: spot coordinates (Space Ranger, scanpy) refer to the
    pixels as stored, not to the rotated view a photo viewer shows."""
    if tag in _ORIENTATION:
        log.warning("%s: the file says it should be shown %s (EXIF/TIFF orientation %d); this is ignored, "
                    "because spot coordinates refer to the pixels as stored. If your x/y were measured on the "
                    "rotated view, rotate the image itself and drop the tag", path.name, _ORIENTATION[tag], tag)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; free pages where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_size(path, width, height):
    """Refuse an image whose decoded RGB would not fit in memory (decoding is the only way to read a
    JPEG/PNG; a tiled TIFF is memory-mapped instead)."""
    need = width * height * 3 * 2  # the decoded image and one converted copy
    free = available_memory()
    if need > free:
        raise InputError(f"{path}: a {width} x {height} px image needs about {need / 2 ** 30:.1f} GiB of memory to "
                         f"decode and only {free / 2 ** 30:.1f} GiB is free; save it as a (tiled) TIFF, or free memory")


def open_pil(path):
    """Pillow's Image.open without its decompression-bomb limit: large scans are valid input and
    our own memory check (_check_size) replaces that guard."""
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    return Image.open(path)


def _read_pil(path):
    """JPEG/PNG through Pillow: truncation is decided by decoding (a complete JPEG followed by a
    camera's trailer is valid), and OpenCV's 2^30-pixel limit does not apply (memory is checked)."""
    try:
        with open_pil(path) as im:
            _check_size(path, *im.size)
            _log_orientation(path, im.getexif().get(0x0112))
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGBA" if ("transparency" in im.info or im.mode == "PA") else "RGB")
            return np.asarray(im)
    except InputError:
        raise
    except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError for damaged files
        what = "truncated or damaged" if "truncated" in str(e) or isinstance(e, OSError) else "damaged"
        raise InputError(f"{path}: cannot be decoded as an image ({what}: {str(e)[:80]}); give a complete JPEG, "
                         f"PNG or TIFF file (copy the complete file again)") from None


def _read_tiff(path):
    import tifffile
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]  # level 0 of a pyramid is the full resolution
            tag = tf.pages[0].tags.get("Orientation")
            _log_orientation(path, int(tag.value) if tag is not None else None)
            return series.asarray()
    except Exception as e:  # tifffile raises many types for damaged files
        raise InputError(f"{path}: cannot be read as TIFF ({type(e).__name__}: {str(e)[:100]}); "
                         f"check that the file is complete") from None


def read_rgb(path):
    """Read an H&E image (JPEG/PNG/TIFF/OME-TIFF; RGB, RGBA, grey, 16 bit, float) as uint8 (H, W, 3)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; copy the H&E image again")
    with open(path, "rb") as f:
        head = f.read(4)
    is_tiff = head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if path.name.lower().endswith((".jpg", ".jpeg")) and head[:2] != b"\xff\xd8":
        raise InputError(f"{path}: not a JPEG file (bad header); give the H&E image as JPEG, PNG or TIFF "
                         f"with the matching extension")
    img = _read_tiff(path) if is_tiff or path.name.lower().endswith((".tif", ".tiff")) else _read_pil(path)
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
