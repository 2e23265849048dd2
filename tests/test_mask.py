"""masking_non_tissue.py: the tissue mask on the super-pixel grid."""
import importlib.util
import json

import cv2
import numpy as np
import pytest
from conftest import REPO, assert_user_error, run_script, write_raw_dir

from utils.core import geometry as geo
from utils.core.errors import InputError
from utils.core.image_io import read_png
from utils.core.layout import load_calibrated_spots, load_mask
from utils.histology.tissue_mask import spots_inside, superpixel_texture
from utils.stages.image_calibration import calibrate
from utils.stages.masking_non_tissue import mask_tissue

SP = geo.SUPER_PIXEL_PX


def _glass(h, w, rng, colour=(242, 238, 241)):
    img = np.empty((h, w, 3), np.float32)
    img[:] = colour
    img += rng.normal(0, 1.0, (h, w, 1))
    return img


def _tissue_texture(h, w, rng):
    """Pink stroma with purple nuclei-like dots (textured at the 0.5 um/px scale)."""
    base = np.empty((h, w, 3), np.float32)
    base[:] = (215, 150, 200)
    nuclei = cv2.GaussianBlur((rng.random((h, w)) < 0.02).astype(np.float32), (0, 0), 2.0) * 25
    fibres = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5) * 30
    base -= np.clip(nuclei, 0, 1)[..., None] * np.array([140, 120, 60], np.float32)
    base += fibres[..., None]
    return base


def _synthetic(h=720, w=800, seed=0, blob_scale=1.0, extras=True):
    """A textured tissue ellipse on glass. Returns (image uint8, tissue truth per raw pixel, hole mask).
    Extras: a fat hole inside the tissue (glass-coloured, should be filled), a small textured speck (removed),
    a smooth dark smudge and a faint printed dot array (both background)."""
    rng = np.random.default_rng(seed)
    img = _glass(h, w, rng)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, ry, rx = h * 0.5, w * 0.45, h * 0.33 * blob_scale, w * 0.3 * blob_scale
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    tex = _tissue_texture(h, w, rng)
    img[blob] = tex[blob]
    hole = (yy - cy) ** 2 + (xx - cx - 40) ** 2 <= 60 ** 2  # a fat lobule / lumen 60 um across
    if extras:
        img[hole] = _glass(h, w, rng)[hole]
        # faint printed array dots on the glass (smooth, OD ~0.02)
        dots = ((yy % 200 - 100) ** 2 + (xx % 200 - 100) ** 2 <= 45 ** 2) & ~blob
        img[dots] -= np.array([8, 9, 6], np.float32)
        # a small textured speck of debris (well below the minimum region)
        sy, sx = int(h * 0.08), int(w * 0.9)
        img[sy:sy + 48, sx:sx + 48] = tex[sy:sy + 48, sx:sx + 48]
        # an out-of-focus smudge: dark but smooth
        smudge = np.exp(-(((yy - h * 0.88) ** 2 + (xx - w * 0.12) ** 2) / (2 * 35.0 ** 2)))
        img -= smudge[..., None] * np.array([60, 70, 60], np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), blob, hole


def _spots_on(blob, n=12, inside=True, seed=1):
    rng = np.random.default_rng(seed)
    ys, xs = np.nonzero(blob if inside else ~blob)
    pick = rng.choice(len(ys), n, replace=False)
    return np.c_[xs[pick] + 0.5, ys[pick] + 0.5]


def _truth_on_grid(blob, grid):
    """Tissue truth per super-pixel: more than half of its pixels in the blob (padding is background)."""
    H, W = grid
    full = np.zeros((H * SP, W * SP), bool)
    full[:blob.shape[0], :blob.shape[1]] = blob
    return full.reshape(H, SP, W, SP).mean(axis=(1, 3)) > 0.5


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def _make(tmp_path, name, image, spots_xy):
    # pixel size 0.5 um/px: the calibrated frame equals the raw one
    d = write_raw_dir(tmp_path / name, spots_xy, pixel_size=0.5, image=image, n_genes=5)
    calibrate(d)
    return d


def test_texture_is_the_superpixel_std():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    t = superpixel_texture(a, max_band_bytes=1)  # one super-pixel row per band
    grey = np.round(a.astype(np.float64).mean(axis=2))
    np.testing.assert_allclose(t[2, 3], grey[32:48, 48:64].std(), rtol=1e-4)
    np.testing.assert_allclose(t, superpixel_texture(a), rtol=1e-5)
    assert t.shape == (3, 4)


def test_blob_mask_matches_and_writes_artifacts(tmp_path):
    img, blob, hole = _synthetic()
    d = _make(tmp_path, "blob", img, _spots_on(blob))
    proc = run_script("masking_non_tissue.py", d)
    assert proc.returncode == 0, proc.stderr
    cal = json.loads((d / "calibration.json").read_text())
    grid = tuple(cal["superpixel_grid"])
    mask = load_mask(d)
    assert mask.dtype == bool and mask.shape == grid
    truth = _truth_on_grid(blob, grid)
    assert _iou(mask, truth) > 0.9, _iou(mask, truth)
    # the fat hole inside the tissue is filled
    hr, hc = np.nonzero(_truth_on_grid(hole, grid))
    assert mask[hr, hc].all()
    # the padding, the speck, the smudge and the printed dots are background
    h, w = cal["scaled_shape"]
    assert not mask[-(-h // SP):, :].any() and not mask[:, -(-w // SP):].any()
    assert not mask[: int(0.08 * 720) // SP + 3, int(0.85 * 800) // SP:].any()
    assert not mask[int(0.78 * 720) // SP:, : int(0.25 * 800) // SP].any()
    assert mask.sum() <= truth.sum() * 1.1
    png = read_png(d / "mask.png", grey=True)
    assert set(np.unique(png)) <= {0, 255}
    info = json.loads((d / "mask.json").read_text())
    assert info["fraction_spots_inside"] == 1.0 and info["spots_inside"] == 12
    n_image = round(h / SP) * round(w / SP)  # the fraction is of the image without its padding
    assert info["tissue_fraction"] == pytest.approx(mask.sum() / n_image, rel=1e-3)
    assert info["tissue_area_mm2"] == pytest.approx(mask.sum() * 64e-6, abs=1e-4)
    assert 0 < info["threshold"] < 1 and info["texture_used"]
    ov = read_png(d / "mask-overlay.png")
    k = ov.shape[0] // grid[0]
    assert ov.shape[:2] == (k * grid[0], k * grid[1]) and 1 <= k <= 8
    assert (d / "manifests" / "masking_non_tissue.json").is_file()


def test_options_change_the_mask(tmp_path):
    img, blob, hole = _synthetic(seed=3)
    d = _make(tmp_path, "opts", img, _spots_on(blob))
    base = mask_tissue(d)
    nofill = mask_tissue(d, fill_holes_um2=0)
    assert nofill["tissue_superpixels"] < base["tissue_superpixels"]  # the fat hole stays open
    keep_all = mask_tissue(d, min_region_um2=0)
    assert keep_all["regions"] > base["regions"]  # the speck survives
    fixed = mask_tissue(d, threshold=0.05)
    assert fixed["threshold"] == 0.05 and fixed["threshold_source"] == "--threshold"
    # an impossible threshold leaves no tissue: one line, exit 2
    proc = run_script("masking_non_tissue.py", d, "--threshold", "2.5")
    assert_user_error(proc, "no tissue", "--threshold")
    proc = run_script("masking_non_tissue.py", d, "--threshold", "-1")
    assert_user_error(proc, "--threshold")
    proc = run_script("masking_non_tissue.py", d, "--min-region-um2", "-5")
    assert_user_error(proc, "--min-region-um2")


def test_all_white_image_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    img = np.clip(_glass(500, 520, rng, colour=(250, 250, 250)), 0, 255).astype(np.uint8)
    d = _make(tmp_path, "white", img, [[100, 100], [300, 200]])
    proc = run_script("masking_non_tissue.py", d)
    assert_user_error(proc, "no tissue")
    assert not (d / "mask.png").exists()


def test_spots_all_outside_the_tissue_is_an_error(tmp_path):
    img, blob, _ = _synthetic(seed=1)
    far = blob.copy()
    far = cv2.dilate(far.astype(np.uint8), np.ones((61, 61), np.uint8)).astype(bool)  # stay clear of the edge
    d = _make(tmp_path, "outside", img, _spots_on(far, inside=False))
    proc = run_script("masking_non_tissue.py", d)
    assert_user_error(proc, "none of the", "spot")
    assert not (d / "mask.png").exists()


def test_few_spots_inside_warns(tmp_path):
    img, blob, _ = _synthetic(seed=2)
    far = cv2.dilate(blob.astype(np.uint8), np.ones((61, 61), np.uint8)) == 0
    far[:, 700:] = False  # not in the padding either
    xy = np.r_[_spots_on(blob, n=4), _spots_on(far, n=8)]
    d = _make(tmp_path, "few", img, xy)
    proc = run_script("masking_non_tissue.py", d)
    assert proc.returncode == 0, proc.stderr
    assert "4 of 12 spot centres (33.3%)" in proc.stderr and "WARNING" in proc.stderr
    info = json.loads((d / "mask.json").read_text())
    assert info["fraction_spots_inside"] == pytest.approx(4 / 12, abs=1e-4)
    locs, _ = load_calibrated_spots(d)
    assert spots_inside(load_mask(d), locs).sum() == 4


@pytest.mark.parametrize("case", ["inverted", "underexposed", "overexposed", "black_fill", "little_glass",
                                  "tinted_glass"])
def test_robust_to_failure_modes(tmp_path, case, caplog):
    img, blob, _ = _synthetic(seed=4, blob_scale=1.75 if case == "little_glass" else 1.0, extras=False)
    if case == "little_glass":
        frame = np.zeros_like(blob)
        frame[20:-20, 20:-20] = True
        blob = blob & frame
        rng = np.random.default_rng(9)
        img[~blob] = np.clip(_glass(*blob.shape, rng), 0, 255).astype(np.uint8)[~blob]
        assert blob.mean() > 0.8
    elif case == "inverted":
        img = 255 - img
    elif case == "underexposed":
        img = (img.astype(np.float32) * 0.55).astype(np.uint8)
    elif case == "overexposed":  # pale tissue on saturated glass
        img = np.clip(img.astype(np.float32) * 0.45 + 150, 0, 255).astype(np.uint8)
    elif case == "tinted_glass":  # pink haze over the glass
        img = np.clip(img.astype(np.float32) * np.array([0.98, 0.88, 0.96]), 0, 255).astype(np.uint8)
    elif case == "black_fill":  # scanner left a band unscanned (black)
        img[:, -120:] = 0
    d = _make(tmp_path, case, img, _spots_on(blob))
    caplog.set_level("INFO", logger="trihrge")
    mask_tissue(d)
    grid = tuple(json.loads((d / "calibration.json").read_text())["superpixel_grid"])
    mask = load_mask(d)
    truth = _truth_on_grid(blob, grid)
    assert _iou(mask, truth) > 0.85, (case, _iou(mask, truth))
    info = json.loads((d / "mask.json").read_text())
    assert info["fraction_spots_inside"] == 1.0
    if case == "inverted":
        assert "inverted" in caplog.text and info["background"].startswith("dark")
    if case == "black_fill":
        assert not mask[:, (800 - 120) // SP + 1:].any()


def test_missing_upstream_and_missing_mask(tmp_path):
    img, blob, _ = _synthetic(seed=5, extras=False)
    d = write_raw_dir(tmp_path / "raw", _spots_on(blob), pixel_size=0.5, image=img, n_genes=5)
    proc = run_script("masking_non_tissue.py", d)
    assert_user_error(proc, "image_calibration.py")
    with pytest.raises(InputError, match="masking_non_tissue.py"):
        load_mask(d)


def test_her2st_c2_mask(her2st_c2):
    d = her2st_c2
    calibrate(d)
    info = mask_tissue(d)
    mask = load_mask(d)
    assert info["fraction_spots_inside"] > 0.9
    assert 0.08 < info["tissue_fraction"] < 0.35
    H, W = mask.shape
    for r, c in [(5, 5), (5, W - 60), (H - 60, 5), (H - 60, W - 60)]:  # image corners (inside the padding margin)
        assert not mask[r:r + 20, c:c + 20].any()
    assert info["regions"] <= 3


@pytest.mark.skipif(importlib.util.find_spec("utils.simulate") is None, reason="utils/simulate.py not present yet")
def test_simulated_tissue_matches_truth(tmp_path):
    import subprocess
    import sys
    d = tmp_path / "sim"
    subprocess.run([sys.executable, "-m", "utils.simulate", "--directory", str(d), "--size", "small", "--seed", "0"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    calibrate(d)
    mask_tissue(d)
    mask = load_mask(d)
    truth = read_png(d / "truth" / "mask.png", grey=True) > 127
    assert truth.shape == mask.shape
    assert _iou(mask, truth) > 0.85, _iou(mask, truth)
