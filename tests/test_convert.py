"""The 10x converters (python -m utils.convert): tiny fixtures in the real file formats (10x matrix HDF5
written with h5py, tissue positions as headerless CSV / CSV / parquet, scale factors JSON, Visium HD bins,
Xenium cells/boundaries parquet and an Xenium Explorer alignment matrix, a synthetic H&E), checked for
coordinates on the right pixels (rotated/scaled alignments included), counts round-trips, in-tissue
filtering, user errors, truth/spot conservation, and that the converted folders pass stages 1-2."""
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import anndata
import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import REPO, assert_user_error, run_script
from scipy import sparse

from utils.convert.cli import main as convert_main
from utils.core import geometry as geo

XENIUM_PX = 0.2125


# ----------------------------------------------------------------------------------------------------
# fixture writers (the 10x file formats)


def write_10x_h5(path, barcodes, names, types, X):
    """10x feature-barcode matrix HDF5: group matrix, CSC by barcode (shape genes x barcodes)."""
    X = sparse.csr_matrix(np.asarray(X))          # barcodes x features == CSC of features x barcodes
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("data", data=X.data.astype(np.int32))
        g.create_dataset("indices", data=X.indices.astype(np.int64))
        g.create_dataset("indptr", data=X.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([X.shape[1], X.shape[0]], np.int32))
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        ft = g.create_group("features")
        ft.create_dataset("name", data=np.array([n.encode() for n in names]))
        ft.create_dataset("id", data=np.array([f"ENSG{i:05d}".encode() for i in range(len(names))]))
        ft.create_dataset("feature_type", data=np.array([t.encode() for t in types]))
        ft.create_dataset("genome", data=np.array([b"GRCh38"] * len(names)))
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def he_image(h, w, seed=0):
    """Pinkish tissue-like RGB with a little texture."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (232, 190, 214)
    noise = rng.integers(-12, 12, size=(h, w, 1))
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[..., ::-1])


def rot(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def convert(*args):
    """In-process run of the converter (faster than a subprocess)."""
    return convert_main([str(a) for a in args] + ["--quiet"])


def convert_cli(*args):
    return subprocess.run([sys.executable, "-m", "utils.convert", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def read_counts(d):
    p = Path(d) / "cnts.tsv.gz"
    if p.is_file():
        return pd.read_csv(p, sep="\t", index_col=0)
    ad = anndata.read_h5ad(Path(d) / "cnts.h5ad")
    return pd.DataFrame(ad.X.toarray(), index=ad.obs_names, columns=ad.var_names)


def read_locs(d):
    return pd.read_csv(Path(d) / "locs-raw.tsv", sep="\t", index_col=0)


def number(d, name):
    return float((Path(d) / name).read_text().strip())


# ----------------------------------------------------------------------------------------------------
# Visium


VIS_PS = 1.0                 # um/px of the synthetic full-resolution image
VIS_HW = (1000, 1200)
VIS_ORIGIN = np.array([80.0, 90.0])
VIS_ROT = 2.0


def visium_outs(root, fmt="csv", ps=VIS_PS, seed=1):
    """A Space Ranger outs/ folder; returns (outs, image path, truth dict)."""
    rng = np.random.default_rng(seed)
    outs = root / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    rows, cols = [], []
    for r in range(10):
        for c in range(r % 2, 21, 2):
            rows.append(r)
            cols.append(c)
    rows, cols = np.array(rows), np.array(cols)
    uv = np.column_stack([cols * 50.0, rows * 50.0 * math.sqrt(3)])          # um on the slide
    xy = VIS_ORIGIN + (uv / ps) @ rot(VIS_ROT).T                              # full-res px
    barcodes = [f"AAAC{i:06d}-1" for i in range(len(rows))]
    centre = np.array([600.0, 480.0])
    in_tissue = (np.hypot(*(xy - centre).T) < 380).astype(int)
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue, "array_row": rows, "array_col": cols,
                        "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]})
    if fmt == "list":
        pos.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif fmt == "csv":
        pos.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        pos.to_parquet(spatial / "tissue_positions.parquet", index=False)
    sf = {"spot_diameter_fullres": 65.0 / ps, "tissue_hires_scalef": 0.5, "fiducial_diameter_fullres": 105.0 / ps,
          "tissue_lowres_scalef": 0.15}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    img = he_image(*VIS_HW)
    for x, y in xy[in_tissue == 1]:                 # a dark dot under every in-tissue spot centre
        cv2.circle(img, (int(round(x - 0.5)), int(round(y - 0.5))), 4, (40, 20, 60), -1)
    image = root / "fullres.tif"
    tifffile.imwrite(image, img)
    write_png(spatial / "tissue_hires_image.png", cv2.resize(img, (600, 500), interpolation=cv2.INTER_AREA))
    # filtered matrix: the in-tissue spots plus two off-tissue ones, 30 genes (one name twice) + 2 antibodies
    names = [f"G{j}" for j in range(30)] + ["CD3", "CD4"]
    names[7] = "G5"
    types = ["Gene Expression"] * 30 + ["Antibody Capture"] * 2
    sel = np.concatenate([np.flatnonzero(in_tissue == 1), np.flatnonzero(in_tissue == 0)[:2]])
    X = rng.poisson(rng.gamma(2.0, 2.0, size=(len(sel), len(names))))
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", [barcodes[i] for i in sel], names, types, X)
    return outs, image, {"pos": pos.set_index("barcode"), "X": X, "barcodes": [barcodes[i] for i in sel],
                         "names": names, "in_tissue": in_tissue}


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    root = tmp_path_factory.mktemp("visium")
    outs, image, truth = visium_outs(root, "csv")
    d = root / "raw"
    convert("visium", outs, "--directory", d, "--image", image)
    return d, outs, image, truth


@pytest.mark.parametrize("fmt", ["list", "csv", "parquet"])
def test_visium_positions_formats_land_on_the_right_pixels(tmp_path, fmt):
    outs, image, t = visium_outs(tmp_path, fmt)
    d = tmp_path / "raw"
    assert convert("visium", outs, "--directory", d, "--image", image) == 0
    locs = read_locs(d)
    tissue = t["pos"].index[t["pos"].in_tissue == 1]
    assert list(locs.index) == [b for b in t["barcodes"] if b in set(tissue)]      # in-tissue only, matrix order
    np.testing.assert_allclose(locs.x, t["pos"].loc[locs.index, "pxl_col_in_fullres"], atol=1e-4)
    np.testing.assert_allclose(locs.y, t["pos"].loc[locs.index, "pxl_row_in_fullres"], atol=1e-4)
    assert number(d, "pixel-size-raw.txt") == pytest.approx(VIS_PS, rel=1e-6)
    assert number(d, "radius-raw.txt") == pytest.approx(27.5 / VIS_PS, rel=1e-6)
    assert (d / "he-raw.tif").is_file() and not (d / "truth").exists()


def test_visium_counts_round_trip_and_gene_names(visium):
    d, outs, image, t = visium
    cnts = read_counts(d)
    assert list(cnts.columns[:8]) == [f"G{j}" for j in range(5)] + ["G5", "G6", "G5-1"]
    assert "CD3" not in cnts.columns and cnts.shape[1] == 30
    X = pd.DataFrame(t["X"][:, :30], index=t["barcodes"])
    np.testing.assert_array_equal(cnts.to_numpy(), X.loc[cnts.index].to_numpy())
    off = set(t["pos"].index[t["pos"].in_tissue == 0])
    assert not off & set(cnts.index)
    sec = json.loads((d / "section.json").read_text())
    assert sec["spots"] == len(cnts) and sec["array_x"] == t["pos"].loc[cnts.index, "array_col"].tolist()
    assert sec["conversion"]["pixel_size_um"] == pytest.approx(VIS_PS, rel=1e-6)


def test_visium_passes_stages_1_and_2_and_spots_sit_on_their_dots(visium):
    d = visium[0]
    p = run_script("image_calibration.py", d)
    assert p.returncode == 0, p.stderr[-2000:]
    he = tifffile.imread(d / "he.tif")
    locs = pd.read_csv(d / "locs.tsv", sep="\t")
    vals = he[locs.y.to_numpy().astype(int), locs.x.to_numpy().astype(int)]
    assert (vals.mean(1) < 80).all()                   # every spot centre is on its dark dot
    p = run_script("get_HR.py", d)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((d / "lattice.json").read_text())["kind"] == "hexagonal"


def test_visium_refuses_the_hires_image(tmp_path):
    outs, image, _ = visium_outs(tmp_path, "csv")
    p = convert_cli("visium", outs, "--directory", tmp_path / "raw", "--image", outs / "spatial" / "tissue_hires_image.png")
    err = assert_user_error(p, "tissue_hires_image.png", "too coarse", "full-resolution", "--image")
    assert not (tmp_path / "raw").exists()
    # the same downscaled image under another name is caught by its size
    other = tmp_path / "small.png"
    other.write_bytes((outs / "spatial" / "tissue_hires_image.png").read_bytes())
    p = convert_cli("visium", outs, "--directory", tmp_path / "raw", "--image", other)
    assert_user_error(p, "small.png", "full-resolution")
    assert err.startswith("error:")


def test_visium_raw_matrix_filtered_by_in_tissue(tmp_path):
    outs, image, t = visium_outs(tmp_path, "parquet")
    (outs / "filtered_feature_bc_matrix.h5").rename(outs / "raw_feature_bc_matrix.h5")
    d = tmp_path / "raw"
    convert("visium", outs, "--directory", d, "--image", image, "--counts-format", "h5ad", "--image-mode", "copy")
    cnts = read_counts(d)
    assert set(cnts.index) == set(t["pos"].index[t["pos"].in_tissue == 1])
    assert (d / "cnts.h5ad").is_file() and not (d / "he-raw.tif").is_symlink()


def test_visium_matrix_market_folder(tmp_path, visium):
    from scipy.io import mmwrite
    d0, _, _, _ = visium
    outs, image, t = visium_outs(tmp_path, "list")
    mtx = outs / "filtered_feature_bc_matrix"
    mtx.mkdir()
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    mmwrite(str(mtx / "matrix.mtx"), sparse.coo_matrix(t["X"].T))
    with open(mtx / "matrix.mtx", "rb") as f, gzip.open(mtx / "matrix.mtx.gz", "wb") as g:
        g.write(f.read())
    (mtx / "matrix.mtx").unlink()
    pd.DataFrame({"id": [f"ENSG{i:05d}" for i in range(len(t["names"]))], "name": t["names"],
                  "type": ["Gene Expression"] * 30 + ["Antibody Capture"] * 2}).to_csv(
        mtx / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(t["barcodes"]).to_csv(mtx / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    d = tmp_path / "raw"
    convert("visium", outs, "--directory", d, "--image", image)
    pd.testing.assert_frame_equal(read_counts(d), read_counts(d0))


def test_every_option_has_help():
    from utils.convert.cli import build_parser
    p = build_parser()
    subs = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subs.choices) == {"visium", "visium-hd", "xenium", "h5ad"}
    for name, sp in subs.choices.items():
        assert sp.description and len(sp.description) > 100, name
        for a in sp._actions:
            assert a.help, (name, a.dest)


def test_visium_user_errors(tmp_path):
    outs, image, _ = visium_outs(tmp_path, "csv")
    p = convert_cli("visium", tmp_path / "nope", "--directory", tmp_path / "raw", "--image", image)
    assert_user_error(p, "nope", "outs")
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    p = convert_cli("visium", outs, "--directory", tmp_path / "raw", "--image", image)
    assert_user_error(p, "filtered_feature_bc_matrix.h5", "hdf5")
    p = convert_cli("visium", outs, "--directory", tmp_path / "raw")
    assert_user_error(p, "--image")
    p = convert_cli("visium", outs, "--directory", image / "raw", "--image", image)   # under a file
    assert_user_error(p, "--directory", "is not a directory")
    sf = outs / "spatial" / "scalefactors_json.json"
    for bad in ('"65"', "-5", "true"):   # text used to be a traceback
        sf.write_text(json.dumps({"spot_diameter_fullres": json.loads(bad)}))
        p = convert_cli("visium", outs, "--directory", tmp_path / "raw", "--image", image)
        assert_user_error(p, "scalefactors_json.json", "spot_diameter_fullres", "not a positive number")


# ----------------------------------------------------------------------------------------------------
# AnnData


def test_h5ad_scanpy_visium_object(tmp_path, visium):
    d0, outs, image, t = visium
    pos = t["pos"].loc[t["barcodes"]]
    counts = t["X"][:, :30]
    X = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    unique_names = [n if n not in t["names"][:j] else f"{n}-1" for j, n in enumerate(t["names"][:30])]  # as scanpy
    ad = anndata.AnnData(X=X, obs=pd.DataFrame({"in_tissue": pos.in_tissue.to_numpy(),
                                                "array_row": pos.array_row.to_numpy(),
                                                "array_col": pos.array_col.to_numpy()}, index=t["barcodes"]),
                         var=pd.DataFrame({"gene_ids": [f"E{j}" for j in range(30)],
                                           "feature_types": "Gene Expression"},
                                          index=pd.Index(unique_names)))
    ad.layers["counts"] = sparse.csr_matrix(counts)
    ad.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    ad.uns["spatial"] = {"lib1": {"scalefactors": {"spot_diameter_fullres": 65.0, "tissue_hires_scalef": 0.5}}}
    src = tmp_path / "visium.h5ad"
    ad.write_h5ad(src)
    d = tmp_path / "raw"
    assert convert("h5ad", src, "--directory", d, "--image", image) == 0
    cnts, ref = read_counts(d), read_counts(d0)
    assert list(cnts.index) == list(ref.index)
    np.testing.assert_array_equal(cnts.to_numpy(), ref.to_numpy())
    pd.testing.assert_frame_equal(read_locs(d), read_locs(d0))
    assert number(d, "pixel-size-raw.txt") == pytest.approx(VIS_PS, rel=1e-6)
    # without array coordinates: from the hexagonal spacing
    del ad.obs["array_row"], ad.obs["array_col"]
    ad.write_h5ad(src)
    d2 = tmp_path / "raw2"
    convert("h5ad", src, "--directory", d2, "--image", image)
    assert number(d2, "pixel-size-raw.txt") == pytest.approx(VIS_PS, rel=1e-3)
    # normalised X and no counts layer: refused
    del ad.layers["counts"]
    ad.write_h5ad(src)
    p = convert_cli("h5ad", src, "--directory", tmp_path / "raw3", "--image", image)
    assert_user_error(p, "visium.h5ad", "layers['counts']")
    # no X at all (docs/ROBUSTNESS.md row 91)
    bare = anndata.AnnData(obs=ad.obs, var=ad.var, obsm=ad.obsm, uns=ad.uns)
    bare.write_h5ad(src)
    p = convert_cli("h5ad", src, "--directory", tmp_path / "raw4", "--image", image)
    assert_user_error(p, "visium.h5ad", "no count matrix")
    assert not (tmp_path / "raw4").exists() or not any((tmp_path / "raw4").iterdir())


def test_h5ad_scale_factors_are_checked(tmp_path, visium):
    """uns['spatial'] scale factors as text or negative were a traceback or taken (as row 113 for
    Space Ranger's JSON)."""
    d0, outs, image, t = visium
    pos = t["pos"].loc[t["barcodes"]]
    ad = anndata.AnnData(X=sparse.csr_matrix(t["X"][:, :10]), obs=pd.DataFrame(index=t["barcodes"]),
                         var=pd.DataFrame(index=[f"G{j}" for j in range(10)]))
    ad.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    src = tmp_path / "v.h5ad"
    for value, fragment in (("abc", "spot_diameter_fullres is 'abc', not a positive number"),
                            (-65.0, "spot_diameter_fullres is -65.0")):
        ad.uns["spatial"] = {"lib1": {"scalefactors": {"spot_diameter_fullres": value}}}
        ad.write_h5ad(src)
        p = convert_cli("h5ad", src, "--directory", tmp_path / "raw", "--image", image)
        assert_user_error(p, "uns['spatial']['lib1']['scalefactors']", fragment)
    ad.uns["spatial"] = {"lib1": "oops"}
    ad.write_h5ad(src)
    assert_user_error(convert_cli("h5ad", src, "--directory", tmp_path / "raw", "--image", image),
                      "uns['spatial']['lib1'] is a str")
    assert not (tmp_path / "raw").exists()


def test_an_image_given_as_a_relative_symbolic_link(tmp_path, visium):
    """--image-mode hardlink (the default) linked the symbolic link itself, which then pointed nowhere:
    a traceback and an empty DIR left behind."""
    d0, outs, image, t = visium
    here = tmp_path / "images"
    here.mkdir()
    os.link(image, here / "real image.tif")
    (here / "link.tif").symlink_to("real image.tif")
    d = tmp_path / "raw"
    assert convert("visium", outs, "--directory", d, "--image", here / "link.tif") == 0
    assert not (d / "he-raw.tif").is_symlink() and os.path.samefile(d / "he-raw.tif", image)


@pytest.mark.parametrize("where", ["gene", "spot"])
def test_h5ad_names_with_tabs_are_refused(tmp_path, visium, where):
    """A tab or line break cannot live in the TSV count table (docs/ROBUSTNESS.md row 97)."""
    d0, outs, image, t = visium
    pos = t["pos"].loc[t["barcodes"]]
    genes = [f"G{j}" for j in range(10)]
    barcodes = list(t["barcodes"])
    if where == "gene":
        genes[3] = "A\tB"
    else:
        barcodes[2] = "AC\nGT-1"
    ad = anndata.AnnData(X=t["X"][:, :10].astype(np.float32), obs=pd.DataFrame(index=barcodes),
                         var=pd.DataFrame(index=genes))
    ad.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    src = tmp_path / "tabs.h5ad"
    ad.write_h5ad(src)
    p = convert_cli("h5ad", src, "--directory", tmp_path / "raw", "--image", image, "--pixel-size", VIS_PS)
    assert_user_error(p, "tabs.h5ad", "tab or line break")


# ----------------------------------------------------------------------------------------------------
# Visium HD


HD_PS = 1.0
HD_HW = (700, 800)


def visium_hd_outs(root, angle=0.0, bin_size=8, ps=HD_PS, seed=2, n_genes=25):
    """outs/binned_outputs/square_NNNum with an aligned (angle 0: bin centres on super-pixel centres) or rotated
    bin grid; returns (outs, image, bins DataFrame of in-tissue bins with x, y, counts)."""
    rng = np.random.default_rng(seed)
    bdir = root / "outs" / "binned_outputs" / f"square_{bin_size:03d}um"
    (bdir / "spatial").mkdir(parents=True)
    n_r, n_c = int(HD_HW[0] * ps / bin_size) - 2, int(HD_HW[1] * ps / bin_size) - 2
    ar, ac = np.meshgrid(np.arange(n_r), np.arange(n_c), indexing="ij")
    ar, ac = ar.ravel(), ac.ravel()
    uv = np.column_stack([(ac + 0.5) * bin_size, (ar + 0.5) * bin_size]) + 8.0   # um, one super-pixel margin
    if angle:
        c = uv.mean(0)
        uv = (uv - c) @ rot(angle).T + c
    xy = uv / ps
    barcodes = np.array([f"s_{bin_size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(ar, ac)])
    centre = np.array([HD_HW[1] / 2, HD_HW[0] / 2])
    in_tissue = (((xy - centre) / [330, 280]) ** 2).sum(1) < 1
    pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(np.int32), "array_row": ar, "array_col": ac,
                  "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]}).to_parquet(
        bdir / "spatial" / "tissue_positions.parquet", index=False)
    sf = {"spot_diameter_fullres": bin_size / ps, "bin_size_um": float(bin_size), "microns_per_pixel": ps,
          "tissue_hires_scalef": 0.25, "tissue_lowres_scalef": 0.1, "fiducial_diameter_fullres": 100.0,
          "regist_target_img_scalef": 0.3}
    (bdir / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    names = [f"H{j}" for j in range(n_genes)] + ["NEG1"]
    types = ["Gene Expression"] * n_genes + ["Negative Control Probe"]
    sel = np.flatnonzero(in_tissue)
    X = rng.poisson(0.6 * (bin_size / 8) ** 2, size=(len(sel), len(names)))
    write_10x_h5(bdir / "filtered_feature_bc_matrix.h5", list(barcodes[sel]), names, types, X)
    image = root / "hd.png"
    write_png(image, he_image(*HD_HW))
    bins = pd.DataFrame(X[:, :n_genes], index=barcodes[sel], columns=names[:n_genes])
    bins.insert(0, "y", xy[sel, 1])
    bins.insert(0, "x", xy[sel, 0])
    return root / "outs", image, bins


def _truth(d):
    t = anndata.read_h5ad(Path(d) / "truth" / "super.h5ad")
    X = t.X.toarray() if sparse.issparse(t.X) else np.asarray(t.X)
    return t, X


def _check_spots_are_disk_sums(d):
    """cnts = sum of the truth over utils.geometry.footprint of each spot, recomputed from the written files."""
    t, T = _truth(d)
    ps = number(d, "pixel-size-raw.txt")
    scale = geo.calibration_scale(ps)
    radius = number(d, "radius-raw.txt") * scale
    grid = tuple(int(v) for v in t.uns["grid_shape"])
    index = np.full(grid, -1)
    index[t.obs.row.to_numpy(), t.obs.col.to_numpy()] = np.arange(t.n_obs)
    cnts, locs = read_counts(d), read_locs(d)
    cnts = cnts[list(t.var_names)]
    assert len(cnts) >= 3
    for sid in cnts.index:
        r, c = geo.footprint(locs.loc[sid, "x"] * scale, locs.loc[sid, "y"] * scale, radius, grid)
        k = index[r, c]
        np.testing.assert_array_equal(cnts.loc[sid].to_numpy(), T[k[k >= 0]].sum(0))


def test_visium_hd_aligned_bins_are_the_truth(tmp_path):
    outs, image, bins = visium_hd_outs(tmp_path)
    d = tmp_path / "raw"
    assert convert("visium-hd", outs, "--directory", d, "--image", image) == 0
    t, T = _truth(d)
    assert number(d, "pixel-size-raw.txt") == pytest.approx(HD_PS)
    assert list(t.var_names) == [f"H{j}" for j in range(25)]
    # each bin centre sits on a super-pixel centre: one bin per super-pixel, counts identical
    assert t.n_obs == len(bins)
    r = np.floor(bins.y * HD_PS / 8).astype(int)
    c = np.floor(bins.x * HD_PS / 8).astype(int)
    got = pd.DataFrame(T, index=list(zip(t.obs.row, t.obs.col)), columns=t.var_names)
    np.testing.assert_array_equal(got.loc[list(zip(r, c))].to_numpy(), bins.iloc[:, 2:].to_numpy())
    np.testing.assert_allclose(t.obs.x, (t.obs.col + 0.5) * 8 / HD_PS)
    np.testing.assert_allclose(t.obs.y, (t.obs.row + 0.5) * 8 / HD_PS)
    at = {rc: i for i, rc in enumerate(zip(t.obs.row, t.obs.col))}
    rows_of_bins = np.array([at[rc] for rc in zip(r, c)])
    np.testing.assert_allclose(t.obs.x.to_numpy()[rows_of_bins], bins.x, atol=1e-9)   # centre = bin centre here
    np.testing.assert_allclose(t.obs.y.to_numpy()[rows_of_bins], bins.y, atol=1e-9)
    mask = cv2.imread(str(d / "truth" / "mask.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == geo.superpixel_grid_shape(HD_HW, HD_PS)
    assert (mask > 0).sum() == t.n_obs and (mask[t.obs.row, t.obs.col] == 255).all()
    _check_spots_are_disk_sums(d)
    sec = json.loads((d / "section.json").read_text())
    assert sec["spots"] == len(read_counts(d)) and len(sec["array_x"]) == sec["spots"]


def test_visium_hd_rotated_bins_keep_every_count(tmp_path):
    outs, image, bins = visium_hd_outs(tmp_path, angle=7.0)
    d = tmp_path / "raw"
    convert("visium-hd", outs, "--directory", d, "--image", image, "--seed", 3)
    t, T = _truth(d)
    np.testing.assert_array_equal(T.sum(0), bins.iloc[:, 2:].to_numpy().sum(0))
    # every bin lands in the super-pixel holding its centre
    key = np.floor(bins.y / 8).astype(int) * 10_000 + np.floor(bins.x / 8).astype(int)
    expect = bins.iloc[:, 2:].groupby(key.to_numpy()).sum()
    got = pd.DataFrame(T, index=t.obs.row.to_numpy() * 10_000 + t.obs.col.to_numpy(), columns=t.var_names)
    np.testing.assert_array_equal(got.loc[expect.index].to_numpy(), expect.to_numpy())
    _check_spots_are_disk_sums(d)


def test_visium_hd_passes_stages_1_and_2(tmp_path):
    outs, image, _ = visium_hd_outs(tmp_path)
    d = tmp_path / "raw"
    convert("visium-hd", outs, "--directory", d, "--image", image)
    for script in ("image_calibration.py", "get_HR.py"):
        p = run_script(script, d)
        assert p.returncode == 0, (script, p.stderr[-2000:])


def test_visium_hd_two_micron_bins(tmp_path):
    outs, image, bins = visium_hd_outs(tmp_path, bin_size=2, angle=3.0, n_genes=6)
    d = tmp_path / "raw"
    convert("visium-hd", outs, "--directory", d, "--image", image, "--bin-size", 2)
    t, T = _truth(d)
    np.testing.assert_array_equal(T.sum(0), bins.iloc[:, 2:].to_numpy().sum(0))
    assert t.n_obs < len(bins) / 10                      # ~16 bins per super-pixel
    p = convert_cli("visium-hd", outs, "--directory", tmp_path / "raw8", "--image", image)
    assert_user_error(p, "square_008um", "--bin-size")


def test_visium_hd_bins_of_another_size_get_a_fix_that_works(tmp_path):
    """A square_016um folder (bin_size_um 16) was told to 'pass --bin-size 16', which the parser refuses."""
    outs, image, _ = visium_hd_outs(tmp_path, bin_size=16, n_genes=4)
    p = convert_cli("visium-hd", outs / "binned_outputs" / "square_016um", "--directory", tmp_path / "raw",
                    "--image", image)
    assert_user_error(p, "bin_size_um is 16", "only 2 and 8 um bins", "square_008um")
    assert "--bin-size 16" not in p.stderr


@pytest.mark.parametrize("diameter", ["1e9", "0.001", "1001"])
def test_an_implausible_spot_diameter_is_refused_by_the_converter(tmp_path, diameter):
    """It was written as radius-raw.txt (exit 0), and stage 1 refused the folder afterwards."""
    outs, image, _ = visium_outs(tmp_path, "csv")
    p = convert_cli("visium", outs, "--directory", tmp_path / "raw", "--image", image, "--spot-diameter-um", diameter)
    assert_user_error(p, "--spot-diameter-um", "at least 2", "at most 1000")
    assert not (tmp_path / "raw").exists()


# ----------------------------------------------------------------------------------------------------
# Xenium


XE_PS = 0.5                  # um/px of the synthetic post-Xenium H&E
XE_HW = (1000, 1100)
XE_ANGLE = 30.0
XE_T = np.array([400.0, 250.0])      # translation in Xenium px


def he_to_xenium_px():
    """The 3 x 3 matrix Xenium Explorer exports: H&E px -> Xenium morphology px (rotated and scaled)."""
    M = np.eye(3)
    M[:2, :2] = (XE_PS / XENIUM_PX) * rot(XE_ANGLE)
    M[:2, 2] = XE_T
    return M


def to_xenium_um(xy_px):
    M = he_to_xenium_px()
    return XENIUM_PX * (xy_px @ M[:2, :2].T + M[:2, 2])


def xenium_folder(root, cells_format="parquet", boundaries=True, seed=4):
    """A Xenium output folder + H&E + alignment CSV; cells laid out in H&E pixels, stored in Xenium um."""
    rng = np.random.default_rng(seed)
    src = root / "xenium"
    src.mkdir(parents=True)
    # cells on a jittered 12 um lattice inside an ellipse of the H&E
    g = np.arange(6.0, XE_HW[1] * XE_PS - 6, 12.0)
    h = np.arange(6.0, XE_HW[0] * XE_PS - 6, 12.0)
    cxu, cyu = np.meshgrid(g, h)
    cen = np.column_stack([cxu.ravel(), cyu.ravel()]) + rng.uniform(-1.5, 1.5, (cxu.size, 2))   # H&E um
    keep = ((((cen - [275, 250]) / [230, 210]) ** 2).sum(1) < 1)
    cen = cen[keep]
    # two marker cells: A wholly inside super-pixel (20, 25); B a 6 x 6 um square straddling cols 30|31 of row 22
    a = np.array([25 * 8 + 4.0, 20 * 8 + 4.0])
    b = np.array([31 * 8.0, 22 * 8 + 4.0])
    far = (np.hypot(*(cen - a).T) > 12) & (np.hypot(*(cen - b).T) > 12)
    cen = np.vstack([a, b, cen[far]])
    n = len(cen)
    ids = [f"cell{i:05d}-1" for i in range(n)]
    polys = []
    t = np.linspace(0, 2 * np.pi, 13)[:-1]
    for i, (x, y) in enumerate(cen):
        if i == 0:
            p = np.column_stack([x + 2.5 * np.cos(t), y + 2.5 * np.sin(t)])
        elif i == 1:
            p = np.array([[x - 3, y - 3], [x + 3, y - 3], [x + 3, y + 3], [x - 3, y + 3]])
        else:
            p = np.column_stack([x + 5.0 * np.cos(t), y + 5.0 * np.sin(t)])
        polys.append(np.vstack([p, p[:1]]))                 # closed, as Xenium writes them
    cen_px = cen / XE_PS
    cen_um = to_xenium_um(cen_px)
    cells = pd.DataFrame({"cell_id": ids, "x_centroid": cen_um[:, 0], "y_centroid": cen_um[:, 1],
                          "transcript_counts": 0, "cell_area": 78.5})
    if cells_format == "parquet":
        cells.to_parquet(src / "cells.parquet", index=False)
    else:
        cells.to_csv(src / "cells.csv.gz", index=False)
    if boundaries:
        vx = np.vstack([to_xenium_um(p / XE_PS) for p in polys])
        pd.DataFrame({"cell_id": np.repeat(ids, [len(p) for p in polys]), "vertex_x": vx[:, 0],
                      "vertex_y": vx[:, 1]}).to_parquet(src / "cell_boundaries.parquet", index=False)
    names = ["MARKA", "MARKB"] + [f"X{j}" for j in range(18)] + ["NegControlProbe_1", "BLANK_1"]
    types = ["Gene Expression"] * 20 + ["Negative Control Probe", "Blank Codeword"]
    X = rng.poisson(3.0, size=(n, len(names)))
    X[:, :2] = 0
    X[0, 0] = 500
    X[1, 1] = 2000
    write_10x_h5(src / "cell_feature_matrix.h5", ids, names, types, X)
    (src / "experiment.xenium").write_text(json.dumps({"pixel_size": XENIUM_PX, "major_version": 5}))
    image = root / "he.ome.tif"
    tifffile.imwrite(image, he_image(*XE_HW), photometric="rgb")
    M = he_to_xenium_px()
    align = root / "he_imagealignment.csv"
    align.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in M) + "\n")
    return src, image, align, {"cen_px": cen_px, "X": X, "ids": ids}


@pytest.fixture(scope="module")
def xenium(tmp_path_factory):
    root = tmp_path_factory.mktemp("xenium")
    src, image, align, t = xenium_folder(root)
    d = root / "raw"
    assert convert("xenium", src, "--directory", d, "--image", image, "--alignment", align) == 0
    return d, src, image, align, t


def test_xenium_rotated_scaled_alignment_lands_cells_on_their_pixels(xenium):
    d, src, image, align, t = xenium
    assert number(d, "pixel-size-raw.txt") == pytest.approx(XE_PS, rel=1e-9)
    assert (d / "he-raw.ome.tif").is_file()
    cells = pd.read_csv(d / "truth" / "cells.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_allclose(cells[["x", "y"]].to_numpy(), t["cen_px"], atol=2e-3)
    sec = json.loads((d / "section.json").read_text())
    assert sec["conversion"]["assign"] == "boundaries" and sec["conversion"]["cells_by_centroid"] == 0


def test_xenium_truth_keeps_counts_and_splits_by_overlap(xenium):
    d, src, image, align, t = xenium
    tr, T = _truth(d)
    assert list(tr.var_names) == ["MARKA", "MARKB"] + [f"X{j}" for j in range(18)]
    np.testing.assert_array_equal(T.sum(0), t["X"][:, :20].sum(0))
    at = {(r, c): i for i, (r, c) in enumerate(zip(tr.obs.row, tr.obs.col))}
    assert T[at[(20, 25)], 0] == 500 and T[:, 0].sum() == 500           # cell A wholly in its super-pixel
    left, right = T[at[(22, 30)], 1], T[at[(22, 31)], 1]
    assert left + right == 2000 and abs(left - right) < 300              # cell B split about half/half
    _check_spots_are_disk_sums(d)


def test_xenium_passes_stages_1_and_2(xenium):
    d = xenium[0]
    for script in ("image_calibration.py", "get_HR.py"):
        p = run_script(script, d)
        assert p.returncode == 0, (script, p.stderr[-2000:])


def test_xenium_inverted_alignment_and_wrong_direction(tmp_path, xenium):
    d0, src, image, align, t = xenium
    inv = tmp_path / "inverse.csv"
    inv.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in np.linalg.inv(he_to_xenium_px())))
    d = tmp_path / "raw"
    convert("xenium", src, "--directory", d, "--image", image, "--alignment", inv, "--invert-alignment")
    assert number(d, "pixel-size-raw.txt") == pytest.approx(XE_PS, rel=1e-9)
    cells = pd.read_csv(d / "truth" / "cells.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_allclose(cells[["x", "y"]].to_numpy(), t["cen_px"], atol=2e-3)
    p = convert_cli("xenium", src, "--directory", tmp_path / "raw2", "--image", image, "--alignment", inv)
    assert_user_error(p, "inverse.csv", "--invert-alignment")
    assert not (tmp_path / "raw2").exists()


def test_xenium_keypoints_csv(tmp_path, xenium):
    d0, src, image, align, t = xenium
    he = np.array([[10.0, 20.0], [900.0, 40.0], [500.0, 800.0], [120.0, 700.0]])
    fixed = to_xenium_um(he) / XENIUM_PX                                # keypoints: Xenium side in morphology px
    kp = tmp_path / "keypoints.csv"
    pd.DataFrame({"fixedX": fixed[:, 0], "fixedY": fixed[:, 1], "alignmentX": he[:, 0],
                  "alignmentY": he[:, 1]}).to_csv(kp, index=False)
    d = tmp_path / "raw"
    convert("xenium", src, "--directory", d, "--image", image, "--alignment", kp)
    assert number(d, "pixel-size-raw.txt") == pytest.approx(XE_PS, rel=1e-9)
    cells = pd.read_csv(d / "truth" / "cells.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_allclose(cells[["x", "y"]].to_numpy(), t["cen_px"], atol=2e-3)
    # the same keypoints in microns, declared as such
    kp_um = tmp_path / "keypoints_um.csv"
    pd.DataFrame({"fixedX": fixed[:, 0] * XENIUM_PX, "fixedY": fixed[:, 1] * XENIUM_PX, "alignmentX": he[:, 0],
                  "alignmentY": he[:, 1]}).to_csv(kp_um, index=False)
    p = convert_cli("xenium", src, "--directory", tmp_path / "raw2", "--image", image, "--alignment", kp_um)
    assert_user_error(p, "keypoints_um.csv", "--alignment-units microns")
    convert("xenium", src, "--directory", tmp_path / "raw3", "--image", image, "--alignment", kp_um,
            "--alignment-units", "microns")
    assert number(tmp_path / "raw3", "pixel-size-raw.txt") == pytest.approx(XE_PS, rel=1e-9)


def test_xenium_centroids_and_csv_cells(tmp_path):
    src, image, align, t = xenium_folder(tmp_path, cells_format="csv", boundaries=False)
    d = tmp_path / "raw"
    convert("xenium", src, "--directory", d, "--image", image, "--alignment", align)
    tr, T = _truth(d)
    np.testing.assert_array_equal(T.sum(0), t["X"][:, :20].sum(0))
    r = np.floor(t["cen_px"][:, 1] * XE_PS / 8).astype(int)
    c = np.floor(t["cen_px"][:, 0] * XE_PS / 8).astype(int)
    assert set(zip(tr.obs.row, tr.obs.col)) == set(zip(r, c))
    at = {(rr, cc): i for i, (rr, cc) in enumerate(zip(tr.obs.row, tr.obs.col))}
    assert T[at[(r[1], c[1])], 1] == 2000                               # by centroid: wholly in one super-pixel
    assert json.loads((d / "section.json").read_text())["conversion"]["assign"] == "centroids"
    _check_spots_are_disk_sums(d)


def test_refuses_a_folder_of_another_data_set(tmp_path, visium):
    d0, outs, image, _ = visium
    d = tmp_path / "raw"
    d.mkdir()
    (d / "he-raw.jpg").write_bytes(b"x")
    p = convert_cli("visium", outs, "--directory", d, "--image", image)
    assert_user_error(p, "he-raw.jpg", "another data set")


def test_xenium_names_with_line_breaks_are_refused(tmp_path):
    """Every converter refuses a gene name or id that the TSV tables cannot hold (ROBUSTNESS row 97)."""
    src, image, align, t = xenium_folder(tmp_path, boundaries=False)
    names = ["MARKA", "MARKB", "X\n0"] + [f"X{j}" for j in range(1, 18)] + ["NegControlProbe_1", "BLANK_1"]
    types = ["Gene Expression"] * 20 + ["Negative Control Probe", "Blank Codeword"]
    write_10x_h5(src / "cell_feature_matrix.h5", t["ids"], names, types, t["X"])
    d = tmp_path / "raw"
    p = convert_cli("xenium", src, "--directory", d, "--image", image, "--alignment", align)
    assert_user_error(p, "xenium", "gene name", "tab or line break")
    assert not d.exists() or not any(d.iterdir())
