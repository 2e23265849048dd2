"""Stage 1 scales the H&E row band by row band (utils/core/resize.py, utils/core/cubic.py) from a TIFF
read band by band (image_io.open_rgb_bands): the pixels of cv2.resize of the whole image (exactly when
shrinking, to within 1 in a rare value when enlarging), the same pixels as read_rgb, a TIFF larger
than memory calibrated, and the sizes OpenCV gives (half to even)."""
import cv2
import numpy as np
import pytest
import tifffile
from conftest import write_raw_dir

from utils.core import geometry as geo
from utils.core import image_io
from utils.core import layout as L
from utils.core.chunks import CHUNK_BYTES
from utils.core.cubic import cubic_taps
from utils.core.resize import scaled_bands, scaled_shape


def _tissue(h, w, seed=0):
    """Smooth colour patches plus pixel noise: every filter weight matters."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    return np.clip(base.astype(int) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 0.25, 0.5476, 0.7303, 0.31, 0.9995, 1.0, 1.38])
@pytest.mark.parametrize("band", [1, 7, 5000])
def test_scaled_bands_are_the_whole_image_resize(scale, band):
    """Shrinking gives cv2.resize's pixels exactly; enlarging (bicubic, whose sums OpenCV makes in the
    CPU's vector width) to within 1, in at most 1 value in 2,000, and the same for every band height."""
    img = _tissue(301, 227)
    want = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    got = np.concatenate(list(scaled_bands((img[r:r + band] for r in range(0, len(img), band)), img.shape, scale)))
    assert got.shape == want.shape == (*scaled_shape(img.shape, scale), 3)
    if scale <= 1:
        np.testing.assert_array_equal(got, want)
        return
    off = np.abs(got.astype(int) - want)
    assert off.max() <= 1 and np.mean(off > 0) < 5e-4
    whole = np.concatenate(list(scaled_bands(iter([img]), img.shape, scale)))
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("scale", [1.38, 1.5, 2.0, 3.3, 1.05])
def test_bicubic_taps_are_opencvs(scale):
    """The weights of each output pixel's four taps (and the edge's repeated pixel) are those OpenCV
    uses: probed with unit impulses through cv2.resize in float32, whose filter is the same table."""
    n_in = 40
    index, weight = cubic_taps(n_in, scaled_shape((n_in, 1), scale)[0], scale)
    probe = np.eye(n_in, dtype=np.float32)[:, None, :].repeat(4, axis=1)       # impulse j in row set j
    seen = np.stack([cv2.resize(p, None, fx=scale, fy=1.0, interpolation=cv2.INTER_CUBIC)[1] for p in probe], axis=1)
    ours = np.zeros_like(seen)
    for i in range(len(index)):
        np.add.at(ours[i], index[i], weight[i])
    np.testing.assert_allclose(ours, seen, atol=2e-6)


def test_calibrated_sizes_round_half_to_even_as_opencv():
    """1,001 px at 0.25 um/px is 500 px at 0.5 (OpenCV); floor(x + 0.5) said 501 and stage 1 stopped
    on an assertion for every such scan."""
    for n in (1001, 1003, 1005, 2047):
        rows = cv2.resize(np.zeros((n, 3, 3), np.uint8), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA).shape[0]
        assert geo.calibrated_shape((n, 1000), 0.25)[0][0] == rows


def _write(path, img, layout):
    if layout == "contiguous":
        tifffile.imwrite(path, img, photometric="rgb")
    elif layout == "tiled-jpeg":
        tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), compression="jpeg")
    elif layout == "strips-16bit":
        tifffile.imwrite(path, img.astype(np.uint16) * 257, photometric="rgb", rowsperstrip=5, compression="zlib")
    elif layout == "one-strip-lzw":
        tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=len(img), compression="lzw")
    elif layout == "palette":
        tifffile.imwrite(path, img[..., 0], photometric="palette", tile=(32, 32),
                         colormap=np.stack([np.arange(256) * 257, np.arange(255, -1, -1) * 257, np.full(256, 30000)]))
    elif layout == "pyramid":
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(img, tile=(64, 64), photometric="rgb", subifds=1)
            tw.write(img[::2, ::2].copy(), tile=(64, 64), photometric="rgb", subfiletype=1)


@pytest.mark.parametrize("layout", ["contiguous", "tiled-jpeg", "strips-16bit", "one-strip-lzw", "palette", "pyramid"])
def test_tiffs_read_band_by_band_give_read_rgbs_pixels(tmp_path, layout):
    img = _tissue(203, 150)
    _write(tmp_path / "he.tif", img, layout)
    with image_io.open_rgb_bands(tmp_path / "he.tif") as image:
        assert image.shape == img.shape[:2]
        got = np.concatenate(list(image.bands()))
        again = np.concatenate(list(image.bands()))   # a second pass reads the same
    want = image_io.read_rgb(tmp_path / "he.tif")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again, want)


def test_a_tiff_larger_than_memory_is_calibrated_band_by_band(tmp_path, monkeypatch):
    """read_rgb refuses a TIFF whose pixels do not fit in memory; stage 1 reads its tiles band by band
    (the image never whole in memory) and writes the pixels cv2.resize gives."""
    from utils.core.errors import InputError
    from utils.stages.image_calibration import calibrate
    img = _tissue(1001, 1205)          # 0.25 um/px, 1,001 rows: 500 at 0.5 um/px (half to even)
    d = write_raw_dir(tmp_path / "d", [[300.0, 300.0], [700.0, 500.0], [900.0, 800.0]], pixel_size=0.25,
                      image_name=None)
    tifffile.imwrite(d / "he-raw.tif", img, photometric="rgb", tile=(128, 128), compression="zlib")
    monkeypatch.setattr(image_io, "available_memory", lambda: 100_000)
    with pytest.raises(InputError, match="needs about"):
        image_io.read_rgb(d / "he-raw.tif")
    t = calibrate(d)
    assert t["scaled_shape"] == [500, 602]
    he = L.open_calibrated_image(d, t)
    np.testing.assert_array_equal(he[:500, :602], cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    assert (he[500:] == 255).all() and (he[:, 602:] == 255).all()


def test_a_damaged_tile_read_late_is_one_error_line(tmp_path):
    from utils.core.errors import InputError
    img = _tissue(256, 256)
    tifffile.imwrite(tmp_path / "he.tif", img, photometric="rgb", tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(tmp_path / "he.tif") as tf:
        offset = tf.pages[0].dataoffsets[-1]
    data = bytearray((tmp_path / "he.tif").read_bytes())
    data[offset:offset + 40] = b"\xff" * 40             # the last tile's zlib stream
    (tmp_path / "he.tif").write_bytes(bytes(data))
    with pytest.raises(InputError, match="cannot be read as TIFF"):
        with image_io.open_rgb_bands(tmp_path / "he.tif") as image:
            list(image.bands())


def test_one_bit_grey_and_two_extra_samples_read_alike_and_right(tmp_path):
    """A 1-bit min-is-black TIFF read white as 1 (near black) instead of 255; RGB + alpha + an
    unspecified sample was refused whole (a (H, W, 5) layout) but read band by band."""
    bits = np.zeros((60, 70), bool)
    bits[:, 35:] = True
    tifffile.imwrite(tmp_path / "bits.tif", bits, photometric="minisblack", rowsperstrip=16)
    img = _tissue(60, 70)
    alpha = img[..., :1]
    tifffile.imwrite(tmp_path / "five.tif", np.dstack([img, alpha, alpha]), photometric="rgb", tile=(32, 32),
                     extrasamples=["unassalpha", "unspecified"])
    composite = np.clip(img * (alpha / 255.0) + 255 * (1 - alpha / 255.0), 0, 255).round().astype(np.uint8)
    for name, want in (("bits.tif", np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, 2)),
                       ("five.tif", composite)):
        np.testing.assert_array_equal(image_io.read_rgb(tmp_path / name), want)
        with image_io.open_rgb_bands(tmp_path / name) as image:
            np.testing.assert_array_equal(np.concatenate(list(image.bands())), want)


def test_a_truncated_ome_tiff_is_refused_not_read_as_one_grey_page(tmp_path):
    """Cut in half, an OME-TIFF of three channel pages lost its later pages: tifffile logged errors
    and read the first page alone as a grey image, and stage 1 wrote the red channel as the H&E."""
    from utils.core.errors import InputError
    tifffile.imwrite(tmp_path / "he.ome.tif", np.moveaxis(_tissue(200, 220), -1, 0), ome=True, metadata={"axes": "CYX"})
    data = (tmp_path / "he.ome.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="truncated or damaged TIFF"):
        image_io.read_rgb(tmp_path / "cut.tif")
    with pytest.raises(InputError, match="truncated or damaged TIFF"):
        with image_io.open_rgb_bands(tmp_path / "cut.tif") as image:
            list(image.bands())


def _pillow_files(tmp_path):
    """The same tissue saved by Pillow in the modes a user's JPEG or PNG comes in."""
    from PIL import Image
    img = _tissue(97, 131)
    rgb = Image.fromarray(img)
    alpha = Image.fromarray(np.linspace(0, 255, 97 * 131).reshape(97, 131).astype(np.uint8))
    grey = rgb.convert("L")
    made = {"rgb.jpg": rgb, "rgb.png": rgb, "grey.png": grey, "cmyk.jpg": rgb.convert("CMYK"),
            "la.png": Image.merge("LA", (grey, alpha)), "rgba.png": Image.merge("RGBA", (*rgb.split(), alpha)),
            "bits.png": grey.convert("1"), "i16.png": Image.fromarray(img[..., 1].astype(np.uint16) * 257)}
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    made["palette.png"] = pal
    for name, im in made.items():
        im.save(tmp_path / name)
    return list(made)


def test_jpeg_and_png_bands_give_the_whole_images_pixels(tmp_path):
    """A JPEG or PNG is decoded by Pillow and copied out a band at a time, in every mode: the pixels
    of converting the whole decoded image at once (as read_rgb did before)."""
    from PIL import Image
    for name in _pillow_files(tmp_path):
        p = tmp_path / name
        with Image.open(p) as im:
            mode = ("RGBA" if "transparency" in im.info else "RGB") if im.mode in ("P", "CMYK", "1") else None
            want = image_io.to_rgb8(np.array(im.convert(mode) if mode else im), p)
        np.testing.assert_array_equal(image_io.read_rgb(p), want, err_msg=name)
        with image_io.open_rgb_bands(p) as image:
            assert image.shape == want.shape[:2]
            np.testing.assert_array_equal(np.concatenate(list(image.bands())), want, err_msg=name)
    np.testing.assert_array_equal(image_io.read_rgb(tmp_path / "rgb.png"), _tissue(97, 131))


def test_a_large_png_is_never_copied_whole(tmp_path):
    """Stage 1's bands of a PNG: a few copies of one 16 MB band beside Pillow's decoded image, never
    the whole image again (tracemalloc counts numpy's and Python's memory, not Pillow's)."""
    import tracemalloc

    from PIL import Image
    img = np.full((6000, 5000, 3), 200, np.uint8)            # 90 MB as RGB
    img[::7] = 120
    Image.fromarray(img).save(tmp_path / "big.png", compress_level=1)
    tracemalloc.start()
    try:
        with image_io.open_rgb_bands(tmp_path / "big.png") as image:
            rows = sum(len(band) for band in image.bands())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == 6000 and peak < 4 * CHUNK_BYTES < img.nbytes
