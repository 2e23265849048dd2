"""The fifth robustness probe's fixes (docs/ROBUSTNESS.md rows 158 on), one test each."""
import errno
import subprocess
import sys

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
