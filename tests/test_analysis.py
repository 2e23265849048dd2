"""python -m utils.analysis: domains, cell types, gene sets, SpatialData export, and its errors."""
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import NOT_PREDICTED, interp_run, marker_tsv  # noqa: F401  (fixture)
from conftest import REPO, assert_user_error, snapshot

from utils.scverse.keys import File, Key


def analyse(*args):
    e = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "utils.analysis", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=e, timeout=600)


@pytest.fixture(scope="module")
def analysed(interp_run, tmp_path_factory):  # noqa: F811
    d, run_dir = interp_run
    tsv = marker_tsv(d, tmp_path_factory.mktemp("markers") / "markers.tsv")
    genes = list(anndata.read_h5ad(run_dir / "super-res.h5ad", backed="r").var_names)
    r = analyse(run_dir, "--markers", tsv, "--n-domains", 4, "--smooth", 1, "--gene-set", f"S1={genes[0]},{genes[1]}",
                "--export", "spatialdata")
    assert r.returncode == 0, r.stderr[-3000:]
    return d, run_dir, r, genes


def test_outputs(analysed):
    d, run_dir, r, _ = analysed
    out = run_dir / File.ANALYSIS_DIR
    an = anndata.read_h5ad(out / File.ANALYSIS_H5AD)
    sr = anndata.read_h5ad(run_dir / "super-res.h5ad", backed="r")
    assert list(an.obs_names) == list(sr.obs_names)
    assert list(an.obs[Key.DOMAIN].cat.categories) == ["1", "2", "3", "4"]
    sizes = an.obs[Key.DOMAIN].value_counts().sort_index().to_numpy()
    assert (np.diff(sizes) <= 0).all()                     # numbered by decreasing size
    assert set(an.obs[Key.CELL_TYPE].cat.categories) >= {"tumour", "fibroblast", Key.UNASSIGNED}
    assert {"score_tumour", Key.CELL_TYPE_CONFIDENCE, "gene_set_S1"} <= set(an.obs)
    # the labels follow the markers: where the tumour score is highest, the label is tumour
    top = an.obs["score_tumour"] >= an.obs["score_tumour"].quantile(0.99)
    assert (an.obs.loc[top, Key.CELL_TYPE] == "tumour").mean() > 0.8
    markers = pd.read_csv(out / File.DOMAIN_MARKERS, sep="\t", dtype={Key.DOMAIN: str})
    assert set(markers[Key.DOMAIN]) == {"1", "2", "3", "4"} and markers["gene"].isin(sr.var_names).all()
    # a marker the run does not predict is reported, in the table, analysis.json and the log
    table = pd.read_csv(out / File.CELL_TYPE_MARKERS, sep="\t")
    assert not table.loc[table["gene"] == NOT_PREDICTED, "predicted"].item()
    assert NOT_PREDICTED in (out / File.ANALYSIS_JSON).read_text() and NOT_PREDICTED in r.stderr
    for name in (File.DOMAIN_MAP, File.CELL_TYPE_MAP, File.GENE_SET_MAP.format("S1")):
        assert (out / name).stat().st_size > 10_000
    assert "Analysis of the super-pixels" in (run_dir / File.REPORT).read_text()
    assert not [p for p in run_dir.rglob(".trihrge-tmp*")]


def test_plots_in_scanpy(analysed):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    an = anndata.read_h5ad(analysed[1] / File.ANALYSIS_DIR / File.ANALYSIS_H5AD)
    sc.pl.spatial(an, color=[Key.DOMAIN, Key.CELL_TYPE], show=False)
    plt.close("all")


def test_spatialdata_export(analysed):
    sd = pytest.importorskip("spatialdata")
    run_dir = analysed[1]
    s = sd.read_zarr(run_dir / File.ANALYSIS_DIR / File.SPATIALDATA)
    assert list(s.images) == ["he"] and list(s.shapes) == ["superpixels"]
    shapes, table = s.shapes["superpixels"], s.tables["table"]
    assert len(shapes) == table.n_obs == anndata.read_h5ad(run_dir / "super-res.h5ad", backed="r").n_obs
    assert (shapes.geometry.geom_type == "Polygon").all()
    side = np.sqrt(shapes.geometry.area.to_numpy())
    assert np.allclose(side, 8 / 0.3, rtol=1e-6)            # 8 um squares at the demo's 0.3 um/px
    assert Key.DOMAIN in table.obs
    colours = list(table.uns[f"{Key.DOMAIN}_colors"])       # spatialdata-plot colours the domains as domains.png
    an = anndata.read_h5ad(run_dir / File.ANALYSIS_DIR / File.ANALYSIS_H5AD)
    assert colours == list(an.uns[f"{Key.DOMAIN}_colors"]) and len(colours) == table.obs[Key.DOMAIN].nunique()
    assert "Warning" not in analysed[2].stderr            # libraries' notices (zarr, spatialdata) kept out of the log


def test_spots_input(analysed, tmp_path):
    run_dir = analysed[1]
    r = analyse(run_dir, "--input", "spots", "--markers", "none", "--n-domains", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    an = anndata.read_h5ad(run_dir / File.ANALYSIS_SPOTS_DIR / File.ANALYSIS_H5AD)
    assert an.obs[Key.DOMAIN].nunique() == 3 and Key.CELL_TYPE not in an.obs
    assert (run_dir / File.ANALYSIS_SPOTS_DIR / File.DOMAIN_MAP).is_file()


def test_errors_are_one_line_and_change_nothing(analysed, tmp_path):
    d, run_dir, _, genes = analysed
    before = snapshot(d)
    bad = tmp_path / "bad.tsv"
    bad.write_text("tumour\tA\tB\n")
    cases = [((tmp_path / "nope",), "not found"),
             ((tmp_path,), "super-res.h5ad: not found"),
             ((run_dir, "--gene-set", f"X={genes[0]},NOPE9"), "NOPE9"),
             ((run_dir, "--gene-set", "X="), "NAME=GENE1"),
             ((run_dir, "--gene-set", f"X={genes[0]}", "--gene-set", f"X={genes[1]}"), "the name is taken by"),
             ((run_dir, "--gene-set", f"A={genes[0]}", "--gene-set", f"a={genes[1]}"), "differ only in case"),
             ((run_dir, "--n-domains", 1), "--n-domains"),
             ((run_dir, "--markers", bad), "line 1 has 3"),
             ((run_dir, "--markers", tmp_path / "missing.tsv"), "missing.tsv: not found"),
             ((run_dir, "--markers", "breat"), "neither a built-in panel")]
    for args, fragment in cases:
        assert_user_error(analyse(*args), fragment)
    assert snapshot(d) == before


def test_functions_are_seeded_and_find_planted_structure():
    """Two planted groups of observations on a grid: the domains and the cell types recover them."""
    from sklearn.metrics import adjusted_rand_score

    from utils.analysis.celltypes import score_cell_types
    from utils.analysis.domains import cluster, embed, smooth
    from utils.analysis.preprocess import normalise_log
    rng = np.random.default_rng(0)
    n, g = 400, 30
    rows, cols = np.divmod(np.arange(n), 20)
    truth = (cols >= 10).astype(int)
    lam = np.full((n, g), 2.0)
    lam[truth == 0, :5] = 20.0
    lam[truth == 1, 5:10] = 20.0
    ad = anndata.AnnData(X=rng.poisson(lam).astype(np.float32), obs=pd.DataFrame({"row": rows, "col": cols},
                         index=[f"o{i}" for i in range(n)]), var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    ad.obsm[Key.SPATIAL] = np.c_[cols, rows].astype(float)
    labels = []
    for _ in range(2):
        a = ad.copy()
        normalise_log(a)
        embed(a, n_pcs=5, seed=1)
        cluster(a, n_domains=2, rep=smooth(a, rings=1), seed=1)
        labels.append(a.obs[Key.DOMAIN].to_numpy())
        score_cell_types(a, panel={"A": ["G0", "G1", "G2"], "B": ["G5", "G6", "NOPE"]}, seed=1)
    assert (labels[0] == labels[1]).all()
    assert adjusted_rand_score(truth, labels[0]) == 1.0
    cluster(a, method="leiden", resolution=0.1, rep="X_pca", seed=1)
    assert adjusted_rand_score(truth, a.obs[Key.DOMAIN]) > 0.9
    assert (a.obs[Key.CELL_TYPE].astype(str).to_numpy() == np.where(truth == 0, "A", "B")).mean() > 0.95


def test_leiden_above_scanpys_exact_search_size():
    """Above 8,192 observations scanpy searches neighbours with pynndescent, whose 0.7 release
    returns a sparse array that scanpy 1.11 cannot read (AttributeError: no getnnz): --method leiden
    failed on every section of a realistic size."""
    from sklearn.metrics import adjusted_rand_score

    from utils.analysis.domains import EXACT_KNN_MAX_OBS, cluster
    rng = np.random.default_rng(0)
    truth = np.arange(EXACT_KNN_MAX_OBS + 100) % 2
    ad = anndata.AnnData(np.zeros((len(truth), 1), np.float32))
    ad.obsm["rep"] = (rng.normal(size=(len(truth), 5)) + 8.0 * truth[:, None]).astype(np.float32)
    cluster(ad, method="leiden", resolution=0.1, rep="rep", seed=1)
    assert adjusted_rand_score(truth, ad.obs[Key.DOMAIN]) > 0.99


def test_users_own_scanpy_neighbours_above_the_exact_search_size():
    """What a user runs on the maps: sc.pp.neighbors with scanpy's defaults on 8,192 or more
    observations (pynndescent). The pinned pynndescent (< 0.7) returns what scanpy 1.11 reads."""
    import scanpy as sc

    from utils.analysis.domains import EXACT_KNN_MAX_OBS
    rep = np.random.default_rng(0).normal(size=(EXACT_KNN_MAX_OBS + 100, 5)).astype(np.float32)
    ad = anndata.AnnData(np.zeros((len(rep), 1), np.float32), obsm={"X_pca": rep})
    sc.pp.neighbors(ad, n_neighbors=15, use_rep="X_pca", random_state=0)
    assert ad.obsp["connectivities"].shape == (len(rep), len(rep)) and ad.obsp["distances"].nnz >= 14 * len(rep)


def test_markers_not_predicted_are_named_per_type_or_in_one_line(caplog):
    from utils.analysis.celltypes import BREAST_PANEL, panel_table, report_missing
    with caplog.at_level("WARNING", logger="trihrge"):
        report_missing(panel_table(BREAST_PANEL, ["G1", "G2"]), source="built-in breast panel")
    assert len(caplog.records) == 1 and "none of its" in caplog.text and "--markers FILE" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trihrge"):
        report_missing(panel_table(BREAST_PANEL, ["EPCAM", "KRT8", "CD3D"]), source="p")
    assert "cell type epithelial: 3 of 5 markers not predicted (KRT18, KRT19, CDH1)" in caplog.text
    assert "cell type T_cell: 4 of 5" in caplog.text and "cell type B_cell: 4 of 4" in caplog.text


def test_missing_spatialdata_is_one_clear_error(monkeypatch):
    from utils.core.errors import InputError
    from utils.scverse.spatialdata import require_spatialdata
    monkeypatch.setitem(sys.modules, "spatialdata", None)      # import fails as if not installed
    with pytest.raises(InputError, match="spatialdata package is not installed"):
        require_spatialdata()


def _damaged_run(run_dir, dst, edit):
    import shutil
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("analysis", "states"))
    ad = anndata.read_h5ad(dst / "super-res.h5ad")
    edit(ad)
    ad.write_h5ad(dst / "super-res.h5ad")
    return dst


def _set_obs(key, value):
    def edit(ad):
        v = ad.obs[key].astype(str if isinstance(value, str) else float).to_numpy()
        v[0] = value
        ad.obs[key] = v
    return edit


def _nan_in_x(ad):
    X = np.asarray(ad.X).copy()
    X[3, 1] = np.nan
    ad.X = X


@pytest.mark.parametrize("edit, fragment", [(_set_obs("row", "7"), "obs 'row' is not whole numbers"),
                                            (_set_obs("row", np.nan), "obs 'row' is not whole numbers"),
                                            (_set_obs("col", 1e12), "beyond the H&E image"),
                                            (_nan_in_x, "X holds 1 NaN or infinite value")],
                         ids=["row-text", "row-nan", "col-huge", "x-nan"])
def test_a_damaged_super_res_is_one_line_for_analysis_and_score(interp_run, tmp_path, edit, fragment):  # noqa: F811
    """They were tracebacks (TypeError, a 669 TiB allocation, sklearn's NaN check), and score took
    the NaN without a word."""
    d, run_dir = interp_run
    bad = _damaged_run(run_dir, tmp_path / "bad", edit)
    before = snapshot(bad)
    assert_user_error(analyse(bad), fragment)
    r = subprocess.run([sys.executable, "-m", "utils.score", str(bad), "--truth", str(d / "truth" / "super.h5ad")],
                       cwd=REPO, capture_output=True, text=True)
    if "beyond" in fragment:    # a super-pixel off the truth's grid is never scored: score works
        assert r.returncode == 0, r.stderr
    else:
        assert_user_error(r, fragment)
    assert snapshot(bad) == before


def test_leiden_refuses_a_resolution_that_splits_every_observation():
    from utils.analysis.domains import MAX_DOMAINS, cluster
    from utils.core.errors import InputError
    rng = np.random.default_rng(0)
    ad = anndata.AnnData(np.zeros((400, 1), np.float32))
    ad.obsm["rep"] = rng.normal(size=(400, 5)).astype(np.float32)
    with pytest.raises(InputError, match=f"more than the {MAX_DOMAINS} a map can show"):
        cluster(ad, method="leiden", resolution=1e308, rep="rep", seed=1)


@pytest.mark.parametrize("n_genes", [20, 50, 100, 250, 300, 1000, 2000, 18000])
def test_control_bins_leave_the_most_expressed_gene_company(n_genes):
    """scanpy.tl.score_genes found no control for a set of the single most expressed of 300 genes
    (its last expression bin held that gene alone): the bins are chosen so that it never does."""
    from utils.analysis.genesets import control_bins, score
    rng = np.random.default_rng(0)
    ad = anndata.AnnData(np.log1p(rng.poisson(np.linspace(0.1, 50, n_genes), size=(60, n_genes))).astype(np.float32))
    ad.var_names = [f"G{i}" for i in range(n_genes)]
    score(ad, genes=[f"G{n_genes - 1}"], key="top")
    assert np.isfinite(ad.obs["top"]).all() and 2 <= control_bins(n_genes) <= 25


def test_a_run_in_use_is_refused_before_it_is_read(interp_run, tmp_path):  # noqa: F811
    """analysis and score --write lock DIR before they read the run (a HISTEX.py rerun replacing it
    in between gave an analysis of the old maps recorded as of the new ones); a run written with
    HISTEX.py --out elsewhere is locked as a folder of its own."""
    from utils.core.stage import DirectoryLock
    d, run_dir = interp_run
    before = snapshot(run_dir)
    import shutil
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir, elsewhere, ignore=shutil.ignore_patterns("analysis", "states"))
    free = snapshot(elsewhere)
    lock = DirectoryLock(d, "HISTEX.py").acquire()
    try:
        assert_user_error(analyse(run_dir), "in use by HISTEX.py")
        r = subprocess.run([sys.executable, "-m", "utils.score", "--write", str(elsewhere), str(run_dir), "--truth",
                            str(d / "truth" / "super.h5ad")], cwd=REPO, capture_output=True, text=True)
        assert_user_error(r, "in use by HISTEX.py")     # and the free run's metrics were not written first
    finally:
        lock.release()
    assert snapshot(run_dir) == before and snapshot(elsewhere) == free
    other = tmp_path / "other-dir"
    other.mkdir()
    shutil.copy(d / "calibration.json", other)
    assert_user_error(analyse(run_dir, "--directory", other), f"belongs to {d.resolve()}")
    lock = DirectoryLock(elsewhere, "HISTEX.py").acquire()
    try:
        assert_user_error(analyse(elsewhere, "--directory", d), "in use by HISTEX.py")
    finally:
        lock.release()
