"""Cross-fitting (utils/superres/crossval.py): folds that partition the spots, a leave-one-out
interpolation reference that never sees the spot itself, out-of-fold predictions from the state
that held each spot out, and the per-run accuracy outputs of HISTEX.py."""
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import copy_demo, hex_lattice, run_script

from utils.evaluation.metrics import pearson_per_gene
from utils.superres.crossval import gene_accuracy, leave_one_out_interpolation, out_of_fold_scaled, spot_folds, summary

FAST = ["--epochs", "4", "--n-states", "2", "--lr", "1e-3", "--threads", "1", "-q"]


def test_folds_partition_the_spots_and_are_seeded():
    folds = spot_folds(103, 5, seed=7)
    together = np.concatenate(folds)
    assert len(folds) == 5 and sorted(together) == list(range(103))
    assert {len(f) for f in folds} <= {20, 21}
    assert all(np.array_equal(a, b) for a, b in zip(folds, spot_folds(103, 5, seed=7)))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, spot_folds(103, 5, seed=8)))
    assert spot_folds(9, 5, seed=0) is None and spot_folds(50, 1, seed=0) is None


def test_leave_one_out_interpolation_never_uses_the_spot_itself():
    xy = hex_lattice(6, 5, 100.0)
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, (len(xy), 3)).astype(np.float32)
    spike = counts.copy()
    spike[7] = 1e6  # a spot's own value must not reach its own prediction
    a = leave_one_out_interpolation(counts, xy, 50.0)
    b = leave_one_out_interpolation(spike, xy, 50.0)
    assert np.allclose(a[7], b[7]) and (b[np.arange(len(xy)) != 7].max() > 1e3)
    const = np.full((len(xy), 2), 4.0, np.float32)
    np.testing.assert_allclose(leave_one_out_interpolation(const, xy, 50.0), 4.0, rtol=1e-6)
    far = np.array([[0.0, 0.0], [1e5, 0.0], [1e5, 100.0]])  # an isolated spot takes its nearest other spot
    np.testing.assert_allclose(leave_one_out_interpolation(np.array([[1.0], [2.0], [3.0]]), far, 10.0)[0], [2.0])


class _Constant(torch.nn.Module):
    """A stand-in state that predicts the value v everywhere (T tokens, G genes)."""
    use_gene_tokens = False

    def __init__(self, v, g):
        super().__init__()
        self.v, self.g = v, g

    def forward(self, hist, genes, offs, hidden, keep=None):
        n, t = keep.shape
        return torch.full((n, t, self.g), self.v)


def test_each_spot_is_predicted_by_the_state_that_held_it_out():
    n, t, g = 12, 9, 2
    data = {"hist": {"micro": np.zeros((n, t, 1), np.float32)}, "fp": np.ones((n, t), np.float32),
            "target": np.zeros((n, g), np.float32)}
    folds = [np.array([0, 5, 9, 11]), np.array([1, 2, 3, 4]), np.array([6, 7, 8, 10])]
    out = out_of_fold_scaled([_Constant(float(s), g) for s in range(3)], folds, data, "cpu")
    for s, f in enumerate(folds):
        assert (out[f] == s).all()


def test_gene_accuracy_table_and_summary():
    rng = np.random.default_rng(1)
    measured = rng.poisson(20, (60, 4)).astype(float)
    good = measured * rng.uniform(0.9, 1.1, measured.shape)
    noise = rng.poisson(20, (60, 4)).astype(float)
    table = gene_accuracy(measured, good, noise, ["A", "B", "C", "D"])
    assert list(table.columns) == ["gene", "cv_pearson", "cv_pearson_reference", "mean_count", "log1p_variance"]
    assert table["cv_pearson"].is_monotonic_decreasing and (table["cv_pearson"] > 0.8).all()
    assert (table["cv_pearson_reference"].abs() < 0.5).all()
    s = summary(table, n_genes=2)
    assert s["n_genes"] == 2 and s["n_spots"] == 60 and s["pearson_median"] > s["reference_pearson_median"]


@pytest.fixture(scope="module")
def demo(demo_upstream, tmp_path_factory):
    return copy_demo(demo_upstream, tmp_path_factory.mktemp("cv") / "small")


def test_histex_measures_itself(demo):
    r = run_script("HISTEX.py", demo, *FAST[:-1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cross-validated accuracy (out-of-fold, spot level" in r.stderr
    out = demo / "results" / "trihrge"
    run = json.loads((out / "run.json").read_text())
    cv = run["cross_validation"]
    spots = anndata.read_h5ad(demo / "spots.h5ad")
    assert cv["n_spots"] == spots.n_obs and cv["n_genes"] == min(100, spots.n_vars)
    assert -1 <= cv["pearson_median"] <= 1 and -1 <= cv["reference_pearson_median"] <= 1
    table = pd.read_csv(out / "genes-accuracy.tsv", sep="\t")
    assert len(table) == spots.n_vars and table["cv_pearson"].is_monotonic_decreasing
    # the default fusion: near spots a per-gene blend with the interpolation (weights in [0, 1] per
    # gene), between them the stacking of the image model, the consistent map and the interpolation
    blend, stack = run["fusion"]["blend"], run["fusion"]["stack"]
    assert 0 <= blend["pooled_weight"] <= 1 and table["blend_weight"].between(0, 1).all()
    assert "cv_pearson_model" in table.columns and blend["n_spots"] == stack["n_spots"] == spots.n_obs
    assert run["consistency_kernel"] == {"sigma_spacings": 0.5, "chosen_by": "--sigma"}  # the choice is opt-in
    var = anndata.read_h5ad(out / "super-res.h5ad", backed="r").var
    np.testing.assert_allclose(var.loc[table["gene"], "cv_pearson"], table["cv_pearson"], atol=1e-4)
    # spots-pred.h5ad keeps the out-of-fold counts the table scores, so a user can score any gene set
    pred = anndata.read_h5ad(out / "spots-pred.h5ad")
    oof = pd.DataFrame(pred.layers["out_of_fold"], columns=pred.var_names)[table["gene"]].to_numpy(np.float64)
    meas = pd.DataFrame(pred.layers["measured"], columns=pred.var_names)[table["gene"]].to_numpy(np.float64)
    np.testing.assert_allclose(pearson_per_gene(np.log1p(np.clip(oof, 0, None)), np.log1p(meas)), table["cv_pearson"],
                               atol=1e-4)
    # the two states held out the two folds: together every spot once
    held = [json.loads((out / "states" / f"state-0{i}.json").read_text())["val_spots"] for i in range(2)]
    assert sum(held) == spots.n_obs


def test_no_fusion_and_the_chosen_consistency_width(demo, tmp_path):
    r = run_script("HISTEX.py", demo, *FAST, "--fusion", "none", "--choose-consistency-sigma", "--out", tmp_path / "f")
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((tmp_path / "f" / "run.json").read_text())
    table = pd.read_csv(tmp_path / "f" / "genes-accuracy.tsv", sep="\t")
    assert run["fusion"] is None and "blend_weight" not in table.columns
    kernel = run["consistency_kernel"]  # the local consistency's width, chosen by the out-of-fold spots
    assert kernel["chosen_by"].startswith("out-of-fold") and str(kernel["sigma_spacings"]) in kernel["median_pearson_by_sigma"]


def test_no_cross_fit_and_the_interpolation(demo, tmp_path):
    r = run_script("HISTEX.py", demo, *FAST, "--no-cross-fit", "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "a" / "run.json").read_text())["cross_validation"] is None
    assert not (tmp_path / "a" / "genes-accuracy.tsv").exists()
    assert "out_of_fold" not in anndata.read_h5ad(tmp_path / "a" / "spots-pred.h5ad").layers
    r = run_script("HISTEX.py", demo, "--model", "interp", "-q", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr[-2000:]
    cv = json.loads((tmp_path / "b" / "run.json").read_text())["cross_validation"]
    assert cv["pearson_median"] == cv["reference_pearson_median"]


def test_blend_weights_follow_the_evidence_and_shrink():
    from utils.superres.fusion import blend_maps, blend_weights
    rng = np.random.default_rng(2)
    n = 200
    measured = rng.poisson(30, (n, 3)).astype(float)
    reference = np.full((n, 3), 30.0) + rng.normal(0, 1, (n, 3))
    model = np.stack([measured[:, 0] + rng.normal(0, 1, n),     # the image knows gene 0
                      rng.poisson(30, n).astype(float),          # and nothing of gene 1
                      reference[:, 2] + 1e-3], 1)                # gene 2: no evidence either way
    a, record = blend_weights(measured, model, reference)
    assert a[0] > 0.8 and a[1] < 0.2
    assert abs(a[2] - record["pooled_weight"]) < 0.05  # little evidence: the pooled weight
    assert 0 <= record["pooled_weight"] <= 1 and record["n_spots"] == n
    sr = np.ones((4, 3), np.float32)
    kernel = np.full((4, 2), 0.5)
    blend_maps(sr, a, kernel, np.array([[4.0, 4.0, 4.0], [8.0, 8.0, 8.0]]) / 2.0)
    np.testing.assert_allclose(sr, np.tile(a * 1 + (1 - a) * 3.0, (4, 1)), rtol=1e-6)


def test_consistency_width_is_chosen_by_the_out_of_fold_spots():
    from utils.superres.fusion import choose_consistency_sigma
    xy = hex_lattice(14, 12, 100.0)
    rng = np.random.default_rng(3)
    measured = rng.poisson(rng.uniform(5, 60, (len(xy), 8))).astype(float)
    bias = np.exp(np.sin(xy[:, :1] / 400.0))                      # a smooth error of the model
    oof = measured * bias * rng.lognormal(0, 0.05, measured.shape)
    predicted = measured * bias * rng.lognormal(0, 0.6, measured.shape)  # noisy in-sample ratios
    s, record = choose_consistency_sigma(measured, oof, predicted, xy, 100.0, default=0.5)
    assert s > 0.5 and record["median_pearson_by_sigma"][s] > record["median_pearson_by_sigma"][0.5]
    # nothing to correct: every width scores the same and the default stays
    s, _ = choose_consistency_sigma(measured, measured, measured, xy, 100.0, default=0.5)
    assert s == 0.5


def test_out_of_fold_spots_get_the_consistency_of_the_other_spots():
    from utils.superres.fusion import consistent_oof, leave_one_out_factors
    xy = hex_lattice(8, 7, 100.0)
    rng = np.random.default_rng(5)
    measured = rng.poisson(rng.uniform(5, 60, (len(xy), 4))).astype(float)
    oof = measured * rng.lognormal(0, 0.3, measured.shape)
    predicted = measured * rng.lognormal(0, 0.3, measured.shape)
    spiked = measured.copy()
    spiked[7] *= 50  # a spot's own count must not reach its own correction
    f, g = leave_one_out_factors(measured, predicted, xy, 120.0), leave_one_out_factors(spiked, predicted, xy, 120.0)
    np.testing.assert_allclose(f[7], g[7], rtol=1e-6)
    assert not np.allclose(f[np.arange(len(xy)) != 7], g[np.arange(len(xy)) != 7])
    np.testing.assert_array_equal(consistent_oof(oof, measured, predicted, xy, 120.0, "none"), oof)
    for mode in ("local", "global"):  # the maps' totals are restored per gene, and so are these
        out = consistent_oof(oof, measured, predicted, xy, 120.0, mode)
        np.testing.assert_allclose(out.sum(0), measured.sum(0), rtol=1e-5)


def test_the_blend_keeps_the_within_spot_detail():
    import scipy.sparse as sp

    from utils.superres.fusion import Detail, blend_maps
    rows, cols = np.nonzero(np.ones((24, 24), bool))
    checker = np.where((rows + cols) % 2 == 0, 1.5, 0.5)           # super-pixel detail, mean 1
    level = 10.0 + 0.2 * rows                                        # a smooth spot-level trend
    sr = np.stack([level * checker, level], 1).astype(np.float32)   # gene 0 with detail, gene 1 without
    kernel = sp.csr_matrix(np.ones((len(rows), 1)))                  # the interpolation: one spot, everywhere
    counts, a = np.array([[40.0, 40.0]]), np.zeros(2, np.float32)    # all weight on the interpolation
    out = blend_maps(sr.copy(), a, kernel, counts / 2.0, detail=Detail(rows, cols, (24, 24), 1.5))
    inner = (rows > 4) & (rows < 19) & (cols > 4) & (cols < 19)
    np.testing.assert_allclose(out[inner, 0] / 20.0, checker[inner], rtol=0.05)  # the checker survives
    np.testing.assert_allclose(out[inner, 1], 20.0, rtol=0.02)                    # a flat map stays flat
    linear = blend_maps(sr.copy(), a, kernel, counts / 2.0)
    np.testing.assert_allclose(linear[:, 0], 20.0, rtol=1e-6)                     # the plain blend loses it


@pytest.mark.parametrize("n_genes", [1, 3])
def test_detail_smoothing_is_scipys_normalised_gaussian_over_the_tissue(n_genes):
    """Detail.smoothed (OpenCV, on the tissue's bounding box) equals scipy's gaussian_filter of the
    whole grid, normalised by the smoothed tissue mask, at the tissue super-pixels."""
    from scipy.ndimage import gaussian_filter

    from utils.superres.fusion import Detail
    rng = np.random.default_rng(5)
    mask = np.zeros((30, 26), bool)
    mask[6:25, 4:20] = rng.random((19, 16)) < 0.8
    rows, cols = np.nonzero(mask)
    values = rng.random((len(rows), n_genes)).astype(np.float32)
    got = Detail(rows, cols, mask.shape, 1.7).smoothed(values)
    weight = gaussian_filter(mask.astype(np.float32), 1.7, mode="constant")[rows, cols]
    for g in range(n_genes):
        grid = np.zeros(mask.shape, np.float32)
        grid[rows, cols] = values[:, g]
        want = gaussian_filter(grid, 1.7, mode="constant")[rows, cols] / weight
        np.testing.assert_allclose(got[:, g], want, rtol=1e-5, atol=1e-6)
