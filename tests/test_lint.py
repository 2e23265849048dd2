"""The lint configuration (pyproject.toml, [tool.ruff]) holds for the whole repository."""
import shutil
import subprocess
import sys

from conftest import REPO


def test_ruff_check_passes():
    ruff = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    r = subprocess.run([*cmd, "check", "--no-cache", str(REPO)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
