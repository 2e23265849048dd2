"""End to end on a small simulated tissue: the five stages as a user runs them, outputs that open in
anndata, scores against the truth, determinism, resume of an interrupted run, stale-input refusal."""
import json
import shutil

import anndata
import numpy as np
import pytest
import torch
from conftest import assert_user_error, copy_demo, run_script

FAST = ["--epochs", "4", "--n-states", "2", "--lr", "1e-3", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def demo(demo_upstream, tmp_path_factory):
    return copy_demo(demo_upstream, tmp_path_factory.mktemp("demo") / "small")


def test_histex_end_to_end(demo):
    r = run_script("HISTEX.py", demo, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    out = demo / "results" / "trihrge"
    sr = anndata.read_h5ad(out / "super-res.h5ad")
    truth = anndata.read_h5ad(demo / "truth" / "super.h5ad")
    for c in ("row", "col", "x", "y"):
        assert c in sr.obs
    assert sr.n_vars == 40 and sr.X.dtype == np.float32 and np.isfinite(sr.X).all() and (sr.X >= 0).all()
    # the centre of super-pixel (row, col) in raw pixels, as in the truth
    both = sr.obs.merge(truth.obs, on=["row", "col"], suffixes=("", "_t"))
    assert len(both) > 0.8 * truth.n_obs
    np.testing.assert_allclose(both["x"], both["x_t"], rtol=1e-6)
    spots = anndata.read_h5ad(out / "spots-pred.h5ad")
    measured = spots.layers["measured"].sum()
    assert 0.8 < spots.X.sum() / measured < 1.25  # spots' super-pixels sum to about their counts
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["summary"]) == {"pearson", "ssim", "rmse"} and len(m["per_gene"]["pearson"]) == 40
    assert m["summary"]["pearson"]["median"] > 0.05
    assert len(list((out / "maps").glob("*.png"))) == 4 and (out / "loss.png").is_file()
    hist = [json.loads((out / "states" / f"state-0{i}.json").read_text())["loss_history"] for i in range(2)]
    assert all(h[-1] < h[0] for h in hist)  # training reduces the loss
    assert (demo / "manifests" / "HISTEX.json").is_file()


@pytest.mark.parametrize("model", ["mlp", "interp"])
def test_baselines_run_through_the_same_outputs(demo, model):
    r = run_script("HISTEX.py", demo, "--model", model, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    out = demo / "results" / model
    assert anndata.read_h5ad(out / "super-res.h5ad").n_vars == 40
    assert (out / "metrics.json").is_file()


def test_residual_network_corrects_the_interpolation(demo, tmp_path):
    """--residual: signed network, trained on the spots minus their leave-one-out interpolation;
    maps non-negative, named <model>-resid, and without training epochs the correction is small."""
    r = run_script("HISTEX.py", demo, "--residual", "--model", "mlp", "--fusion", "none", "--spot-consistency", "none",
                   *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    out = demo / "results" / "mlp-resid"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model_opts"] == {"signed_output": True}
    sr = anndata.read_h5ad(out / "super-res.h5ad").X
    interp = run_script("HISTEX.py", demo, "--model", "interp", "--residual", "--out", tmp_path / "i", "-q")
    assert interp.returncode == 0, interp.stderr[-3000:]
    assert "--model interp ignores --residual" in interp.stderr   # the plain interpolation, said so
    ref = anndata.read_h5ad(tmp_path / "i" / "super-res.h5ad").X
    assert np.isfinite(sr).all() and (sr >= 0).all() and not np.allclose(sr, ref)
    # the correction moves the map less than the map's own spread around the interpolation's level
    assert np.median(np.abs(sr - ref)) < np.median(ref) + 1e-6


def test_standardized_features_are_recorded_and_name_the_run(demo):
    """--standardize-features: the states train on standardised windows (run <model>-std, recorded in
    run.json's config, so the states are not those of the plain run) and the map is a valid one."""
    r = run_script("HISTEX.py", demo, "--model", "mlp", "--standardize-features", "--fusion", "none", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    out = demo / "results" / "mlp-std"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["standardize_features"] is True
    sr = anndata.read_h5ad(out / "super-res.h5ad").X
    assert np.isfinite(sr).all() and (sr >= 0).all() and sr.std(0).min() > 0
    hist = [json.loads((out / "states" / f"state-0{i}.json").read_text())["loss_history"] for i in range(2)]
    assert all(h[-1] < h[0] for h in hist)


def test_deterministic_across_thread_counts_and_resumable(demo, tmp_path):
    """One thread (states one after another) and two (states in two worker processes, inference on
    two threads) train bit-identical states; the maps agree to float32 rounding (README)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script("HISTEX.py", demo, *FAST, "--out", a).returncode == 0
    two = [("2" if v == "1" and FAST[i - 1] == "--threads" else v) for i, v in enumerate(FAST)]
    r = run_script("HISTEX.py", demo, *two[:-1], "--out", b)
    assert r.returncode == 0 and "2 worker processes" in r.stderr, r.stderr[-2000:]
    for i in range(2):
        sa, sb = (torch.load(d / "states" / f"state-0{i}.pt", weights_only=True) for d in (a, b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    xa = anndata.read_h5ad(a / "super-res.h5ad").X
    np.testing.assert_allclose(xa, anndata.read_h5ad(b / "super-res.h5ad").X, rtol=1e-5, atol=1e-6)
    # an interrupted run: the second state never finished; the rerun trains only that one
    (b / "states" / "state-01.pt").unlink()
    (b / "states" / "state-01.json").unlink()
    r = run_script("HISTEX.py", demo, *FAST[:-1], "--out", b)
    assert r.returncode == 0 and "state 1/2: already trained" in r.stderr
    np.testing.assert_array_equal(xa, anndata.read_h5ad(b / "super-res.h5ad").X)


def test_stale_upstream_is_refused(demo, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(demo, d, ignore=shutil.ignore_patterns("results"))
    (d / "radius-raw.txt").write_text(str(float((d / "radius-raw.txt").read_text()) * 1.1))
    assert_user_error(run_script("HISTEX.py", d, *FAST), "radius-raw.txt", "image_calibration.py", "--force")
    # rerunning the stages downstream of the change gives a consistent directory again
    for s in ("image_calibration.py", "get_HR.py", "Histology_Extractor.py", "masking_non_tissue.py"):
        assert run_script(s, d, "-q").returncode == 0
    assert run_script("HISTEX.py", d, *FAST, "--model", "interp").returncode == 0


def test_bad_histex_options(demo):
    assert_user_error(run_script("HISTEX.py", demo, "--epochs", 0), "--epochs")
    assert_user_error(run_script("HISTEX.py", demo, "--token-mask", 2), "--token-mask")
    assert_user_error(run_script("HISTEX.py", demo, "--val-fraction", 0.7), "--val-fraction")
    assert_user_error(run_script("HISTEX.py", demo, "--patience", -1), "--patience")
    assert_user_error(run_script("HISTEX.py", demo, *FAST, "--plot-genes", "NOPE"), "NOPE")
