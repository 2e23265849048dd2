"""The fifth robustness probe's fixes (docs/ROBUSTNESS.md rows 158 on), one test each."""
import argparse
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO


def _python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ctrl_c_while_a_script_imports_is_one_line():
    # a KeyboardInterrupt raised at import time, as a Ctrl-C during `import torch` would be
    proc = _python("import utils.core.cli\nraise KeyboardInterrupt")
    assert proc.stderr.strip().splitlines() == ["interrupted while starting: nothing was changed; rerun the same command"]
    assert proc.returncode != 0
    other = _python("import utils.core.cli\nraise ValueError('boom')")  # other errors keep their traceback
    assert "Traceback" in other.stderr and "ValueError: boom" in other.stderr


def test_histex_imports_torch_only_inside_run():
    proc = _python("import sys, HISTEX\nprint('torch' in sys.modules)")
    assert proc.stdout.strip() == "False", proc.stderr


def test_a_folder_the_stage_made_is_removed_when_the_run_fails(tmp_path):
    from utils.core.errors import InputError
    from utils.core.stage import Stage
    target = tmp_path / "new" / "section"
    with pytest.raises(InputError, match="the disk is full"):
        with Stage("convert", target, manifest=False, create=True) as st:
            st.out.write_text(target / "a.txt", "x")
            raise OSError(errno.ENOSPC, "No space left on device")   # a full disk, as a converter meets it
    assert not (tmp_path / "new").exists()
    with Stage("convert", target, manifest=False, create=True) as st:
        st.out.write_text(target / "a.txt", "x")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]   # a success keeps it, lock file gone


# --- H&E images: read by content, a TIFF's largest image, its colour tags, float ranges --------------

def _rgb(h=48, w=64):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_a_tiff_whose_first_image_is_a_thumbnail_is_read_at_full_resolution(tmp_path):
    import tifffile

    from utils.core.image_io import read_rgb
    full = _rgb(120, 160)
    with tifffile.TiffWriter(tmp_path / "scan.tif") as tw:
        tw.write(full[::8, ::8], photometric="rgb", subfiletype=1)   # a reduced-resolution thumbnail first
        tw.write(full, photometric="rgb")
    np.testing.assert_array_equal(read_rgb(tmp_path / "scan.tif"), full)


def test_tiff_colours_follow_photometric_and_extra_samples(tmp_path):
    import tifffile

    from utils.core.image_io import read_rgb
    rgb = _rgb()
    grey = rgb[..., 0]
    cases = {}
    palette = np.zeros((3, 256), np.uint16)
    palette[:, :] = np.arange(256)[::-1] * 257   # index i shows as grey 255 - i
    cases["palette"] = (dict(data=grey, photometric="palette", colormap=palette), np.repeat(255 - grey[..., None], 3, 2))
    cases["miniswhite"] = (dict(data=grey, photometric="miniswhite"), np.repeat(255 - grey[..., None], 3, 2))
    cmyk = np.concatenate([255 - rgb, np.zeros_like(grey)[..., None]], axis=2)   # K = 0: the colour is 255 - CMY
    cases["cmyk"] = (dict(data=cmyk, photometric="separated"), rgb)
    rgbx = np.concatenate([rgb, np.zeros_like(grey)[..., None]], axis=2)   # an unspecified 4th sample, all 0
    cases["unspecified"] = (dict(data=rgbx, photometric="rgb", extrasamples=["unspecified"]), rgb)
    alpha = np.full_like(grey, 128)
    premultiplied = np.concatenate([np.round(rgb * (128 / 255)).astype(np.uint8), alpha[..., None]], axis=2)
    white = np.round(rgb * (128 / 255) + 255 * (1 - 128 / 255))
    cases["associated"] = (dict(data=premultiplied, photometric="rgb", extrasamples=["assocalpha"]), white)
    for name, (kw, expected) in cases.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", **kw)
        got = read_rgb(tmp_path / f"{name}.tif").astype(int)
        assert np.abs(got - expected).max() <= 1, name


@pytest.mark.parametrize("case", ["overshoot", "inf", "nan"])
def test_float_images_scale_from_their_finite_values(tmp_path, case):
    import tifffile

    from utils.core.image_io import read_rgb
    rgb = _rgb()
    f = rgb.astype(np.float32) / 255
    if case == "overshoot":
        f[0, 0] = 1.02   # resampling leaves values a little above 1
    f[1, 1] = {"overshoot": f[1, 1], "inf": np.inf, "nan": np.nan}[case]
    tifffile.imwrite(tmp_path / "f.tif", f, photometric="rgb")
    got = read_rgb(tmp_path / "f.tif").astype(int)
    assert np.abs(got - rgb)[2:].max() <= 1
    if case != "overshoot":
        assert (got[1, 1] == 255).all()   # read as glass, not as dense tissue


def test_images_are_read_by_content_whatever_their_name(tmp_path):
    from PIL import Image

    from utils.convert.he_image import image_target_name
    from utils.core.image_io import read_rgb
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "png.png")
    (tmp_path / "png.png").rename(tmp_path / "scan.jpg")
    np.testing.assert_array_equal(read_rgb(tmp_path / "scan.jpg"), rgb)
    Image.fromarray(rgb).save(tmp_path / "j.jpg", quality=95)
    (tmp_path / "j.jpg").rename(tmp_path / "scan.tif")
    assert read_rgb(tmp_path / "scan.tif").shape == rgb.shape
    assert image_target_name(tmp_path / "scan.jpg") == "he-raw.png"
    assert image_target_name(tmp_path / "scan.tif") == "he-raw.jpg"


def test_png_artifacts_in_a_folder_whose_name_is_not_utf8(tmp_path):
    from utils.core.image_io import read_png, write_png
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/lat\xe9in"))   # OpenCV's own file functions crashed here
    folder.mkdir()
    rgb = _rgb()
    write_png(folder / "a.png", rgb)
    np.testing.assert_array_equal(read_png(folder / "a.png"), rgb)


def test_a_misnamed_image_is_named_in_the_message(tmp_path):
    from utils.core.errors import InputError
    from utils.core.raw_io import IMAGE_NAMES, find_one
    (tmp_path / "he-raw.TIF").write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="he-raw.TIF is there: rename it"):
        find_one(tmp_path, IMAGE_NAMES, "H&E image")


def test_a_tiff_too_large_for_memory_is_refused_before_reading(tmp_path, monkeypatch):
    import tifffile

    from utils.core import image_io
    from utils.core.errors import InputError
    tifffile.imwrite(tmp_path / "big.tif", _rgb(), photometric="rgb")
    monkeypatch.setattr(image_io, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match="needs about .* of memory"):
        image_io.read_rgb(tmp_path / "big.tif")


def test_a_directory_where_an_output_file_goes_is_refused_before_anything_is_committed(raw, tmp_path):
    import shutil

    from conftest import assert_user_error, run_script, snapshot
    d = tmp_path / "d"
    shutil.copytree(raw, d)
    (d / "radius.txt" / "keep").mkdir(parents=True)
    before = snapshot(d)
    assert_user_error(run_script("image_calibration.py", d), "radius.txt: is a directory", "remove or rename")
    assert snapshot(d) == before   # he.tif, locs.tsv, manifests/ were committed before the failing rename


def test_long_gene_and_gene_set_names_give_short_file_names():
    from utils.analysis.genesets import parse_gene_set
    from utils.superres.outputs import map_file_names
    names = map_file_names(["A" * 300, "基因" * 90, "A" * 299 + "B", "CD3E"])
    assert len(set(names.values())) == 4 and names["CD3E"] == "CD3E.png"
    assert max(len(v.encode()) for v in names.values()) < 255   # Errno 36 after training, before
    with pytest.raises(argparse.ArgumentTypeError, match="at most 100"):
        parse_gene_set("S" * 260 + "=CD3E,CD4")


def test_the_maps_h5ad_holds_no_creation_time(tmp_path):
    import time

    from utils.superres.outputs import h5ad_x_memmap
    for name in ("a.h5ad", "b.h5ad"):
        m = h5ad_x_memmap(tmp_path / name, (10, 4))
        m[:] = 1.5
        m.flush()
        del m
        time.sleep(1.1)   # HDF5 stores times in seconds
    assert (tmp_path / "a.h5ad").read_bytes() == (tmp_path / "b.h5ad").read_bytes()


def test_a_batch_size_above_the_spot_count_is_said(demo_upstream, tmp_path):
    from conftest import copy_demo, run_script
    from test_robustness import FAST
    d = copy_demo(demo_upstream, tmp_path / "d")   # HISTEX writes its manifest into DIR: not the shared fixture
    p = run_script("HISTEX.py", d, "--batch-size", "100000", "--epochs", "1", "--out", tmp_path / "run", *FAST[2:])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--batch-size 100000 is not below the" in p.stderr


def test_a_disk_too_small_for_the_maps_is_said_before_training(demo_upstream, tmp_path, monkeypatch):
    import shutil

    from utils.core.errors import InputError
    from utils.stages import histex
    from utils.superres.config import HistexConfig
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=4096))
    monkeypatch.setattr(histex, "trained_states", lambda *a, **k: pytest.fail("trained on a full disk"))
    config = HistexConfig.from_options({"epochs": 1, "n_states": 2, "threads": 1, "out": tmp_path / "run"})
    with pytest.raises(InputError, match="the super-resolution maps needs about"):
        histex.run_histex(demo_upstream, config, progress=False)


# --- files rewritten by scanpy / pandas ----------------------------------------------------------------

def _grid_adata(rows, cols, X=None):
    import anndata
    import pandas as pd
    X = np.ones((len(rows), 3), np.float32) if X is None else X
    return anndata.AnnData(X=X, obs=pd.DataFrame({"row": rows, "col": cols}, index=[str(i) for i in range(len(rows))]))


def test_grid_positions_as_float_or_category_are_read_and_shared_ones_refused(tmp_path):
    import pandas as pd

    from utils.core.errors import InputError
    from utils.core.h5ad_io import check_grid_positions
    ad = _grid_adata([0.0, 1.0, 2.0], [5.0, 5.0, 5.0])
    ad.obs["col"] = ad.obs["col"].astype("category")
    check_grid_positions(ad, tmp_path / "x.h5ad", "fix")
    assert ad.obs["row"].dtype == np.int64 and ad.obs["col"].dtype == np.int64 and ad.obs["row"].max() == 2
    twice = _grid_adata([0, 1, 1], [5, 6, 6])   # two sections concatenated
    with pytest.raises(InputError, match="1 observation.* on a super-pixel that already has one"):
        check_grid_positions(twice, tmp_path / "x.h5ad", "fix")
    assert pd.api.types.is_integer_dtype(twice.obs["row"])


def test_a_log_transformed_x_is_refused_and_a_sparse_x_analysed():
    from scipy import sparse

    from utils.analysis.preprocess import normalise_log
    from utils.core.errors import InputError
    from utils.core.h5ad_io import check_counts
    ad = _grid_adata([0, 1], [0, 0], X=np.array([[1.0, 3.0], [2.0, 2.0]], np.float32))
    ad.layers["counts"] = ad.X.copy()
    ad.uns["log1p"] = {"base": None}   # what sc.pp.log1p leaves
    with pytest.raises(InputError, match=r"X holds log-transformed values.*layers\['counts'\] back into X"):
        check_counts(ad, "run/super-res.h5ad")
    dense = _grid_adata([0, 1], [0, 0], X=np.array([[1.0, 3.0], [2.0, 2.0]], np.float32))
    rewritten = _grid_adata([0, 1], [0, 0], X=sparse.csr_matrix(dense.X))
    normalise_log(dense)
    normalise_log(rewritten)
    np.testing.assert_allclose(rewritten.X, dense.X)


def test_the_mask_counts_only_the_spots_on_the_image(demo_upstream, tmp_path):
    import json

    from conftest import copy_demo, run_script
    d = copy_demo(demo_upstream, tmp_path / "d")
    locs = (d / "locs.tsv").read_text().rstrip("\n").splitlines()
    n = len(locs) - 1
    (d / "locs.tsv").write_text("\n".join([*locs, "far\t999999.0\t999999.0"]) + "\n")   # as a cropped image leaves
    p = run_script("masking_non_tissue.py", d, "--force")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((d / "mask.json").read_text())["n_spots"] == n
    assert f"1 of {n + 1} spot centres lie outside the image" in p.stderr


def test_analysis_of_two_sections_concatenated_says_so(demo_upstream, tmp_path):
    import anndata
    from conftest import copy_demo, run_script
    d = copy_demo(demo_upstream, tmp_path / "d")   # HISTEX writes its manifest into DIR: not the shared fixture
    run = tmp_path / "run"
    p = run_script("HISTEX.py", d, "--model", "interp", "--out", run, "-q")
    assert p.returncode == 0, p.stderr[-2000:]
    ad = anndata.read_h5ad(run / "super-res.h5ad")
    two = anndata.concat({"s1": ad, "s2": ad}, label="library_id", index_unique="-", uns_merge="unique")
    two.uns["spatial"] = {"s1": ad.uns["spatial"][next(iter(ad.uns["spatial"]))], "s2": {}}
    two.write_h5ad(run / "super-res.h5ad")
    p = subprocess.run([sys.executable, "-m", "utils.analysis", str(run), "--directory", str(d)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "holds 2 sections (s1, s2 in uns['spatial']: concatenated?)" in p.stderr, p.stderr
