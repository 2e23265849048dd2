"""Histology_Extractor: artifact layout, super-pixel alignment of every backbone, determinism,
checkpoint loading (both formats) and the one-line errors. CPU only; ViTs are tiny and random."""
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_user_error, run_script, snapshot, write_raw_dir

from utils.core.cli import run
from utils.core.layout import FEATURES_DIR
from utils.histology.tile_features import lattice_weights, shift_offsets, tent_weights
from utils.stages.histology_extractor import extract_features, load_features
from utils.stages.image_calibration import calibrate

SP = 16
SQUARE = (slice(5, 8), slice(9, 13))   # super-pixel rows 5-7, cols 9-12
UNI_LIKE = {"init_values": 1e-5, "dynamic_img_size": True}
UNI2H_LIKE = {"patch_size": 14, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
              "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True}


def _calibrated(path, image):
    d = write_raw_dir(path, np.array([[100.0, 100.0], [300.0, 200.0]]), pixel_size=0.5, image=image)
    calibrate(d)
    return d


def _white(h=448, w=448):
    return np.full((h, w, 3), 255, np.uint8)


def _square(h=448, w=448, colour=(40, 20, 90)):
    img = _white(h, w)
    img[SQUARE[0].start * SP:SQUARE[0].stop * SP, SQUARE[1].start * SP:SQUARE[1].stop * SP] = colour
    return img


def _tissue(h=460, w=600, seed=0):
    """Pink background with purple 'nuclei' and a lighter 'lumen': enough texture for every channel."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (230, 170, 205), np.uint8)
    for _ in range(h * w // 500):
        y, x = rng.integers(0, h), rng.integers(0, w)
        cv2.circle(img, (int(x), int(y)), int(rng.integers(3, 8)), (70, 40, 150), -1)
    cv2.circle(img, (w // 2, h // 2), 40, (250, 245, 250), -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def _cli(argv, capsys):
    """Run Histology_Extractor.main in-process as the script would; returns (exit code, stderr)."""
    import logging

    import Histology_Extractor
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as e:
            run(Histology_Extractor.main, [str(a) for a in argv])
    finally:  # the script points logging at this test's captured stderr; give it back
        root.handlers[:] = handlers
        root.setLevel(level)
    return e.value.code, capsys.readouterr().err


def _tiny_state_dict(path, arch="vit_tiny_patch16_224", seed=1, **kwargs):
    import timm
    import torch
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    sd = m.state_dict()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return m


# ---------------------------------------------------------------------------------------------
# stain backbone

def test_stain_artifacts_layout_deterministic_and_band_independent(tmp_path):
    d = _calibrated(tmp_path / "t", _tissue())
    meta = extract_features(d, backbone="stain", band_rows=4, quiet=True)
    arrays, meta2 = load_features(d)
    assert meta == meta2
    R, C = json.loads((d / "calibration.json").read_text())["superpixel_grid"]
    assert meta["grid_shape"] == [R, C] and meta["dtype"] == "float16"
    for s in ("micro", "meso", "macro", "extra"):
        a = arrays[s]
        assert a.dtype == np.float16 and a.shape == (R, C, meta["dims"][s]) and np.isfinite(a).all()
    assert 20 <= meta["dims"]["micro"] <= 40 and 20 <= meta["dims"]["meso"] <= 40
    assert len(meta["channels"]["micro"]) == meta["dims"]["micro"]
    assert meta["scales"]["meso"]["context_um"] == 112.0 and meta["scales"]["macro"]["context_um"] == 448.0
    for k in ("backbone", "tile_px", "normalisation", "shifts", "wall_time_s", "tiles_per_second", "superpixels_per_second"):
        assert k in meta
    assert meta["token_given"] == "no"
    # extra: mean colour of he-small.png and the normalised position
    small = cv2.imread(str(d / "he-small.png"))[..., ::-1]
    np.testing.assert_allclose(arrays["extra"][..., :3], small / 255.0, atol=1e-3)
    assert arrays["extra"][3, 7, 3] == pytest.approx(3 / R, abs=1e-3) and arrays["extra"][3, 7, 4] == pytest.approx(7 / C, abs=1e-3)
    # every channel carries information on textured tissue
    micro = np.asarray(arrays["micro"], np.float32)
    assert (micro.reshape(-1, micro.shape[2]).std(axis=0) > 0).all()
    ch = meta["channels"]["micro"]
    assert micro[..., ch.index("nuclei_count")].sum() > 20
    assert (d / "manifests" / "Histology_Extractor.json").is_file()
    del arrays
    _assert_band_independent(d, "stain")


def _assert_band_independent(d, backbone):
    """Features made with 4-row bands (already in d) equal those made with 64-row bands byte for
    byte: halo + mirrored edges make bands invisible."""
    arrays, _ = load_features(d)
    first = {s: np.array(arrays[s]) for s in ("micro", "meso", "macro")}
    del arrays
    extract_features(d, backbone=backbone, band_rows=64, quiet=True)
    again, _ = load_features(d)
    for s in first:
        assert np.array_equal(first[s], again[s]), s


def test_stain_nuclei_channels_band_independent(tmp_path):
    d = _calibrated(tmp_path / "n", _tissue())
    meta = extract_features(d, backbone="stain-nuclei", band_rows=4, quiet=True)
    arrays, _ = load_features(d)
    ch = meta["channels"]["micro"]
    assert ch[-7:] == ["nucseg_count", "nucseg_area_100um2", "nucseg_eccentricity", "nucseg_extent", "nucseg_h_mean",
                       "nucseg_h_sd", "nucseg_clump_frac"]
    assert meta["dims"]["micro"] == len(ch) and meta["dims"]["meso"] == len(meta["channels"]["meso"])
    micro = np.asarray(arrays["micro"], np.float32)
    assert micro[..., ch.index("nucseg_count")].sum() > 10
    del arrays
    _assert_band_independent(d, "stain-nuclei")


def test_nucleus_morphology_of_drawn_nuclei():
    from utils.histology.nuclei_morphology import CHANNELS, morphology_band
    from utils.histology.stain_features import _blur
    H = np.zeros((8 * 7, 8 * 6), np.float32)   # 1 super-pixel row of core, 3 of halo either side, 6 columns
    cv2.circle(H, (4, 28), 3, 1.0, -1)          # a round nucleus in the core's first super-pixel
    cv2.ellipse(H, (20, 27), (6, 2), 0, 0, 360, 1.0, -1)   # an elongated one in the third
    cv2.rectangle(H, (33, 20), (47, 40), 1.0, -1)          # a clump (21 px tall) over the last two
    out = morphology_band(H, 0.5, spd=8, halo_sp=3, n_rows=1, blur=_blur)
    f = {c: out[0, :, k] for k, c in enumerate(CHANNELS)}
    assert f["nucseg_count"].tolist() == [1, 0, 1, 0, 0, 0]
    assert 0.2 < f["nucseg_area_100um2"][0] < 0.4 and f["nucseg_eccentricity"][0] < 0.4
    assert f["nucseg_eccentricity"][2] > 0.8 and 0.5 < f["nucseg_extent"][2] < 0.9
    assert f["nucseg_h_mean"][0] > 0.5 and f["nucseg_clump_frac"][5] > 0.8 and f["nucseg_clump_frac"][:4].max() == 0


def test_stain_square_lights_exactly_its_superpixels(tmp_path):
    d = _calibrated(tmp_path / "sq", _square())
    meta = extract_features(d, backbone="stain", quiet=True)
    arrays, _ = load_features(d)
    micro = np.asarray(arrays["micro"], np.float32)
    ch = meta["channels"]["micro"]
    inside = np.zeros(micro.shape[:2], bool)
    inside[SQUARE] = True
    for name in ("h_mean", "e_mean", "od_mean", "nuclear_frac"):
        lit = micro[..., ch.index(name)] > 1e-3
        assert np.array_equal(lit, inside), name
    assert (micro[..., ch.index("empty_frac")][inside] == 0).all() and (micro[..., ch.index("empty_frac")][~inside] == 1).all()
    # filters reach at most 2 super-pixels beyond the square; further away everything is background
    near = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    far = micro[~near]
    assert np.allclose(far, far[0], atol=1e-4)
    # context scales pool it: meso is highest over the square and falls off smoothly
    meso_h = np.asarray(arrays["meso"][..., ch.index("h_mean")], np.float32)
    assert np.unravel_index(meso_h.argmax(), meso_h.shape)[0] in (5, 6, 7)
    assert meso_h[6, 10] > meso_h[6, 20] > meso_h[6, 27] >= 0


# ---------------------------------------------------------------------------------------------
# ViT / CNN tile backbones

@pytest.mark.parametrize("kwargs,tile_px,prefix,shifts", [(UNI_LIKE, 224, 1, 4), (UNI2H_LIKE, 256, 9, 2)],
                         ids=["uni-like", "uni2h-like"])
def test_vit_tokens_land_on_their_superpixels(tmp_path, kwargs, tile_px, prefix, shifts):
    """Random tiny ViTs built like UNI / UNI2-h: the token of the dark square's super-pixels changes,
    the others barely do (layer scale 1e-5 keeps a token close to its own patch embedding)."""
    out = {}
    for name, img in (("white", _white(480, 700)), ("square", _square(480, 700))):
        d = _calibrated(tmp_path / name, img)
        meta = extract_features(d, backbone="timm:vit_tiny_patch16_224", random_init=True, timm_kwargs=kwargs,
                                shifts=shifts, quiet=True)
        out[name] = {s: np.asarray(a, np.float32) for s, a in load_features(d)[0].items()}
    assert meta["tile_px"] == tile_px and meta["superpixels_per_tile"] == tile_px // SP
    assert meta["num_prefix_tokens"] == prefix and meta["shifts"]["passes"] == shifts
    assert all(o % SP == 0 for off in meta["shifts"]["offsets_px"] for o in off)
    diff = np.linalg.norm(out["square"]["micro"] - out["white"]["micro"], axis=2)
    inside = np.zeros(diff.shape, bool)
    inside[SQUARE] = True
    assert diff[~inside].max() < 0.05 * diff[inside].min(), (diff[~inside].max(), diff[inside].min())
    assert out["square"]["micro"].shape[2] == 192 and out["square"]["meso"].shape[2] == 192


def test_checkpoint_formats_cli_tokens_match_direct_forward_and_no_token_written(tmp_path, capsys):
    import torch
    secret = "hf_TESTTOKEN_must_never_be_written_0123456789"
    model = _tiny_state_dict(tmp_path / "w.bin", **UNI_LIKE)
    _tiny_state_dict(tmp_path / "w.safetensors", **UNI_LIKE)
    img = _tissue(448, 448, seed=3)
    micro = {}
    for fmt in ("bin", "safetensors"):
        d = _calibrated(tmp_path / fmt, img)
        code, err = _cli(["--directory", d, "--backbone", "timm:vit_tiny_patch16_224", "--weights", tmp_path / f"w.{fmt}",
                          "--login", secret, "--shifts", "1", "--batch-size", "3"], capsys)
        assert code == 0, err
        assert secret not in err
        for p in d.rglob("*"):
            if p.is_file():
                assert secret.encode() not in p.read_bytes(), p
        arrays, meta = load_features(d)
        assert meta["token_given"] == "yes" and f"w.{fmt}" in meta["weights"]
        micro[fmt] = np.asarray(arrays["micro"], np.float32)
        man = json.loads((d / "manifests" / "Histology_Extractor.json").read_text())
        assert man["parameters"]["token_given"] == "yes"
    assert np.array_equal(micro["bin"], micro["safetensors"])
    # the tokens of tile (0, 1) are exactly the super-pixels rows 0-13, cols 14-27
    from utils.core import layout as L
    tile = np.asarray(L.open_calibrated_image(tmp_path / "bin", L.load_calibration(tmp_path / "bin"))[0:224, 224:448], np.float32) / 255.0
    x = torch.from_numpy((tile - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).float()
    with torch.inference_mode():
        tok = model.eval().forward_features(x.permute(2, 0, 1)[None])[0, 1:].reshape(14, 14, -1).numpy()
    np.testing.assert_allclose(micro["bin"][0:14, 14:28], tok, atol=2e-2, rtol=1e-2)


def test_cnn_backbone_and_smooth_context_scales(tmp_path):
    """A random ResNet-18: its final map resampled to one cell per super-pixel; its pooled summary
    depends strongly on content, so it shows how meso/macro are interpolated: peaked near the square,
    smooth, no constant 14 x 14 blocks."""
    out = {}
    for name, img in (("white", _white(448, 700)), ("square", _square(448, 700))):
        d = _calibrated(tmp_path / name, img)
        meta = extract_features(d, backbone="timm:resnet18", random_init=True, shifts=2, quiet=True,
                                timm_kwargs={"zero_init_last": False})  # else random blocks are identities
        out[name] = {s: np.asarray(a, np.float32) for s, a in load_features(d)[0].items()}
    assert meta["dims"]["micro"] == 512 and meta["tile_px"] == 224 and meta["num_prefix_tokens"] == 0
    assert out["square"]["micro"].shape[:2] == tuple(meta["grid_shape"])
    diff = {s: np.linalg.norm(out["square"][s] - out["white"][s], axis=2) for s in ("micro", "meso", "macro")}
    assert np.unravel_index(diff["micro"].argmax(), diff["micro"].shape) in {(r, c) for r in range(4, 9) for c in range(8, 14)}
    for s in ("meso", "macro"):
        d_ = diff[s]
        assert d_[6, 10] > 2 * d_[6, 50], s
        if s == "meso":
            assert d_[6, 10] > 2 * d_[6, 30] and d_[6, 10] > 2 * d_[25, 10]
        assert len(np.unique(d_[:14, :14].round(4))) > 20, s           # no constant tile blocks
        steps = np.abs(np.diff(d_, axis=1)).max()
        assert steps < 0.35 * d_.max(), s                               # no jumps at tile borders


# ---------------------------------------------------------------------------------------------
# errors: one line, exit code 2, nothing written

def test_bad_weights_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    d = _calibrated(tmp_path / "d", _white(300, 300))
    before = snapshot(d)
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    proc = run_script("Histology_Extractor.py", d, "--backbone", "uni", "--weights", junk, timeout=120)
    assert_user_error(proc, "pytorch_model.bin", "torch.load")
    junk_st = tmp_path / "model.safetensors"
    junk_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    code, err = _cli(["-d", d, "--backbone", "uni", "--weights", junk_st], capsys)
    assert code == 2 and err.count("error:") == 1 and "safetensors" in err and len(err.strip().splitlines()) == 1
    # a real checkpoint of another architecture (the tiny ViT) given as UNI
    _tiny_state_dict(tmp_path / "tiny.bin", **UNI_LIKE)
    code, err = _cli(["-d", d, "--backbone", "uni", "--weights", tmp_path / "tiny.bin"], capsys)
    assert code == 2 and "not a checkpoint of vit_large_patch16_224" in err and len(err.strip().splitlines()) == 1
    # a checkpoint without layer scale given where the architecture needs it (missing keys)
    _tiny_state_dict(tmp_path / "plain.safetensors")
    code, err = _cli(["-d", d, "--backbone", "timm:vit_tiny_patch16_224", "--weights", tmp_path / "plain.safetensors",
                      "--timm-kwargs", '{"init_values": 1e-5}'], capsys)
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    assert not (d / FEATURES_DIR).exists()
    assert snapshot(d) == before


def test_uni_without_weights_or_token_fails_fast(tmp_path):
    d = _calibrated(tmp_path / "d", _white(300, 300))
    before = snapshot(d)
    t0 = time.perf_counter()
    proc = run_script("Histology_Extractor.py", d, "--backbone", "uni",
                      env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}, timeout=60)
    elapsed = time.perf_counter() - t0
    assert_user_error(proc, "MahmoodLab/UNI", "--weights", "--login")
    assert elapsed < 10, elapsed
    assert snapshot(d) == before
    proc = run_script("Histology_Extractor.py", d, "--backbone", "uni2-h", "--weights", tmp_path / "nope.bin",
                      env={"HF_TOKEN": ""}, timeout=60)
    assert_user_error(proc, "nope.bin", "not found")


def test_a_token_without_a_network_fails_fast_and_is_never_printed(tmp_path):
    """huggingface_hub retried five times (24 s, 24 log lines) before its error; one connection
    attempt to the hub's host now says at once that it cannot be reached."""
    d = _calibrated(tmp_path / "d", _white(300, 300))
    t0 = time.perf_counter()
    proc = run_script("Histology_Extractor.py", d, "--login", "hf_FAKEtoken123",
                      env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
                           "HTTPS_PROXY": "", "ALL_PROXY": ""}, timeout=60)
    assert time.perf_counter() - t0 < 20
    assert_user_error(proc, "hub MahmoodLab/UNI: the hub cannot be reached (127.0.0.1")
    assert "hf_FAKEtoken123" not in proc.stdout + proc.stderr


def test_stain_rejects_weights_and_bad_options(tmp_path, capsys):
    d = _calibrated(tmp_path / "d", _white(300, 300))
    code, err = _cli(["-d", d, "--backbone", "stain", "--random-init"], capsys)
    assert code == 2 and "stain uses no weights" in err
    code, err = _cli(["-d", d, "--backbone", "vgg"], capsys)
    assert code == 2 and "unknown backbone" in err
    code, err = _cli(["-d", d, "--backbone", "timm:not_a_model_xyz", "--weights", __file__], capsys)
    assert code == 2 and "timm has no architecture" in err
    code, err = _cli(["-d", d, "--backbone", "timm:resnet18"], capsys)
    assert code == 2 and "--weights" in err
    code, err = _cli(["-d", d, "--backbone", ""], capsys)          # was: the stain backbone, silently
    assert code == 2 and "--backbone '': unknown backbone" in err
    code, err = _cli(["-d", d, "--timm-kwargs", '{"init_values": 1e-5}'], capsys)   # was: run, and recorded
    assert code == 2 and "the stain backbone has no network" in err


TINY = ["--backbone", "timm:vit_tiny_patch16_224", "--device", "cpu", "--shifts", "1", "--batch-size", "8"]


@pytest.mark.parametrize("kwargs, fragment", [
    ('{"patch_size": 0}', "ZeroDivisionError"), ('{"embed_dim": 7}', "AssertionError"),
    ('{"in_chans": 1}', "the network fails on a tile (RuntimeError"), ('{"init_values": "x"}', "TypeError"),
    ('{"init_values": NaN}', "NaN is not a number")])
def test_timm_kwargs_timm_cannot_use_are_one_line(tmp_path, capsys, kwargs, fragment):
    """timm reports bad settings as many exception types (and torch over several lines): tracebacks."""
    d = _calibrated(tmp_path / "d", _white(300, 300))
    code, err = _cli(["-d", d, *TINY, "--random-init", "--timm-kwargs", kwargs], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (d / FEATURES_DIR).exists()


def test_damaged_or_unusual_checkpoints(tmp_path, capsys):
    """NaN weights and integer tensors are refused by name; a safetensors file in capitals or under
    another suffix, and a state dict with a non-tensor entry, load; a folder is named as one."""
    import torch
    from safetensors.torch import save_file

    from utils.histology.backbones import load_state_dict
    d = _calibrated(tmp_path / "d", _white(300, 300))
    sd = _tiny_state_dict(tmp_path / "w.bin").state_dict()
    bad = dict(sd, **{"patch_embed.proj.weight": torch.full_like(sd["patch_embed.proj.weight"], float("nan"))})
    torch.save(bad, tmp_path / "nan.bin")
    save_file(dict(sd, cls_token=sd["cls_token"].long()), str(tmp_path / "int.safetensors"))
    for weights, fragment in (("nan.bin", "tensor patch_embed.proj.weight holds NaN"),
                              ("int.safetensors", "1 tensors not of a float type (e.g. cls_token torch.int64)")):
        code, err = _cli(["-d", d, *TINY, "--weights", tmp_path / weights], capsys)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "folder").mkdir()
    code, err = _cli(["-d", d, *TINY, "--weights", tmp_path / "folder"], capsys)
    assert code == 2 and "is a directory" in err
    save_file(sd, str(tmp_path / "UPPER.SAFETENSORS"))
    save_file(sd, str(tmp_path / "named.bin"))
    torch.save(dict(sd, version=1), tmp_path / "versioned.bin")
    for name in ("UPPER.SAFETENSORS", "named.bin", "versioned.bin"):
        got = load_state_dict(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------
# geometry helpers

def test_shift_offsets_and_lattice_interpolation():
    assert shift_offsets(1, 14) == [(0, 0)] and shift_offsets(2, 14) == [(0, 0), (7, 7)]
    assert shift_offsets(4, 14) == [(0, 0), (0, 7), (7, 0), (7, 7)] and shift_offsets(3, 16) == [(0, 0), (5, 5), (11, 11)]
    w = tent_weights(14)
    assert w.min() > 0 and w[0] == w[-1] and w[6] == w[7] == w.max() and np.allclose(w + np.roll(w, 7), w[0] + w[7])
    # centres at 7, 21, 35 (super-pixel units): a super-pixel whose centre is a lattice centre gets
    # that sample exactly; halfway between, the mean; beyond the ends, the end value
    j0, j1, w = lattice_weights(42, 3, 14, 7.0)
    vals = np.array([0.0, 14.0, 28.0])
    interp = vals[j0] * (1 - w) + vals[j1] * w
    centres = np.arange(42) + 0.5
    np.testing.assert_allclose(interp, np.clip(centres - 7.0, 0, 28), atol=1e-6)
