"""Reading H&E images of any common kind as 8-bit RGB; PNG artifacts in and out.

The reader follows the file's content, not its name (a PNG saved as .jpg, a JPEG as .tif). A TIFF's
colours follow its Photometric and ExtraSamples tags (palette, CMYK, min-is-white, premultiplied or
unspecified extra samples), and of a TIFF holding several images the largest is read: slide scanners
store thumbnail, macro and label images beside the full-resolution one."""
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .chunks import CHUNK_BYTES, row_chunks
from .errors import InputError

log = logging.getLogger("trihrge")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff_format(path) -> str:
    """'TIFF', 'JPEG', 'PNG' from the first bytes, else Pillow's name for the format (or 'unknown')."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] in TIFF_MAGIC:
        return "TIFF"
    if head[:2] == b"\xff\xd8":
        return "JPEG"
    if head[:4] == b"\x89PNG":
        return "PNG"
    try:
        with open_pil(path) as im:
            return im.format or "unknown"
    except Exception:  # Pillow raises several types for what it cannot identify
        return "unknown"


def read_rgb(path):
    """Read an H&E image (JPEG/PNG/TIFF/OME-TIFF; RGB, RGBA, grey, palette, CMYK, 16 bit, float) as uint8 (H, W, 3)."""
    path = _non_empty(path)
    if sniff_format(path) == "TIFF":
        img, colours = _read_tiff(path)
        return to_rgb8(img, path, colours)
    with _pil_rows(path, ours=3) as rows:
        return to_rgb8(rows, path)


class RgbBands(NamedTuple):
    """An H&E image as consecutive uint8 RGB row bands (open_rgb_bands)."""
    shape: tuple                                  # (height, width)
    bands: Callable[[], Iterator[np.ndarray]]     # each call: one pass over the image, (rows, width, 3) bands


@contextmanager
def open_rgb_bands(path):
    """An H&E image (any kind read_rgb reads, with the same pixels) as RgbBands. A TIFF stays in
    its file: each band is read from it (memory-mapped when stored uncompressed in one piece, else
    through its tiles or strips), so a scan larger than memory is converted band by band; other
    formats are decoded whole by Pillow, and their bands are copied out of Pillow's image."""
    path = _non_empty(path)
    if sniff_format(path) != "TIFF":
        with _pil_rows(path, ours=0) as rows:
            yield RgbBands(rows.shape[:2], lambda: (band for _, band in rgb8_bands(rows, path)))
        return
    import tifffile
    with _tiff_errors(path) as damage, tifffile.TiffFile(path) as tf:
        img, colours = _tiff_samples(tf, path, lazy=True)
        damage.check()

        def bands():
            with _tiff_errors(path) as late:   # a damaged tile is found only when its band is read
                yield from _read_ahead(band for _, band in rgb8_bands(img, path, colours))
                late.check()
        yield RgbBands(img.shape[:2], bands)


def _read_ahead(bands):
    """The bands, the next one decoded in a thread while the caller works on this one (tile decoding
    releases the GIL): stage 1 on a 32,000 px tiled JPEG TIFF at 0.2738 um/px took 21.9 s, not 29.6 s."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, bands, None)
        while (band := ahead.result()) is not None:
            ahead = pool.submit(next, bands, None)
            yield band


def _non_empty(path) -> Path:
    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; copy the H&E image again")
    return path


def image_size(path) -> tuple:
    """(height, width) of an image from its header, without decoding the pixels (a TIFF's largest image)."""
    path = Path(path)
    if sniff_format(path) == "TIFF":
        import tifffile
        with _tiff_errors(path) as damage, tifffile.TiffFile(path) as tf:
            series, axes = _main_series(tf, path)
            damage.check()
            _log_orientation(path, _tiff_orientation(series))
            return tuple(int(series.shape[axes.index(a)]) for a in "YX")
    with open_pil(path) as im:
        _log_orientation(path, im.getexif().get(0x0112))
        return int(im.size[1]), int(im.size[0])


def to_rgb8(img, path, colours=None):
    """Any array an image reader returns -> uint8 (H, W, 3), converted in row bands (a 20,000 px
    16-bit or RGBA scan is never copied whole in float32), one log line per conversion. colours:
    the reader's function from a band of samples to grey, RGB or RGB + alpha (uint8, or floats in
    [0, 1]); without it the samples are scaled by the bit depth they use, or a float image's range."""
    img = _layout(img, path, colours)
    if _is_rgb8(img, colours) and isinstance(img, np.ndarray):
        return np.ascontiguousarray(img)   # 8-bit RGB: nothing to convert, no copy
    out = np.empty((*img.shape[:2], 3), np.uint8)
    for rows, band in rgb8_bands(img, path, colours):
        out[rows] = band
    return out


def _band_rows(img, row_bytes) -> int | None:
    """Rows per band: row_chunks' default, or for a TIFF read by tiles or strips a multiple of
    their height, so that each is decoded once (bands across them decoded 256-row tiles twice:
    stage 1 on a 32,000 px tiled JPEG took 1.4 x as long)."""
    step = getattr(img, "chunk_rows", None)
    return max(1, CHUNK_BYTES // row_bytes // step) * step if step else None


def _is_rgb8(img, colours) -> bool:
    return colours is None and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def rgb8_bands(img, path, colours=None) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, uint8 (rows, W, 3)) over consecutive row bands of an image reader's array, or of a
    TIFF read band by band (_TiffRows); see to_rgb8. The log lines come after the last band."""
    img = _layout(img, path, colours)
    h, w = img.shape[:2]
    if _is_rgb8(img, colours):
        for rows in row_chunks(h, w * 3, _band_rows(img, w * 3), itemsize=1):
            yield rows, np.asarray(img[rows])
        return
    scale = None if colours else _scale(img, path)
    channels = 3
    for rows, band in _sample_bands(img):
        band = band if colours is None else colours(band)
        rgb, channels = _band_rgb8(band, scale or (255.0 if band.dtype.kind == "f" else 1.0))
        yield rows, rgb
    if channels in (1, 2):
        log.info("%s: greyscale image converted to RGB", path.name)
    if channels in (2, 4):
        log.info("%s: the image's alpha composited onto white", path.name)


def _sample_bands(img):
    """(rows, samples) over consecutive row bands of an image's samples, 16 MB as float32 each (in
    whole tiles of a TIFF read band by band)."""
    n = int(np.prod(img.shape[1:]))
    for rows in row_chunks(len(img), n, _band_rows(img, n * 4)):
        yield rows, np.asarray(img[rows])


def _layout(img, path, colours):
    """The image in (H, W[, channels]) layout: a TIFF's samples are already (and a colours function
    reads however many samples its tags describe, e.g. RGB + alpha + an unspecified one)."""
    if isinstance(img, (_TiffRows, _PilRows)) or colours is not None:
        return img
    return _standard_layout(np.asarray(img), path)


def _standard_layout(img, path):
    """(H, W) or (H, W, channels) as views: singleton leading axes dropped, channels moved last."""
    while img.ndim > 3 and img.shape[0] == 1:  # singleton leading axes (TIFF series); never squeeze pixels
        img = img[0]
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        log.info("%s: channels-first image %s, moved channels last", path.name, img.shape)
        img = np.moveaxis(img, 0, -1)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 2, 3, 4)):
        raise InputError(f"{path}: unsupported image layout {img.shape}; give a 2-D RGB, RGBA or greyscale image")
    return img


def _scale(img, path) -> float:
    """The factor that brings the whole image's samples to 0-255: by the bit depth the values use
    (8/10/12/14/16/32 bit, not the image maximum, so colours keep their meaning), or a float image's range."""
    if img.dtype == np.uint8:
        return 1.0
    if np.issubdtype(img.dtype, np.floating):
        scale = _float_scale(img, path)
    else:
        hi = max((int(band.max()) for _, band in _sample_bands(img) if band.size), default=255)
        scale = 255.0 / (2 ** next(b for b in (8, 10, 12, 14, 16, 32, 64) if hi < 2 ** b) - 1)
    log.info("%s: %s image converted to 8 bit (scaled by %.5g)", path.name, img.dtype, scale)
    return scale


def _float_scale(img, path) -> float:
    """The factor to 0-255 of a float image, from its finite values (band by band): [0, 1] (a slight
    overshoot allowed, as resampling leaves it), [0, 255], or its own maximum. NaN and infinity read
    as white (glass) rather than as black (dense tissue)."""
    hi, bad = -np.inf, 0
    for _, band in _sample_bands(img):
        finite = np.isfinite(band)
        bad += finite.size - int(np.count_nonzero(finite))
        hi = max(hi, float(np.max(band, where=finite, initial=-np.inf)))
    if bad:
        log.warning("%s: %d pixels are NaN or infinite; they are read as white (glass)", path.name, bad)
    hi = 1.0 if hi == -np.inf else hi
    return 255.0 if hi <= 1.5 else (1.0 if hi <= 255 else 255.0 / hi)


def _band_rgb8(band, scale):
    """(uint8 (rows, W, 3), the band's channels): scaled, grey repeated, alpha composited onto white."""
    if band.dtype != np.uint8 or scale != 1.0:
        band = np.clip(np.nan_to_num(band.astype(np.float32) * scale, nan=255.0, posinf=255.0, neginf=0.0),
                       0, 255).round().astype(np.uint8)
    band = band[..., None] if band.ndim == 2 else band
    c = band.shape[-1]
    if c in (2, 4):
        a = band[..., -1:].astype(np.float32) / 255.0
        band = np.clip(band[..., :-1] * a + 255.0 * (1.0 - a), 0, 255).round().astype(np.uint8)
    return (np.repeat(band, 3, axis=2) if band.shape[-1] == 1 else band), c


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


def _check_size(path, width, height, bytes_per_pixel=6):
    """Refuse an image whose decoded pixels would not fit in memory (default: 8-bit RGB and one
    converted copy)."""
    need = width * height * bytes_per_pixel
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


@contextmanager
def _pil_rows(path, *, ours: int):
    """JPEG/PNG (and what else Pillow reads) decoded by Pillow, as _PilRows. Truncation is decided by
    decoding (a complete JPEG followed by a camera's trailer is valid), and OpenCV's 2^30-pixel limit
    does not apply; memory is checked for Pillow's copy and `ours` bytes a pixel more."""
    with _pillow_errors(path):
        im = open_pil(path)
    with im:   # closed however the caller's work ends; its errors are its own
        with _pillow_errors(path):
            mode = _decode_pil(im, path, ours)
        yield _PilRows(im, mode)


@contextmanager
def _pillow_errors(path):
    """Pillow's errors for a damaged or too large file as one InputError naming it."""
    try:
        yield
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: not enough memory to decode it; save it as a (tiled) TIFF, or free memory") from None
    except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError for damaged files
        raise _undecodable(path, e) from None


def _decode_pil(im, path, ours: int):
    """Check memory, log, decode; the mode Pillow converts the bands to (None: read as they are)."""
    mode = ("RGBA" if ("transparency" in im.info or im.mode == "PA") else "RGB") \
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1") else None
    # Pillow's own copy: 4 bytes a pixel for colour or 32 bit
    _check_size(path, *im.size, bytes_per_pixel=(4 if len(im.getbands()) > 1 or im.mode[0] in "IF" else 1) + ours)
    _log_orientation(path, im.getexif().get(0x0112))
    if im.info.get("icc_profile"):
        log.info("%s: its embedded ICC colour profile is not applied (the pixel values are read as they "
                 "are, as the 10x software and scanpy read them)", path.name)
    im.load()
    return mode


def _undecodable(path, e) -> InputError:
    if (bits := _jpeg_precision(path)) not in (None, 8):
        return InputError(f"{path}: a {bits}-bit JPEG, which cannot be decoded here; save the image as 16-bit "
                          f"TIFF or PNG")
    what = "truncated or damaged" if "truncated" in str(e) or isinstance(e, OSError) else "damaged"
    return InputError(f"{path}: cannot be decoded as an image ({what}: {str(e)[:80]}); give a complete JPEG, "
                      f"PNG or TIFF file (copy the complete file again)")


class _PilRows:
    """A decoded Pillow image's samples, copied out (and converted to `mode`) a row band at a time:
    numpy's view of a whole Pillow image goes through a bytes copy, and with our RGB copy beside
    Pillow's a JPEG took 7 bytes a pixel at once instead of 4."""
    chunk_rows = None

    def __init__(self, im, mode):
        self._im, self._mode = im, mode
        first = self[0:1]
        self.shape, self.dtype = (im.size[1], *first.shape[1:]), first.dtype
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        r0, r1, _ = rows.indices(self._im.size[1])
        part = self._im.crop((0, r0, self._im.size[0], max(r0, r1)))
        return np.asarray(part.convert(self._mode) if self._mode else part)


def _jpeg_precision(path):
    """Bits per sample of a JPEG from its first frame header (SOF0-3), or None."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:2] != b"\xff\xd8":
        return None
    at = min((i for i in (head.find(b"\xff" + bytes([m])) for m in range(0xC0, 0xC4)) if i > 0), default=-1)
    return head[at + 4] if 0 < at < len(head) - 4 else None


def _read_tiff(path):
    """(the samples of a TIFF's main image in memory, the colours band function or None)."""
    import tifffile
    with _tiff_errors(path) as damage, tifffile.TiffFile(path) as tf:
        samples = _tiff_samples(tf, path, lazy=False)
        damage.check()
        return samples


class _TiffLog(logging.Handler):
    """What tifffile only logs while it reads a file, collected instead of printed: an offset past
    the end of the file (a truncated TIFF, whose lost pages tifffile skips: an OME-TIFF of three
    channel pages cut in half read as one grey page) is refused by check(); the rest is passed on
    as warnings."""
    TRUNCATED = ("invalid page offset", "invalid value offset")

    def __init__(self, path):
        super().__init__(logging.WARNING)
        self.path, self.messages = path, []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def check(self):
        cut = [m for m in self.messages if any(t in m for t in self.TRUNCATED)]
        if cut:
            raise InputError(f"{self.path}: truncated or damaged TIFF ({cut[0][:100]}); check that the file is "
                             f"complete (copy it again)")

    def pass_on(self):
        for m in dict.fromkeys(self.messages):   # once each (tifffile may parse the file twice)
            log.warning("%s: tifffile: %s", self.path.name, m)


@contextmanager
def _tiff_errors(path):
    """A damaged or unreadable TIFF as one InputError line (tifffile's own log lines collected by a
    _TiffLog, which is yielded)."""
    tiff_log = logging.getLogger("tifffile")
    collected, propagate = _TiffLog(path), tiff_log.propagate
    tiff_log.addHandler(collected)
    tiff_log.propagate = False
    try:
        yield collected
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read it; free memory, or save the image as 8-bit RGB") from None
    except Exception as e:  # tifffile raises many types for damaged files
        raise InputError(f"{path}: cannot be read as TIFF ({type(e).__name__}: {str(e)[:100]}); "
                         f"check that the file is complete") from None
    else:
        collected.pass_on()
    finally:
        tiff_log.removeHandler(collected)
        tiff_log.propagate = propagate


def _tiff_samples(tf, path, *, lazy: bool):
    """(samples, colours) of the main image of an open TIFF: an array in memory, or with `lazy` a
    _TiffRows where the file allows reading it band by band."""
    series, axes = _main_series(tf, path)
    page = series.keyframe
    _log_orientation(path, _tiff_orientation(series))
    h, w = (int(series.shape[axes.index(a)]) for a in "YX")
    img = _TiffRows.of(tf, series, path) if lazy else None
    if img is None:
        samples = int(np.prod(series.shape)) // (h * w)
        _check_size(path, w, h, samples * series.dtype.itemsize + 3)   # decoded, and the RGB made in bands
        img = _channels_last(series.asarray(), axes, path)
    # channels as pages (OME 'C' axis): each page's tags describe one plane, the planes are R, G, B(, A)
    return img, (None if img.ndim == 3 and "S" not in axes else _tiff_colours(img, page, path))


class _TiffRows:
    """A TIFF image's samples read row band by row band from its file, in _channels_last's layout:
    memory-mapped when stored uncompressed in one piece, else through tifffile's zarr view of its
    tiles or strips. `of` gives None where neither reads less than the whole image (one strip)."""

    def __init__(self, array, axes, path):
        self._array, self._axes, self._path = array, axes, path
        chunks = getattr(array, "chunks", None)   # a memory map has none
        self.chunk_rows = int(chunks[axes.index("Y")]) if chunks else None
        none = self[0:0]   # the layout of a band without decoding one
        self.shape, self.dtype = (int(array.shape[axes.index("Y")]), *none.shape[1:]), none.dtype
        self.ndim = len(self.shape)

    @classmethod
    def of(cls, tf, series, path):
        import tifffile
        import zarr
        axes = series.axes
        try:
            if series.dataoffset is not None:   # contiguous and uncompressed
                return cls(tifffile.memmap(tf.filehandle.path, series=tf.series.index(series), mode="r"), axes, path)
            array = zarr.open(series.aszarr(level=0), mode="r")
        except Exception:  # a layout these views do not take: read whole, as read_rgb does
            return None
        if array.chunks[axes.index("Y")] >= array.shape[axes.index("Y")] > 1:
            return None                                        # one strip: each band would decode all of it
        return cls(array, axes, path)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        index = tuple(rows if a == "Y" else slice(None) for a in self._axes)
        band = np.asarray(self._array[index])
        return _channels_last(band, self._axes, self._path)


def _main_series(tf, path):
    """The full-resolution image of a TIFF and its axes: the largest series (level 0 of a pyramid)."""
    def area(series):
        return int(np.prod([n for n, a in zip(series.shape, series.axes) if a in "YX"]))
    candidates = [s for s in tf.series if "Y" in s.axes and "X" in s.axes]
    if not candidates:
        raise InputError(f"{path}: no 2-D image in this TIFF (axes {', '.join(s.axes for s in tf.series)}); "
                         f"give the H&E as an RGB TIFF, JPEG or PNG")
    series = max(candidates, key=area)   # the first of equal ones
    if series is not tf.series[0]:
        log.info("%s: read image %d of %d (%s), the largest; the file's first image is smaller (a thumbnail, "
                 "macro or label image)", path.name, tf.series.index(series) + 1, len(tf.series),
                 " x ".join(str(series.shape[series.axes.index(a)]) for a in "XY"))
    return series, series.axes


def _tiff_orientation(series):
    tag = series.keyframe.tags.get("Orientation")
    return int(tag.value) if tag is not None else None


def _channels_last(img, axes, path):
    """(Y, X) or (Y, X, samples) from a TIFF series' array; other axes must have one entry."""
    channel = "S" if "S" in axes else ("C" if "C" in axes and img.shape[axes.index("C")] in (3, 4) else None)
    keep = [axes.index("Y"), axes.index("X")] + ([axes.index(channel)] if channel else [])
    others = [i for i in range(img.ndim) if i not in keep]
    if any(img.shape[i] != 1 for i in others):
        raise InputError(f"{path}: unsupported image layout {img.shape} (axes {axes}); give a 2-D RGB, RGBA or "
                         f"greyscale image (one plane, not a stack)")
    return np.transpose(img, keep + others).reshape([img.shape[i] for i in keep])


def _tiff_colours(img, page, path):
    """The band function of to_rgb8 for a TIFF's samples, by its Photometric and ExtraSamples tags
    (None: the samples are grey or RGB (+ alpha) as they are)."""
    from tifffile import EXTRASAMPLE, PHOTOMETRIC
    kind = page.photometric
    if kind == PHOTOMETRIC.PALETTE:
        cmap = np.asarray(page.colormap)
        cmap = (np.round(cmap / 257.0) if cmap.max() > 255 else cmap).astype(np.uint8).T   # 16-bit entries, as specified
        log.info("%s: palette image converted to RGB", path.name)
        return lambda band: cmap[band if band.ndim == 2 else band[..., 0]]
    # YCbCr: tifffile decodes it to RGB (JPEG-compressed TIFFs, whole-slide scans)
    colour = {PHOTOMETRIC.MINISWHITE: 1, PHOTOMETRIC.MINISBLACK: 1, PHOTOMETRIC.RGB: 3, PHOTOMETRIC.YCBCR: 3,
              PHOTOMETRIC.SEPARATED: 4}.get(kind)
    if colour is None:
        raise InputError(f"{path}: a TIFF of photometric {kind.name}, which is not read here; save the image "
                         f"as RGB (or greyscale)")
    # an extra sample without its ExtraSamples entry (OpenCV writes none) is taken as alpha, as before the tag
    n_extra = max(0, (img.shape[-1] if img.ndim == 3 else 1) - colour)
    extra = (list(page.extrasamples or ()) + [EXTRASAMPLE.UNASSALPHA] * n_extra)[:n_extra]
    alphas = [i for i, e in enumerate(extra) if e in (EXTRASAMPLE.ASSOCALPHA, EXTRASAMPLE.UNASSALPHA)]
    alpha = colour + alphas[0] if alphas else None
    if len(extra) > len(alphas[:1]):
        log.info("%s: %d extra samples that are not alpha are ignored", path.name, len(extra) - len(alphas[:1]))
    straight = alpha is None or extra[alpha - colour] == EXTRASAMPLE.UNASSALPHA
    whole_bytes = page.bitspersample >= 8   # 1-bit grey is read as 0/1: scaled by its bit depth below
    if kind in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR) and whole_bytes and (
            not extra or (len(extra) == 1 and alpha == colour and straight)):
        return None
    if kind in (PHOTOMETRIC.MINISWHITE, PHOTOMETRIC.SEPARATED):
        log.info("%s: %s image converted", path.name, "min-is-white" if kind == PHOTOMETRIC.MINISWHITE else "CMYK")
    full = 2.0 ** page.bitspersample - 1 if img.dtype.kind in "ui" else 1.0

    def colours(band):
        planes = band[..., None].astype(np.float32) / full if band.ndim == 2 else band.astype(np.float32) / full
        v = planes[..., :colour]
        if kind == PHOTOMETRIC.MINISWHITE:
            v = 1.0 - v
        elif kind == PHOTOMETRIC.SEPARATED:
            v = (1.0 - v[..., :3]) * (1.0 - v[..., 3:4])
        if alpha is None:
            return v
        a = planes[..., alpha:alpha + 1]
        if not straight:   # premultiplied: back to straight colour
            v = np.divide(v, a, out=np.zeros_like(v), where=a > 0).clip(0, 1)
        return np.concatenate([v, a], axis=-1)
    return colours


def write_png(path, rgb_or_grey):
    """PNG via OpenCV (RGB input), the file written by Python: OpenCV's own file functions crash on a
    path that is not UTF-8."""
    import cv2
    a = np.asarray(rgb_or_grey)
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", a)
    if not ok:
        raise OSError(f"could not encode {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def read_png(path, grey=False, fix="write it again"):
    """An 8-bit PNG artifact as RGB (or grey); `fix` says how to rewrite a damaged one."""
    import cv2
    data = np.fromfile(path, np.uint8) if Path(path).is_file() else np.zeros(0, np.uint8)
    a = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR) if data.size else None
    if a is None:
        raise InputError(f"{path}: cannot be read as an image (truncated or damaged); {fix}")
    return a if grey else cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
