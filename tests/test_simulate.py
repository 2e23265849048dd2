"""The built-in demo tissue simulator (utils/simulate.py): determinism, conservation of counts between
cells, super-pixels and spots, the raw layout parses, and the command line's user errors."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import anndata
import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import REPO, assert_user_error, mount

from utils.core import geometry as geo
from utils.simulate.simulation import simulate

EXTENT_MM = 0.8
PX = 0.3
N_GENES = 40
RAW_FILES = ["he-raw.tif", "pixel-size-raw.txt", "cnts.tsv", "locs-raw.tsv", "radius-raw.txt", "section.json"]
TRUTH_FILES = ["truth/super.h5ad", "truth/mask.png", "truth/regions.png", "truth/regions-colour.png",
               "truth/cells.tsv.gz", "truth/simulation.json"]


def _sim(directory, seed):
    simulate(directory, size="small", seed=seed, pixel_size=PX, n_genes=N_GENES, extent_mm=EXTENT_MM,
             progress=False)
    return Path(directory)


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    return {"a": _sim(base / "a", 3), "b": _sim(base / "b", 3), "c": _sim(base / "c", 4)}


@pytest.fixture(scope="module")
def sim(sims):
    return sims["a"]


def _files(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())


def _truth(d):
    return anndata.read_h5ad(d / "truth" / "super.h5ad")


def _dense(X):
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


def test_writes_every_file_and_no_temporaries(sim):
    files = _files(sim)
    assert files == sorted(RAW_FILES + TRUTH_FILES)
    assert not any(".trihrge-tmp" in f for f in files)


def test_same_seed_identical_different_seed_differs(sims):
    a, b, c = sims["a"], sims["b"], sims["c"]
    for f in RAW_FILES + TRUTH_FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in ["he-raw.tif", "cnts.tsv", "locs-raw.tsv", "truth/super.h5ad", "truth/cells.tsv.gz"]:
        assert (a / f).read_bytes() != (c / f).read_bytes(), f


def test_image_dtype_shape_and_pixel_size(sim):
    px = float((sim / "pixel-size-raw.txt").read_text())
    assert px == PX
    radius = float((sim / "radius-raw.txt").read_text())
    assert radius == pytest.approx(27.5 / PX, rel=1e-6)
    with tifffile.TiffFile(sim / "he-raw.tif") as tf:
        page = tf.pages[0]
        assert page.compression == 1                                  # uncompressed
        assert page.photometric == tifffile.PHOTOMETRIC.RGB
        img = page.asarray()
    n = int(round(EXTENT_MM * 1000 / PX))
    assert img.shape == (n, n, 3) and img.dtype == np.uint8
    ad = _truth(sim)
    assert tuple(ad.uns["image_shape"]) == (n, n, 3)
    assert tuple(ad.uns["grid_shape"]) == geo.superpixel_grid_shape((n, n), px)
    assert float(ad.uns["raw_pixel_size_um"]) == PX
    # looks like a stained section: white glass, purple nuclei, pink stroma
    grey = img.mean(2)
    assert (grey > 225).mean() > 0.15                    # background glass
    assert (grey < 120).mean() > 0.01                    # dark nuclei
    tissue = grey < 215
    assert (img[..., 0][tissue].astype(int) - img[..., 1][tissue]).mean() > 15   # red > green: eosin/hematoxylin


def test_tissue_fraction_and_mask_agree_with_image(sim):
    img = tifffile.imread(sim / "he-raw.tif")
    mask = cv2.imread(str(sim / "truth" / "mask.png"), cv2.IMREAD_UNCHANGED)
    ad = _truth(sim)
    assert mask.shape == tuple(ad.uns["grid_shape"]) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert int((mask == 255).sum()) == ad.n_obs
    inside = int(EXTENT_MM * 1000 // 8)
    frac = (mask[:inside, :inside] == 255).mean()
    meta = json.loads((sim / "truth" / "simulation.json").read_text())
    assert 0.5 < frac < 0.9
    assert meta["tissue_fraction"] == pytest.approx(frac, abs=1e-3)
    # no tissue (and no truth) beyond the image
    rows, cols = ad.obs["row"].to_numpy(), ad.obs["col"].to_numpy()
    assert rows.max() * 8 < EXTENT_MM * 1000 and cols.max() * 8 < EXTENT_MM * 1000
    # the stained area of the image matches the mask on most super-pixels
    n = img.shape[0]
    m = int(n * PX / 8)
    stained = cv2.resize(((img.mean(2) < 225) * 1.0).astype(np.float32), (m, m), interpolation=cv2.INTER_AREA) > 0.03
    sp = np.zeros(tuple(ad.uns["grid_shape"]), bool)
    sp[rows, cols] = True
    assert (stained == sp[:m, :m]).mean() > 0.9


def test_files_parse_and_agree(sim):
    cnts = pd.read_csv(sim / "cnts.tsv", sep="\t")
    assert cnts.columns[0] == "spot"
    genes = list(cnts.columns[1:])
    assert len(genes) == N_GENES and len(set(genes)) == N_GENES
    assert all(np.issubdtype(t, np.integer) for t in cnts.dtypes.iloc[1:])
    assert (cnts.iloc[:, 1:].to_numpy() >= 0).all()
    locs = pd.read_csv(sim / "locs-raw.tsv", sep="\t")
    assert list(locs.columns) == ["spot", "x", "y"]
    assert list(locs["spot"]) == list(cnts["spot"])
    section = json.loads((sim / "section.json").read_text())
    assert section["source"] == "TriHRGE simulator"
    assert section["spots"] == len(cnts) and section["genes"] == N_GENES
    ids = [f"{x}x{y}" for x, y in zip(section["array_x"], section["array_y"])]
    assert ids == list(cnts["spot"])
    # Visium-style array coordinates: array_x steps by 2, odd rows shifted; 100 um centre spacing
    ax, ay = np.array(section["array_x"]), np.array(section["array_y"])
    assert ((ax - ay) % 2 == 0).all() or ((ax + ay) % 2 == 0).all()
    xy_um = locs[["x", "y"]].to_numpy() * PX
    i, j = 0, np.argmin(np.where(np.arange(len(ax)) == 0, np.inf, np.hypot(*(xy_um - xy_um[0]).T)))
    assert np.hypot(*(xy_um[j] - xy_um[i])) == pytest.approx(100.0, abs=0.01)
    y_step = np.diff(np.unique(np.round(locs["y"].to_numpy() * PX, 2)))
    assert np.allclose(y_step, 100 * np.sqrt(3) / 2, atol=0.01)
    ad = _truth(sim)
    assert list(ad.var_names) == genes
    assert set(ad.var["group"]) >= {"HK", "TUMOUR", "EPITH", "STROMA", "IMMUNE", "FAT", "PROG1", "PROG4"}
    for c in ["row", "col"]:
        assert np.issubdtype(ad.obs[c].dtype, np.integer)
    np.testing.assert_allclose(ad.obs["x"], (ad.obs["col"] + 0.5) * 8 / PX)
    np.testing.assert_allclose(ad.obs["y"], (ad.obs["row"] + 0.5) * 8 / PX)
    assert _dense(ad.X).dtype == np.float32
    assert (_dense(ad.X) == np.round(_dense(ad.X))).all()
    regions = cv2.imread(str(sim / "truth" / "regions.png"), cv2.IMREAD_UNCHANGED)
    colour = cv2.imread(str(sim / "truth" / "regions-colour.png"), cv2.IMREAD_COLOR)
    assert regions.shape == tuple(ad.uns["grid_shape"]) and colour.shape == regions.shape + (3,)
    meta = json.loads((sim / "truth" / "simulation.json").read_text())
    assert regions.max() < len(meta["regions"])
    assert meta["seed"] == 3 and meta["size"] == "custom" and meta["raw_pixel_size_um"] == PX   # --extent-mm
    assert sorted(sum(meta["gene_groups"].values(), [])) == sorted(genes)
    for name, prog in meta["programmes"].items():
        assert prog["genes"] and all(g.startswith(name + "_") for g in prog["genes"])
        assert 180 <= prog["field_scale_um"] <= 900
    cells = pd.read_csv(sim / "truth" / "cells.tsv.gz", sep="\t")
    assert list(cells.columns) == ["cell", "x", "y", "type", "radius_um", "total_counts"]
    assert set(cells["type"]) <= set(meta["cell_types"]) and {"tumour", "fibroblast", "lymphocyte"} <= set(cells["type"])
    assert (cells[["x", "y"]].to_numpy() >= 0).all() and (cells[["x", "y"]].to_numpy() < EXTENT_MM * 1000 / PX).all()
    with gzip.open(sim / "truth" / "cells.tsv.gz") as f:   # a plain gzip stream
        assert f.readline().startswith(b"cell\t")


def test_spot_counts_equal_truth_summed_over_footprints(sim):
    cnts = pd.read_csv(sim / "cnts.tsv", sep="\t", index_col=0)
    locs = pd.read_csv(sim / "locs-raw.tsv", sep="\t", index_col=0)
    px = float((sim / "pixel-size-raw.txt").read_text())
    radius_raw = float((sim / "radius-raw.txt").read_text())
    ad = _truth(sim)
    grid = tuple(ad.uns["grid_shape"])
    X = _dense(ad.X).astype(np.float64)
    index = np.full(grid, -1)
    index[ad.obs["row"].to_numpy(), ad.obs["col"].to_numpy()] = np.arange(ad.n_obs)
    s = geo.calibration_scale(px)
    assert len(cnts) > 0
    for radius_cal in (27.5 / 0.5, radius_raw * s):
        for spot, (x, y) in locs[["x", "y"]].iterrows():
            r, c = geo.footprint(x * s, y * s, radius_cal, grid)
            assert 30 <= len(r) <= 45
            t = index[r, c]
            expected = X[t[t >= 0]].sum(0)
            np.testing.assert_array_equal(cnts.loc[spot].to_numpy(), expected)
    # whole spots inside the image, centres on tissue super-pixels
    n = int(round(EXTENT_MM * 1000 / PX))
    xy = locs[["x", "y"]].to_numpy()
    assert (xy - radius_raw >= 0).all() and (xy + radius_raw <= n).all()
    r = np.floor(locs["y"].to_numpy() * s / 16).astype(int)
    c = np.floor(locs["x"].to_numpy() * s / 16).astype(int)
    assert (index[r, c] >= 0).all()


def test_truth_totals_equal_cell_totals(sim):
    ad = _truth(sim)
    X = _dense(ad.X).astype(np.float64)
    meta = json.loads((sim / "truth" / "simulation.json").read_text())
    per_gene = np.array([meta["gene_totals"][g] for g in ad.var_names])
    np.testing.assert_array_equal(X.sum(0), per_gene)
    cells = pd.read_csv(sim / "truth" / "cells.tsv.gz", sep="\t")
    assert X.sum() == cells["total_counts"].sum() == meta["total_counts"]
    assert (cells["total_counts"] >= 0).all() and cells["total_counts"].median() > 20


def test_spot_count_plausible(sim):
    cnts = pd.read_csv(sim / "cnts.tsv", sep="\t")
    lattice = (EXTENT_MM * 1000) ** 2 / (100 * 100 * np.sqrt(3) / 2)
    assert 0.4 * lattice < len(cnts) < 0.95 * lattice
    totals = cnts.iloc[:, 1:].sum(1)
    assert (totals > 0).all() and totals.median() > 200


def test_expression_follows_cell_types(sim):
    """Marker genes are highest in super-pixels of their region: the histology carries signal."""
    ad = _truth(sim)
    X = _dense(ad.X)
    region = ad.obs["region"].astype(str).to_numpy()
    groups = ad.var["group"].astype(str).to_numpy()
    tum = X[:, groups == "TUMOUR"].sum(1)
    imm = X[:, groups == "IMMUNE"].sum(1)
    assert tum[region == "tumour"].mean() > 3 * tum[region == "stroma"].mean()
    if (region == "immune_aggregate").sum() > 5:
        assert imm[region == "immune_aggregate"].mean() > 3 * imm[region == "tumour"].mean()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "utils.simulate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs(tmp_path):
    d = tmp_path / "cli"
    p = _cli("--directory", d, "--size", "small", "--seed", "1", "--extent-mm", "0.4", "--n-genes", "20", "-q")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _files(d) == sorted(RAW_FILES + TRUTH_FILES)
    assert pd.read_csv(d / "cnts.tsv", sep="\t").shape[1] == 21


@pytest.mark.parametrize("args, fragment", [
    (["--size", "huge"], "--size"),
    (["--pixel-size", "0"], "--pixel-size"),
    (["--n-genes", "3"], "--n-genes"),
    (["--seed", "abc"], "--seed"),
])
def test_cli_user_errors(tmp_path, args, fragment):
    p = _cli("--directory", tmp_path / "x", *args)
    assert_user_error(p, fragment)
    assert not (tmp_path / "x" / "he-raw.tif").exists()


def test_refuses_folder_of_another_data_set(tmp_path):
    from utils.core.errors import InputError
    (tmp_path / "he-raw.jpg").write_bytes(b"not ours")
    with pytest.raises(InputError, match="he-raw.jpg"):
        simulate(tmp_path, size="small", seed=0, extent_mm=0.4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["he-raw.jpg"]


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path):
    """The image is a sparse memory map: its blocks are reserved first, so a disk too small for it
    is the one-line error, not a SIGBUS on the first page written (a CI run died of that)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        p = _cli("--directory", disk / "d", "--size", "small", "--extent-mm", "0.4", "--n-genes", "20", "-q")
        assert_user_error(p, "disk is full")
        assert list(disk.rglob("*")) in ([], [disk / "d"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_help_lists_options():
    p = _cli("--help")
    assert p.returncode == 0
    for opt in ["--directory", "--size", "--seed", "--pixel-size", "--n-genes", "--quiet"]:
        assert opt in p.stdout
    assert "--extent-mm" not in p.stdout


def test_strips_join_without_seams(monkeypatch):
    """The image is rendered in strips; apart from the white pixel noise, the strip height must not
    change a single pixel (no seams where strips meet)."""
    from utils.simulate import cells as C
    from utils.simulate import render
    from utils.simulate.world import World
    monkeypatch.setattr(render, "PIXEL_NOISE", 0.0)
    world = World(5, 450.0)
    cells = C.make_cells(world, 5)
    membranes, _ = C.adipocyte_geometry(world, cells, 5)
    r = render.Renderer(world, cells, render.make_fibres(world, 5), membranes, PX, (1500, 1500), 5)
    a = np.concatenate([r.render(y, min(1500, y + 512), k) for k, y in enumerate(range(0, 1500, 512))])
    b = np.concatenate([r.render(y, min(1500, y + 237), k) for k, y in enumerate(range(0, 1500, 237))])
    np.testing.assert_array_equal(a, b)


def test_large_layout_writes_sparse_truth(tmp_path, monkeypatch):
    """Above DENSE_LIMIT (the large size) the truth is CSR float32; spots still sum it exactly."""
    import scipy.sparse

    from utils.simulate import simulation as S
    monkeypatch.setattr(S, "DENSE_LIMIT", 0)
    d = tmp_path / "sparse"
    S.simulate(d, size="small", seed=2, n_genes=20, extent_mm=0.5, progress=False)
    ad = _truth(d)
    assert scipy.sparse.issparse(ad.X) and ad.X.format == "csr" and ad.X.dtype == np.float32
    cnts = pd.read_csv(d / "cnts.tsv", sep="\t", index_col=0)
    locs = pd.read_csv(d / "locs-raw.tsv", sep="\t", index_col=0)
    grid = tuple(ad.uns["grid_shape"])
    index = np.full(grid, -1)
    index[ad.obs["row"].to_numpy(), ad.obs["col"].to_numpy()] = np.arange(ad.n_obs)
    X = ad.X.toarray()
    s = geo.calibration_scale(PX)
    for spot, (x, y) in locs[["x", "y"]].iterrows():
        t = index[geo.footprint(x * s, y * s, 55.0, grid)]
        np.testing.assert_array_equal(cnts.loc[spot].to_numpy(), X[t[t >= 0]].sum(0))
