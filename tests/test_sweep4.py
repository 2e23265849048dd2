"""The fourth robustness sweep (docs/ROBUSTNESS.md, rows 217-): what a rerun says it recomputes, the
report's settings, and where a run may be written."""
import os

from conftest import REPO, assert_user_error, copy_demo, run_script, snapshot


def test_the_manifest_records_the_settings_the_run_applies(tmp_path):
    """HISTEX's 'recomputing:' line named --epochs for --model interp, and --out given once relative
    and once absolute, though neither changes the run."""
    from utils.superres.config import HistexConfig as H
    interp = H(model="interp", epochs=3, seed=4).applied_parameters()
    assert interp == H(model="interp").applied_parameters()
    assert H(val_fraction=0.3).applied_parameters() == H().applied_parameters()   # with cross-fitting
    assert H(epochs=3).applied_parameters() != H().applied_parameters()
    assert H(out=tmp_path / "run").applied_parameters()["out"] == str((tmp_path / "run").resolve())
    assert H(model="interp", epochs=3, seed=4).unread == ["epochs", "seed"]
    assert H().unread == []


def test_a_rerun_logs_only_what_changes_the_run(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "small")
    relative = os.path.relpath(d / "results" / "i", REPO)     # the stages run in the repository
    assert run_script("HISTEX.py", d, "--model", "interp", "--out", relative).returncode == 0
    r = run_script("HISTEX.py", d, "--model", "interp", "--epochs", "3", "--out", str(d / "results" / "i"))
    assert r.returncode == 0, r.stderr
    assert "recomputing" not in r.stderr and "--model interp ignores --epochs" in r.stderr
    r = run_script("HISTEX.py", d, "--model", "interp", "--sigma", "2", "--out", str(d / "results" / "i"))
    assert "recomputing: --sigma" in r.stderr


def test_the_report_marks_the_settings_the_run_did_not_read(tmp_path):
    from utils.report.page import _args_table
    html = _args_table({"args": {"epochs": "3", "sigma": "1.0"}, "args_unread": ["epochs"]})
    assert "3 (not used by this run)" in html and "1.0 (not used" not in html
    assert "not used" not in _args_table({"args": {"epochs": "3"}})      # a run.json written before the key


def test_a_run_written_into_a_stage_artifact_folder_is_refused(demo_upstream, tmp_path):
    """--out DIR/features (or manifests, truth) was taken: the run sat among the stages' artifacts."""
    d = copy_demo(demo_upstream, tmp_path / "small")
    before = snapshot(d)
    for sub in ("features", "manifests/run", "truth"):
        assert_user_error(run_script("HISTEX.py", d, "--model", "interp", "--out", d / sub), "--out",
                          "another stage", "results")
        assert snapshot(d) == before
