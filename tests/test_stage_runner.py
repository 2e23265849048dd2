"""The stage runner (utils/core/stage.py) under the conditions a real lab produces: two runs on one
directory, a user's own dot-files, a read-only manifests/ folder, a full disk, and every option
value that used to reach torch or numpy unchecked."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pytest
from conftest import REPO, assert_user_error, copy_demo, mount, run_script, snapshot

from utils.core.atomic import TMP_MARKER
from utils.core.errors import InputError
from utils.core.manifest import SCRIPTS
from utils.core.stage import LOCK_NAME, DirectoryLock

FAST = ["--epochs", "3", "--n-states", "1", "--threads", "1", "-q"]


def _temporaries(d):
    return [p for p in Path(d).rglob(f"{TMP_MARKER}*")] + list(Path(d).rglob(LOCK_NAME))


# ---------------------------------------------------------------------------------------------
# one directory, two processes

def test_a_held_lock_refuses_every_stage_and_a_dead_holder_is_taken_over(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    before = snapshot(d)
    lock = DirectoryLock(d, "HISTEX").acquire()
    try:
        for script in SCRIPTS:
            assert_user_error(run_script(script, d), "in use by HISTEX", f"pid {os.getpid()}")
    finally:
        lock.release()
    assert snapshot(d) == before
    # a lock file left by a killed process (no flock held) is taken over, with a log line
    (d / LOCK_NAME).write_text(json.dumps({"stage": "get_HR", "pid": 999999, "started": "earlier"}))
    r = run_script("masking_non_tissue.py", d)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taking over the lock of get_HR (pid 999999)" in r.stderr
    assert not (d / LOCK_NAME).exists()


def _histex_process(d, *args):
    cmd = [sys.executable, str(REPO / "HISTEX.py"), "--directory", str(d), *FAST, *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1"))


def test_concurrent_runs_second_refused_first_equals_solo(demo_upstream, tmp_path):
    """A real second process while the first holds DIR (paused with SIGSTOP so the timing cannot race)."""
    solo = copy_demo(demo_upstream, tmp_path / "solo")
    assert run_script("HISTEX.py", solo, *FAST).returncode == 0
    d = copy_demo(demo_upstream, tmp_path / "d")
    first = _histex_process(d)
    deadline = time.time() + 120
    while not (d / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (d / LOCK_NAME).exists(), first.communicate()[1][-2000:]
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert_user_error(run_script("HISTEX.py", d, *FAST), "in use by HISTEX", f"pid {first.pid}")
        assert_user_error(run_script("get_HR.py", d), "in use by HISTEX")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    a = anndata.read_h5ad(d / "results" / "trihrge" / "super-res.h5ad")
    b = anndata.read_h5ad(solo / "results" / "trihrge" / "super-res.h5ad")
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))
    assert not _temporaries(d)


# ---------------------------------------------------------------------------------------------
# temporaries: only this project's, only of dead processes

def test_user_dot_files_survive_every_stage_and_dead_temporaries_are_swept(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    notes = [d / ".tmp-notes.txt", d / ".tmp-123-mine.txt", d / "manifests" / ".tmp-x"]
    for p in notes:
        p.write_text("my own file")
    dead = d / f"{TMP_MARKER}-999999-he.tif"
    dead.write_text("left by a killed run")
    for script in SCRIPTS:
        args = ["--model", "interp"] if script == "HISTEX.py" else []
        r = run_script(script, d, *args, "-q", "--force")
        assert r.returncode == 0, (script, r.stderr[-2000:])
    assert all(p.read_text() == "my own file" for p in notes)
    assert not dead.exists() and not _temporaries(d)


def test_scratch_of_histex_out_outside_directory_is_removed(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    out = tmp_path / "elsewhere"
    r = run_script("HISTEX.py", d, *FAST, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "super-res.h5ad").is_file() and not _temporaries(out) and not _temporaries(d)


# ---------------------------------------------------------------------------------------------
# manifests that cannot be written, a full disk

def test_read_only_manifests_leave_previous_artifacts_unchanged(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    m = d / "manifests"
    if not (mount("--bind", str(m), str(m)) and mount("-o", "remount,ro,bind", str(m))):
        pytest.skip("cannot bind-mount read-only here (needs root)")
    try:
        before = snapshot(d)
        for script, args in (("masking_non_tissue.py", ["--threshold", "0.05"]), ("get_HR.py", ["--n-genes", "30"])):
            assert_user_error(run_script(script, d, *args), "manifests", "cannot be written")
            assert snapshot(d) == before, script
        assert not _temporaries(d)
    finally:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_damaged_manifest_names_the_stage_to_rerun(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    for damage in ("{not json", "[]", "null", '{"inputs": 1}'):
        (d / "manifests" / "get_HR.json").write_text(damage)
        assert_user_error(run_script("HISTEX.py", d, *FAST), "get_HR.json", "damaged", "get_HR.py")


RAW = ("he-raw.tif", "pixel-size-raw.txt", "cnts.tsv", "locs-raw.tsv", "radius-raw.txt")


def _raw_on_a_small_disk(src, mount_point, spare_mib=2):
    """The raw files of `src` on a tmpfs that then has about spare_mib MiB free (needs root)."""
    mount_point.mkdir(parents=True)
    size = sum((src / f).stat().st_size for f in RAW) + (spare_mib + 4) * 2 ** 20
    if not mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    d = mount_point / "d"
    d.mkdir()
    for f in RAW:
        (d / f).write_bytes((src / f).read_bytes())
    st = os.statvfs(mount_point)
    (mount_point / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - spare_mib * 2 ** 20))
    return d


def test_full_disk_gives_one_error_line_and_leaves_nothing(demo_upstream, tmp_path):
    disk = tmp_path / "disk"
    try:
        d = _raw_on_a_small_disk(demo_upstream, disk)   # he.tif needs more than 2 MiB
        before = snapshot(d)
        assert_user_error(run_script("image_calibration.py", d), "disk")
        assert snapshot(d) == before and not _temporaries(d)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_enospc_while_writing_is_one_error_and_leaves_nothing(demo_upstream, tmp_path, monkeypatch):
    """Past the free-space estimate (another process filled the disk): ENOSPC in the middle of the
    writes, including the reserved memory map of he.tif, becomes the one-line error."""
    from utils.core.stage import Stage
    from utils.stages.image_calibration import calibrate
    disk = tmp_path / "disk"
    try:
        d = _raw_on_a_small_disk(demo_upstream, disk)
        monkeypatch.setattr(Stage, "require_space", lambda *a, **k: None)
        before = snapshot(d)
        with pytest.raises(InputError, match="disk is full"):
            calibrate(d)
        assert snapshot(d) == before and not _temporaries(d)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("compress", [False, True])
def test_a_full_disk_while_x_is_written_is_a_disk_full_error_not_a_crash(tmp_path, compress):
    """super-res.h5ad's X meets a full disk at a chunk's write, as an error the stages turn into
    their one line (is_disk_full); through HDF5's chunk cache it surfaced only when the dataset
    closed, and the interpreter then crashed at exit (a segmentation fault, exit 139)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    code = (
        "import sys, numpy as np, pandas as pd\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from utils.superres.outputs import write_h5ad_streamed\n"
        "from utils.core.atomic import is_disk_full\n"
        "X = np.random.default_rng(0).random((5000, 200)).astype(np.float32)\n"
        "try:\n"
        f"    write_h5ad_streamed({str(disk / 'x.h5ad')!r}, pd.DataFrame(index=[str(i) for i in range(5000)]),\n"
        f"                        pd.DataFrame(index=[f'g{{i}}' for i in range(200)]), X, compress={compress})\n"
        "except Exception as e:\n"
        "    print('disk full' if is_disk_full(e) else repr(e))\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "disk full", (r.returncode, r.stdout, r.stderr[-500:])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_under_the_in_place_x_is_a_disk_full_error(tmp_path):
    """The map computed inside super-res.h5ad's X reserves its blocks first: a disk that cannot hold
    them is ENOSPC at once (is_disk_full), not a SIGBUS at a page's first write."""
    from utils.core.atomic import is_disk_full
    from utils.superres.outputs import h5ad_x_memmap
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError) as e:
            h5ad_x_memmap(disk / "x.h5ad", (5000, 200))
        assert is_disk_full(e.value)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_interp_refuses_a_disk_too_small_for_its_map(demo_upstream, tmp_path, monkeypatch):
    """--model interp fills a scratch memmap: it asks for the space first, and a disk that cannot
    hold the map is one InputError that leaves DIR as it was."""
    import shutil

    from utils.stages.histex import run_histex
    from utils.superres.config import HistexConfig
    d = copy_demo(demo_upstream, tmp_path / "d")
    before = snapshot(d)
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=4096))
    with pytest.raises(InputError, match="the interpolated map needs about"):
        run_histex(d, HistexConfig.from_options({"model": "interp"}), progress=False)
    assert snapshot(d) == before and not _temporaries(d)


# ---------------------------------------------------------------------------------------------
# every option value is checked where it is parsed

BAD_OPTIONS = [
    ("HISTEX.py", ["--batch-size", "-5"]), ("HISTEX.py", ["--head-hidden", "0"]), ("HISTEX.py", ["--lr", "nan"]),
    ("HISTEX.py", ["--threads", "-1"]), ("HISTEX.py", ["--dropout", "1.5"]), ("HISTEX.py", ["--weight-decay", "-1"]),
    ("HISTEX.py", ["--sigma", "-1"]), ("HISTEX.py", ["--epochs", "inf"]), ("HISTEX.py", ["--seed", "-1"]),
    ("HISTEX.py", ["--d-model", "30", "--heads", "4"]), ("HISTEX.py", ["--token-mask", "2"]),
    ("HISTEX.py", ["--loss", "poisson", "--residual"]),
    ("HISTEX.py", ["--val-fraction", "0.5"]), ("HISTEX.py", ["--stride", "-1"]), ("HISTEX.py", ["--fusion", "mix"]),
    ("HISTEX.py", ["--precision", "fp16"]), ("Histology_Extractor.py", ["--precision", "half"]),
    ("Histology_Extractor.py", ["--shifts", "0"]), ("Histology_Extractor.py", ["--batch-size", "0"]),
    ("Histology_Extractor.py", ["--band-rows", "-3"]), ("Histology_Extractor.py", ["--timm-kwargs", "[1]"]),
    ("masking_non_tissue.py", ["--threshold", "5"]), ("masking_non_tissue.py", ["--min-region-um2", "nan"]),
    ("masking_non_tissue.py", ["--texture-threshold", "-1"]), ("get_HR.py", ["--n-genes", "0"]),
    ("image_calibration.py", ["--pixel-size", "0.4"]),
]


@pytest.mark.parametrize("script,args", BAD_OPTIONS, ids=[f"{s[:-3]}{' '.join(a)}" for s, a in BAD_OPTIONS])
def test_bad_option_values(demo_upstream, script, args):
    before = snapshot(demo_upstream)
    assert_user_error(run_script(script, demo_upstream, *args), args[0])
    assert snapshot(demo_upstream) == before


def test_out_pointing_at_a_file_is_refused_before_training(demo_upstream, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    assert_user_error(run_script("HISTEX.py", demo_upstream, "--out", f), "--out", "not a directory")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_diverging_training_is_one_error_line(demo_upstream, tmp_path, workers):
    """Also when the states train in worker processes: their error comes back as the one line."""
    d = copy_demo(demo_upstream, tmp_path / "d")
    before = snapshot(d)
    args = [*FAST, "--lr", "1e30", "--n-states", "2", "--threads", workers]
    assert_user_error(run_script("HISTEX.py", d, *args), "diverged", "--lr")
    assert snapshot(d) == before and not _temporaries(d)
