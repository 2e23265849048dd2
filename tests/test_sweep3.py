"""The third robustness sweep (docs/ROBUSTNESS.md, rows 201-): a black-box hunt for misleading error
lines, absurd values taken, and silent losses in the converters, get_HR, HISTEX, the analysis and
utils.score."""
import numpy as np
import pytest
from conftest import assert_user_error, run_script, snapshot, write_raw_dir


def test_a_broken_image_symlink_names_its_missing_target(tmp_path):
    """A converter's --image-mode symlink whose target moved read as 'he-raw.tif not found ... he-raw.tif
    is there: rename it to one of those names'."""
    d = write_raw_dir(tmp_path / "d", np.array([[100.0, 100.0], [200, 100], [150, 200]]), image_name=None)
    (d / "he-raw.tif").symlink_to(tmp_path / "moved.tif")
    before = snapshot(d)
    assert_user_error(run_script("image_calibration.py", d), "he-raw.tif", "symbolic link", "moved.tif",
                      "does not exist")
    assert snapshot(d) == before


def test_a_gene_measured_the_same_everywhere_has_no_accuracy():
    """A listed gene with 7 counts in every spot scored cv_pearson 0, its interpolation r = 1 (the
    rounding of a mean), and both counted in the run's median."""
    from utils.evaluation.metrics import pearson_per_gene
    from utils.superres.crossval import gene_accuracy, summary
    rng = np.random.default_rng(0)
    measured = np.column_stack([rng.poisson(5, 60), np.full(60, 7), np.zeros(60)]).astype(np.float64)
    predicted = measured + rng.normal(0, 1, measured.shape)
    reference = np.column_stack([measured[:, 0], np.full(60, 7.000001), np.zeros(60)])
    assert pearson_per_gene(np.log1p(np.full((60, 1), 7.0)), np.log1p(reference[:, 1:2])).tolist() == [0.0]
    table = gene_accuracy(measured, predicted, reference, ["VAR", "SEVEN", "ZERO"]).set_index("gene")
    assert np.isfinite(table.loc["VAR", "cv_pearson"])
    assert table.loc[["SEVEN", "ZERO"], ["cv_pearson", "cv_pearson_reference"]].isna().all().all()
    s = summary(table.reset_index())
    assert s["n_genes"] == 1 and s["pearson_median"] == table.loc["VAR", "cv_pearson"]


def test_get_hr_warns_about_listed_genes_that_never_vary(tmp_path):
    xy = np.array([[100.0, 100.0], [200, 100], [150, 200], [250, 200], [300, 100]])
    counts = np.column_stack([[1, 5, 2, 8, 3], [7] * 5])
    d = write_raw_dir(tmp_path / "d", xy, counts=counts, genes=["A", "FLAT"])
    assert run_script("image_calibration.py", d).returncode == 0
    (tmp_path / "genes.txt").write_text("A\nFLAT\n")
    r = run_script("get_HR.py", d, "--gene-list", tmp_path / "genes.txt")
    assert r.returncode == 0, r.stderr
    assert "1 listed gene(s) have the same count in every spot (FLAT)" in r.stderr


def test_the_clustering_option_a_method_does_not_read_gets_a_warning(caplog):
    """--method leiden --n-domains 9 ignored --n-domains without a word (and k-means --resolution)."""
    import logging

    from utils.analysis.cli import DEFAULT_DOMAINS, _domain_options, build_parser
    for argv, unused in ((["--method", "leiden", "--n-domains", "9"], "--n-domains"),
                         (["--resolution", "2"], "--resolution"), (["--method", "leiden"], None), ([], None)):
        args = build_parser().parse_args(["run", *argv])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trihrge"):
            _domain_options(args)
        assert (f"{unused} is not used by --method" in caplog.text) if unused else not caplog.text
        assert args.n_domains in (9, DEFAULT_DOMAINS) and args.resolution in (1.0, 2.0)


def test_a_map_of_many_domains_keeps_its_legend_and_warns_nothing(tmp_path, recwarn):
    import anndata
    import pandas as pd

    from utils.analysis.maps import label_map
    n = 40 * 40
    rows, cols = np.divmod(np.arange(n), 40)
    labels = pd.Categorical([f"d{i % 170}" for i in range(n)])
    ad = anndata.AnnData(X=np.zeros((n, 1), np.float32), obs=pd.DataFrame(
        {"row": rows, "col": cols, "domain": labels}, index=[str(i) for i in range(n)]))
    ad.obsm["spatial"] = np.c_[cols * 16.0 + 8, rows * 16.0 + 8]
    ad.uns["spatial"] = {"lib": {"images": {"hires": np.full((660, 660, 3), 0.9, np.float32)},
                                 "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0}}}
    label_map(ad, key="domain", path=tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0
    assert not [w for w in recwarn if "layout" in str(w.message).lower()]


def test_tile_options_given_to_the_stain_backbone_get_a_warning(caplog):
    """--shifts 1000000, --batch-size, --precision fp16 with the default stain backbone: exit 0, no word."""
    import logging

    from utils.histology.encoders import build_encoder
    with caplog.at_level(logging.WARNING, logger="trihrge"):
        build_encoder("stain")
        assert not caplog.text
        build_encoder("stain", shifts=1000000, batch_size=5, precision="fp16")
    assert "--shifts 1000000, --batch-size 5, --precision fp16: not used by the stain backbone" in caplog.text


def test_n_states_has_a_ceiling_and_too_many_folds_are_said(tmp_path):
    """--n-states 1000 on 171 spots trained 1,000 states (hours) after one info line."""
    from utils.superres.crossval import max_folds, spot_folds
    d = tmp_path / "d"
    d.mkdir()
    assert_user_error(run_script("HISTEX.py", d, "--n-states", "1000"), "--n-states", "at most 50")
    assert max_folds(171) == 85 and spot_folds(171, 85, 0) is not None and spot_folds(171, 86, 0) is None
    assert max_folds(9) == 0


@pytest.mark.parametrize("writes_after", [True, False])
def test_a_folder_deleted_while_its_stage_runs_is_not_made_anew(tmp_path, writes_after):
    """A section deleted mid-stage came back as DIR/manifests/<stage>.json (the stage's writes made
    its folders again), holding a manifest of artifacts that were gone."""
    import shutil

    from utils.core.errors import InputError
    from utils.core.stage import Stage
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(InputError, match="deleted or moved while converter ran; nothing was written"):
        with Stage("converter", d, manifest=False) as st:
            st.out.write_text(d / "a.txt", "before")
            shutil.rmtree(d)
            if writes_after:
                st.out.write_text(d / "sub" / "b.txt", "after")
    assert not d.exists()


def test_a_folder_moved_while_its_stage_runs_keeps_no_new_artifact(tmp_path):
    from utils.core.errors import InputError
    from utils.core.stage import Stage
    d, moved = tmp_path / "d", tmp_path / "moved"
    d.mkdir()
    (d / "mine.txt").write_text("a user's file")
    with pytest.raises(InputError, match="rerun it on the folder where it is now"):
        with Stage("converter", d, manifest=False) as st:
            d.rename(moved)
            st.out.write_text(d / "a.txt", "x")
    assert not d.exists() and (moved / "mine.txt").read_text() == "a user's file" and not (moved / "a.txt").exists()


def test_the_temporaries_of_a_killed_stage_that_became_a_zombie_are_swept(tmp_path):
    """`timeout -s KILL` kills its own process group, so nobody reaps the killed stage: in a container
    whose first process reaps nothing it stays a zombie, and its GB-sized temporary survived reruns."""
    import subprocess
    import time

    from utils.core.atomic import pid_alive, remove_stale_temporaries
    child = subprocess.Popen(["true"])   # not waited for: a zombie once it has exited
    try:
        for _ in range(100):
            if open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.02)
        stale = tmp_path / f".trihrge-tmp-{child.pid}-he.tif"
        stale.write_bytes(b"x")
        assert not pid_alive(child.pid)
        assert remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()
    finally:
        child.wait()


def test_options_the_other_options_leave_unread_are_named_and_train_no_new_states():
    """--val-fraction 0.3 with cross-fitting retrained every state to the same bits, without a word;
    --patience / --lr-schedule without held-out spots, the consistency's width with no kernel, and
    interp's --fusion / --stride / --seed were dropped silently."""
    from utils.superres.config import HistexConfig as H

    def unused(**kw):
        return sorted(o for opts in H(**kw).unused_settings.values() for o in opts)
    assert unused() == []
    assert unused(val_fraction=0.3) == ["--val-fraction"]
    assert unused(val_fraction=0.3, cross_fit=False) == []
    assert unused(val_fraction=0, patience=2, lr_schedule="plateau") == ["--lr-schedule", "--patience"]
    assert unused(spot_consistency="global", consistency_sigma=2.0) == ["--consistency-sigma"]
    assert unused(cross_fit=False, choose_consistency_sigma=True) == ["--choose-consistency-sigma"]
    assert unused(model="interp", fusion="blend", stride=3, batch_windows=4, seed=5) == \
        ["--batch-windows", "--fusion", "--seed", "--stride"]
    dims = {"micro": 4}
    assert H(val_fraction=0.3).model_config(dims, 3, 2) == H().model_config(dims, 3, 2)   # the same states
    assert H(val_fraction=0.3, cross_fit=False).model_config(dims, 3, 2) != H(cross_fit=False).model_config(dims, 3, 2)


def test_the_loss_figure_says_what_it_shows(tmp_path):
    """Its caption named held-out spots for a run that held none out; one epoch drew nothing."""
    import matplotlib.pyplot as plt

    from utils.report.page import _loss_caption
    from utils.superres.outputs import write_loss_plot
    assert "held-out spots (dashed" in _loss_caption({"config": {"cv_folds": 5, "val_fraction": 0.1}})
    assert "held-out spots (dashed" in _loss_caption({"config": {"val_fraction": 0.1}})
    assert "no spot held out" in _loss_caption({"config": {"val_fraction": 0.0}})
    drawn = []
    real = plt.Axes.plot
    try:
        plt.Axes.plot = lambda self, *a, **k: drawn.append(k.get("marker")) or real(self, *a, **k)
        write_loss_plot(tmp_path / "loss.png", [(np.array([0.054]), np.array([0.06]))])
    finally:
        plt.Axes.plot = real
    assert drawn[:2] == [".", "."] and (tmp_path / "loss.png").stat().st_size > 0


def test_leiden_domains_of_single_observations_get_a_warning(caplog):
    """--resolution 50 on 171 spots gave 168 domains, mostly single spots, with no comment."""
    import logging

    import anndata

    from utils.analysis.domains import cluster
    rng = np.random.default_rng(0)
    ad = anndata.AnnData(X=np.zeros((120, 2), np.float32))
    ad.obsm["X_pca"] = rng.normal(size=(120, 5))
    with caplog.at_level(logging.WARNING, logger="trihrge"):
        cluster(ad, n_domains=6, method="leiden", resolution=1.0, rep="X_pca", seed=0)
        assert "single observations" not in caplog.text
        cluster(ad, n_domains=6, method="leiden", resolution=60.0, rep="X_pca", seed=0)
    assert "single observations" in caplog.text
