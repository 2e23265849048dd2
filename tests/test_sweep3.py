"""The third robustness sweep (docs/ROBUSTNESS.md, rows 201-): a black-box hunt for misleading error
lines, absurd values taken, and silent losses in the converters, get_HR, HISTEX, the analysis and
utils.score."""
import numpy as np
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
