import json

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import assert_user_error, run_script, snapshot, write_raw_dir

from utils.core import geometry as geo
from utils.core import layout as L
from utils.stages.image_calibration import calibrate, superpixel_means


def _marker_image(h=900, w=1100, box=(400, 300, 60)):
    """Pink background with one dark square of side box[2] at column box[0], row box[1] (raw px)."""
    img = np.full((h, w, 3), (235, 200, 225), np.uint8)
    x, y, s = box
    img[y:y + s, x:x + s] = (40, 20, 90)
    return img


def test_coordinates_round_trip_and_marker_lands(tmp_path):
    img = _marker_image()
    xy = np.array([[430.0, 330.0], [100.0, 100.0], [1000.0, 800.0]])  # first spot: marker centre
    d = write_raw_dir(tmp_path / "d", xy, pixel_size=0.3, image=img)
    t = calibrate(d)
    s = 0.3 / 0.5
    assert t["scale"] == pytest.approx(s)
    (h, w), (ph, pw) = geo.calibrated_shape(img.shape[:2], 0.3)
    assert t["padded_shape"] == [ph, pw] and ph % 224 == 0 and pw % 224 == 0
    he = L.open_calibrated_image(d, L.load_calibration(d))
    assert he.shape == (ph, pw, 3) and he.dtype == np.uint8
    assert (he[h:, :] == 255).all() and (he[:, w:] == 255).all()  # white padding
    locs = pd.read_csv(d / "locs.tsv", sep="\t", index_col=0)
    np.testing.assert_allclose(locs[["x", "y"]].to_numpy(), xy * s, atol=1e-3)
    M = np.array(t["matrix_raw_to_calibrated"])
    back = np.linalg.solve(M, np.c_[locs[["x", "y"]].to_numpy(), np.ones(3)].T).T[:, :2]
    np.testing.assert_allclose(back, xy, atol=1e-3)
    x, y = locs.iloc[0]
    assert he[int(y), int(x)].mean() < 100  # the marker sits under its spot in the calibrated frame
    # the marker's edges land where the scale says (within a pixel of resampling blur)
    row = he[int(y), :, 0].astype(int)
    dark = np.flatnonzero(row < 140)
    assert abs(dark.min() - 400 * s) <= 1.5 and abs(dark.max() + 1 - 460 * s) <= 1.5
    assert float((d / "radius.txt").read_text()) == pytest.approx(27.5 / 0.3 * s)
    small = cv2.imread(str(d / "he-small.png"))
    assert small.shape[:2] == tuple(t["superpixel_grid"])
    assert (d / "manifests" / "image_calibration.json").is_file()


def test_superpixel_means_exact():
    a = np.arange(32 * 48 * 3, dtype=np.uint8).reshape(32, 48, 3)
    m = superpixel_means(a, rows_per_chunk=1)
    assert m.shape == (2, 3, 3)
    np.testing.assert_allclose(m[1, 2], np.round(a[16:32, 32:48].reshape(-1, 3).astype(float).mean(0)))


@pytest.mark.parametrize("kind", ["rgba", "grey", "png16", "tif16", "ome_chw", "float_tif"])
def test_odd_image_modes(tmp_path, kind):
    base = _marker_image(500, 520)
    xy = np.array([[430.0, 330.0], [100.0, 100.0], [300.0, 200.0]])
    d = write_raw_dir(tmp_path / kind, xy, pixel_size=0.5, image=base, image_name=None)
    if kind == "rgba":
        rgba = np.dstack([base[..., ::-1], np.full(base.shape[:2], 255, np.uint8)])
        rgba[:50, :50, 3] = 0  # transparent corner -> white
        cv2.imwrite(str(d / "he-raw.png"), rgba)
    elif kind == "grey":
        cv2.imwrite(str(d / "he-raw.png"), base.mean(axis=2).astype(np.uint8))
    elif kind == "png16":
        cv2.imwrite(str(d / "he-raw.png"), base[..., ::-1].astype(np.uint16) * 257)
    elif kind == "tif16":
        tifffile.imwrite(d / "he-raw.tif", base.astype(np.uint16) * 257)
    elif kind == "ome_chw":
        tifffile.imwrite(d / "he-raw.ome.tif", np.moveaxis(base, -1, 0), ome=True)
    elif kind == "float_tif":
        tifffile.imwrite(d / "he-raw.tif", base.astype(np.float32) / 255.0)
    calibrate(d)
    he = np.asarray(L.open_calibrated_image(d, L.load_calibration(d)))[:500, :520]
    if kind == "grey":
        assert np.abs(he.astype(int) - base.mean(axis=2, keepdims=True).astype(int)).max() <= 1
    else:
        assert np.abs(he.astype(int)[60:] - base.astype(int)[60:]).max() <= 1
    if kind == "rgba":
        assert (he[:50, :50] == 255).all()


@pytest.mark.parametrize("content,fragment", [
    ("0", "positive"), ("-0.3", "positive"), ("abc", "expected one number"), ("50", "plausible range"), ("", "expected one number")])
def test_bad_pixel_size(tmp_path, content, fragment):
    d = write_raw_dir(tmp_path / "d", np.array([[100.0, 100.0], [200, 100], [150, 200]]))
    (d / "pixel-size-raw.txt").write_text(content)
    before = snapshot(d)
    assert_user_error(run_script("image_calibration.py", d), "pixel-size-raw.txt", fragment)
    assert snapshot(d) == before


def test_bad_images(tmp_path):
    xy = np.array([[100.0, 100.0], [200, 100], [150, 200]])
    d = write_raw_dir(tmp_path / "missing", xy, image_name=None)
    assert_user_error(run_script("image_calibration.py", d), "he-raw", "not found")
    d = write_raw_dir(tmp_path / "empty", xy, image_name=None)
    (d / "he-raw.png").write_bytes(b"")
    assert_user_error(run_script("image_calibration.py", d), "he-raw.png", "empty")
    d = write_raw_dir(tmp_path / "text", xy, image_name=None)
    (d / "he-raw.png").write_text("not an image at all")
    assert_user_error(run_script("image_calibration.py", d), "he-raw.png", "cannot be decoded")
    d = write_raw_dir(tmp_path / "trunc", xy, image_name=None, image=None)
    ok, buf = cv2.imencode(".jpg", _marker_image())
    (d / "he-raw.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    assert_user_error(run_script("image_calibration.py", d), "he-raw.jpg", "truncated")
    d = write_raw_dir(tmp_path / "tiny", np.array([[10.0, 10.0], [20, 10], [15, 20]]), image=np.zeros((100, 100, 3), np.uint8))
    before = snapshot(d)
    assert_user_error(run_script("image_calibration.py", d), "he-raw.png", "smaller than one 224 px tile")
    assert snapshot(d) == before


def test_all_spots_outside_image(tmp_path):
    d = write_raw_dir(tmp_path / "d", np.array([[100.0, 100.0], [200, 100], [150, 200]]), image=_marker_image())
    pd.DataFrame({"spot": ["s0", "s1", "s2"], "x": [5000, 6000, 7000], "y": [5, 5, 5]}).to_csv(d / "locs-raw.tsv", sep="\t", index=False)
    assert_user_error(run_script("image_calibration.py", d), "locs-raw.tsv", "outside")


def test_rerun_is_idempotent(tmp_path):
    d = write_raw_dir(tmp_path / "d", np.array([[100.0, 100.0], [200, 100], [150, 200]]), image=_marker_image())
    calibrate(d)
    a = (d / "he.tif").read_bytes(), (d / "locs.tsv").read_text(), json.loads((d / "calibration.json").read_text())
    calibrate(d)
    b = (d / "he.tif").read_bytes(), (d / "locs.tsv").read_text(), json.loads((d / "calibration.json").read_text())
    assert a == b
    assert not list(d.glob(".trihrge-tmp*"))
