"""Cached HISTEX states (utils/superres/states.py): weights damaged after training are retrained, and a
states folder that cannot take a state is refused before training, with one error line."""
import contextlib
import json
import os
import subprocess

import pytest
import torch
from conftest import assert_user_error, copy_demo, run_script, snapshot

FAST = ["--epochs", "2", "--n-states", "2", "-q"]


def _states(d):
    return d / "results" / "trihrge" / "states"


def _edit_weights(pt, edit):
    state = torch.load(pt, weights_only=True)
    torch.save({k: edit(k, v) for k, v in state.items()}, pt)


def test_non_finite_or_edited_weights_are_retrained_to_the_same_state(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    assert run_script("HISTEX.py", d, *FAST).returncode == 0
    pts = [_states(d) / f"state-0{i}.pt" for i in range(2)]
    first = [torch.load(p, weights_only=True) for p in pts]
    _edit_weights(pts[0], lambda k, v: torch.full_like(v, float("nan")) if v.is_floating_point() else v)
    big = next(k for k, v in first[1].items() if v.is_floating_point() and v.numel() > 1)
    _edit_weights(pts[1], lambda k, v: v * 1e30 if k == big else v)
    r = run_script("HISTEX.py", d, *FAST[:-1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "state-00.pt: damaged (weights that are not finite)" in r.stderr, r.stderr
    assert "state-01.pt: damaged (weights changed after training)" in r.stderr, r.stderr
    assert "already trained" not in r.stderr, r.stderr
    for p, want in zip(pts, first):   # retrained bit-identically
        got = torch.load(p, weights_only=True)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a record written before the digest existed is not checked: its state is reused as before
    meta = _states(d) / "state-01.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "weights_sha256"}))
    _edit_weights(pts[1], lambda k, v: v * 1.5 if k == big else v)
    r = run_script("HISTEX.py", d, *FAST[:-1])
    assert r.returncode == 0 and "state 2/2: already trained" in r.stderr and "damaged" not in r.stderr, r.stderr


@contextlib.contextmanager
def _read_only(folder):
    """chmod a-w, or for root (whom chmod does not stop) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root where chattr +i is not available: nothing makes a folder read-only")
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_read_only_states_folder_is_refused_before_training(demo_upstream, tmp_path):
    d = copy_demo(demo_upstream, tmp_path / "d")
    _states(d).mkdir(parents=True)
    before = snapshot(d)
    with _read_only(_states(d)):
        r = run_script("HISTEX.py", d, *FAST)
    line = assert_user_error(r, str(_states(d)), "cannot be written", "make it writable")
    assert "training" not in r.stderr and "Traceback" not in r.stderr, line
    assert snapshot(d) == before


@pytest.mark.parametrize("name", ["state-00.pt", "state-01.json"])
def test_a_directory_at_a_state_file_is_refused_before_training(demo_upstream, tmp_path, name):
    d = copy_demo(demo_upstream, tmp_path / "d")
    (_states(d) / name).mkdir(parents=True)
    before = snapshot(d)
    r = run_script("HISTEX.py", d, *FAST[:-1])
    assert_user_error(r, str(_states(d) / name), "is a directory", "remove")
    assert "damaged" not in r.stderr and "training" not in r.stderr, r.stderr
    assert snapshot(d) == before
    assert [p.name for p in _states(d).iterdir()] == [name]   # no temporaries left behind


def test_a_commit_refused_leaves_no_temporaries(tmp_path):
    """StagedOutputs' commit refusing a directory in a file's place left its temporaries behind."""
    import pytest

    from utils.core.atomic import StagedOutputs
    from utils.core.errors import InputError
    (tmp_path / "a.json").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        with StagedOutputs() as out:
            out.write_json(tmp_path / "b.json", {})
            out.write_json(tmp_path / "a.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
