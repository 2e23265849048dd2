import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, hex_lattice, run_script, snapshot, square_lattice, write_raw_dir
from scipy.spatial import cKDTree

from utils.spots.lattice import describe_lattice, hr_pseudo_spots
from utils.stages.get_hr import build_hr
from utils.stages.image_calibration import calibrate


@pytest.mark.parametrize("angle", [0.0, 17.0, 30.0])
def test_hexagonal_lattice_and_half_spacing(angle):
    xy = hex_lattice(8, 7, 200.0, angle, origin=(1000, 1000))
    lat = describe_lattice(xy)
    assert lat["kind"] == "hexagonal"
    assert lat["spacing_px"] == pytest.approx(200.0, rel=1e-6)
    hr, sources = hr_pseudo_spots(xy, lat)
    assert all(len(s) == 2 for s in sources)
    allp = np.concatenate([xy, hr])
    d, _ = cKDTree(allp).query(allp, k=2)
    np.testing.assert_allclose(d[:, 1], 100.0, rtol=1e-6)  # a hexagonal lattice at half spacing
    # every pseudo-spot is the midpoint of two measured neighbours
    for p, s in zip(hr, sources):
        np.testing.assert_allclose(p, xy[s].mean(0))
        assert np.linalg.norm(xy[s[0]] - xy[s[1]]) == pytest.approx(200.0)


@pytest.mark.parametrize("angle", [0.0, 25.0])
def test_square_lattice_and_half_spacing(angle):
    xy = square_lattice(6, 5, 300.0, angle, origin=(2000, 500))
    lat = describe_lattice(xy)
    assert lat["kind"] == "square"
    hr, sources = hr_pseudo_spots(xy, lat)
    n_edges = 5 * 5 + 6 * 4
    n_cells = 5 * 4
    assert len(hr) == n_edges + n_cells
    allp = np.concatenate([xy, hr])
    d, _ = cKDTree(allp).query(allp, k=2)
    np.testing.assert_allclose(d[:, 1], 150.0, rtol=1e-6)  # the 2x upsampled square grid
    assert len(np.unique(np.round(allp, 3), axis=0)) == len(allp)


def test_irregular_layout():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2000, size=(80, 2))
    lat = describe_lattice(xy)
    assert lat["kind"] == "irregular"
    hr, sources = hr_pseudo_spots(xy, lat)
    assert len(hr) > len(xy)


def _make(tmp_path, name="d", counts_name="cnts.tsv", **kw):
    xy = hex_lattice(7, 6, 100.0 / 0.4, 0.0, origin=(300, 300))  # 100 um Visium lattice at 0.4 um/px
    return write_raw_dir(tmp_path / name, xy, pixel_size=0.4, counts_name=counts_name, **kw), xy


@pytest.mark.parametrize("counts_name", ["cnts.tsv.gz", "cnts.csv", "cnts.h5ad"])
def test_counts_formats_agree(tmp_path, counts_name):
    ref, _ = _make(tmp_path, "ref")
    calibrate(ref)
    build_hr(ref, n_genes=10)
    other, _ = _make(tmp_path, "other", counts_name=counts_name)
    calibrate(other)
    build_hr(other, n_genes=10)
    a = anndata.read_h5ad(ref / "spots.h5ad")
    b = anndata.read_h5ad(other / "spots.h5ad")
    np.testing.assert_array_equal(a.X, b.X)
    assert list(a.var_names) == list(b.var_names)


def test_outputs_open_in_anndata_and_scaling(tmp_path):
    d, xy = _make(tmp_path, n_genes=30)
    calibrate(d)
    r = run_script("get_HR.py", d, "--n-genes", 12)
    assert r.returncode == 0, r.stderr
    spots = anndata.read_h5ad(d / "spots.h5ad")
    hr = anndata.read_h5ad(d / "hr-spots.h5ad")
    assert spots.shape == (len(xy), 12)
    for c in ("x", "y", "x_raw", "y_raw"):
        assert c in spots.obs and c in hr.obs
    np.testing.assert_allclose(spots.obs["x_raw"], xy[:, 0], atol=1e-6)
    np.testing.assert_allclose(spots.obs["x"], xy[:, 0] * 0.8, atol=1e-6)
    raw = pd.read_csv(d / "cnts.tsv", sep="\t", index_col=0)
    top = raw.var(axis=0).sort_values(ascending=False, kind="stable").index[:12]
    assert set(spots.var_names) == set(top)
    np.testing.assert_allclose(spots.var["scale_min"], raw[spots.var_names].min().to_numpy())
    np.testing.assert_allclose(spots.var["scale_max"], raw[spots.var_names].max().to_numpy())
    assert hr.obs["measured"].sum() == len(xy) and len(hr) > 2 * len(xy)
    assert spots.uns["lattice"]["kind"] == "hexagonal"
    assert spots.uns["lattice"]["spacing_um"] == pytest.approx(100.0, rel=1e-6)
    assert (d / "hr-spots.png").is_file() and (d / "manifests" / "get_HR.json").is_file()


def test_gene_list(tmp_path):
    d, _ = _make(tmp_path)
    calibrate(d)
    (tmp_path / "genes.txt").write_text("G3\nG1\n")
    build_hr(d, gene_list=tmp_path / "genes.txt")
    assert list(anndata.read_h5ad(d / "spots.h5ad").var_names) == ["G3", "G1"]
    (tmp_path / "bad.txt").write_text("G3\nNOPE\n")
    assert_user_error(run_script("get_HR.py", d, "--gene-list", tmp_path / "bad.txt"), "bad.txt", "NOPE")


def test_mismatched_ids(tmp_path):
    d, xy = _make(tmp_path)
    calibrate(d)
    locs = pd.read_csv(d / "locs-raw.tsv", sep="\t")
    locs.loc[:4, "spot"] = ["zz1", "zz2", "zz3", "zz4", "zz5"]
    locs.to_csv(d / "locs-raw.tsv", sep="\t", index=False)
    before = snapshot(d)
    # locs-raw.tsv changed after calibration: refused as stale unless --force
    assert_user_error(run_script("get_HR.py", d), "locs-raw.tsv", "stale", "--force")
    err = assert_user_error(run_script("get_HR.py", d, "--force"), "locs-raw.tsv", "5 of the")
    assert "s0" in err
    locs["spot"] = [f"other{i}" for i in range(len(locs))]
    locs.to_csv(d / "locs-raw.tsv", sep="\t", index=False)
    assert_user_error(run_script("get_HR.py", d, "--force"), "none of the")
    assert snapshot(d).keys() == before.keys()


@pytest.mark.parametrize("problem,fragment", [
    ("dup_gene", "duplicated gene"), ("dup_spot", "duplicated spot"), ("nan", "missing or non-finite"),
    ("negative", "negative"), ("fraction", "non-integer"), ("too_many_genes", "larger than"),
    ("all_zero", "every count is zero")])
def test_bad_counts(tmp_path, problem, fragment):
    d, xy = _make(tmp_path)
    calibrate(d)
    raw = pd.read_csv(d / "cnts.tsv", sep="\t", index_col=0)
    args = []
    if problem == "dup_gene":
        raw.columns = ["G0"] + list(raw.columns[1:-1]) + ["G0"]
    elif problem == "dup_spot":
        raw.index = ["s1"] + list(raw.index[1:])
    elif problem == "nan":
        raw = raw.astype(float)
        raw.iloc[3, 2] = np.nan
    elif problem == "negative":
        raw.iloc[3, 2] = -1
    elif problem == "fraction":
        raw = raw.astype(float)
        raw.iloc[3, 2] = 0.5
    elif problem == "too_many_genes":
        args = ["--n-genes", 500]
    elif problem == "all_zero":
        raw[:] = 0
    raw.to_csv(d / "cnts.tsv", sep="\t")
    before = snapshot(d)
    assert_user_error(run_script("get_HR.py", d, *args), fragment)
    assert snapshot(d) == before


def test_get_hr_needs_calibration(tmp_path):
    d, _ = _make(tmp_path)
    assert_user_error(run_script("get_HR.py", d), "image_calibration.py")


def test_spots_outside_dropped(tmp_path):
    d, xy = _make(tmp_path)
    calibrate(d)
    locs = pd.read_csv(d / "locs-raw.tsv", sep="\t")
    locs.loc[0, "x"] = 1e6
    locs.to_csv(d / "locs-raw.tsv", sep="\t", index=False)
    r = run_script("get_HR.py", d, "--force")
    assert r.returncode == 0 and "outside the image" in r.stderr
    assert anndata.read_h5ad(d / "spots.h5ad").n_obs == len(xy) - 1


def test_her2st_square_lattice(her2st_c2):
    calibrate(her2st_c2)
    spots, hr, lat = build_hr(her2st_c2, n_genes=200)
    assert lat["kind"] == "square"
    assert 150 < lat["spacing_um"] < 230
    assert abs(lat["orientation_deg"]) < 5
    assert spots.n_obs == 187 and hr.n_obs > 2.5 * spots.n_obs
