"""Runs under torchrun (utils.core.distributed): two gloo ranks on the CPU give the same arrays as one
process, a failure on one rank stops the run with one `error:` line and commits nothing, and only
rank 0 takes the DIR lock. Plus the pure-Python parts of the World (no process group)."""
import fcntl
import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pytest
import torch
from conftest import REPO, copy_demo, run_script, run_stages_1_to_4, snapshot

from utils.core.distributed import World, world_from_env
from utils.core.errors import InputError

FAST = ["--epochs", "3", "--n-states", "2", "--lr", "1e-3", "--threads", "1", "--batch-windows", "8", "-q"]
SCALES = ("micro", "meso", "macro", "extra")


def run_torchrun(script, directory, *args, env=None, nproc=2, timeout=300):
    """`torchrun --standalone` (a free port of its own, so parallel runs do not collide) with nproc
    gloo ranks on the CPU, as a user runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(REPO / script), "--directory", str(directory), *map(str, args)]
    e = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    e.update(env or {})
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=e, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 0.6 mm simulated section after stages 1-4 in one process (features made by one process)."""
    from utils.simulate.simulation import simulate
    d = tmp_path_factory.mktemp("dist") / "tiny"
    simulate(d, size="small", seed=3, extent_mm=0.6, n_genes=50, progress=False)
    run_stages_1_to_4(d)
    return d


TINY_VIT = ["--backbone", "timm:vit_tiny_patch16_224", "--random-init", "--timm-kwargs", '{"init_values": 1e-5}',
            "--shifts", "1", "--batch-size", "8", "--device", "cpu"]


@pytest.mark.parametrize("backbone", [["--band-rows", "8"], TINY_VIT], ids=["stain", "tile"])
def test_features_under_torchrun_equal_one_process(tiny, tmp_path, backbone):
    """stain: bands of 8 rows (11 over the 84 rows), dealt out to both ranks in turn; a tiny random
    ViT: 6 tile rows, 3 per rank (each rank also computes the tile rows around its block)."""
    one, two = copy_demo(tiny, tmp_path / "one"), copy_demo(tiny, tmp_path / "two")
    r = run_script("Histology_Extractor.py", one, *backbone, "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_torchrun("Histology_Extractor.py", two, *backbone, "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    for s in SCALES:
        a, b = np.load(one / "features" / f"{s}.npy"), np.load(two / "features" / f"{s}.npy")
        assert a.shape[0] > 28 and np.array_equal(a, b), s
    meta = [json.loads((d / "features" / "features.json").read_text()) for d in (one, two)]
    assert meta[0]["dims"] == meta[1]["dims"] and meta[0]["backbone"] == meta[1]["backbone"]
    assert json.loads((two / "manifests" / "Histology_Extractor.json").read_text())
    assert not list(two.glob(".trihrge*")), list(two.iterdir())


def test_histex_under_torchrun_equals_one_process(tiny, tmp_path):
    a, b = tmp_path / "one", tmp_path / "two"
    r = run_script("HISTEX.py", tiny, *FAST, "--out", a)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_torchrun("HISTEX.py", tiny, *FAST, "--out", b)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not error_lines(r)
    for i in range(2):  # state 1 was trained by rank 1
        sa, sb = (torch.load(x / "states" / f"state-0{i}.pt", weights_only=True) for x in (a, b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for name in ("super-res.h5ad", "spots-pred.h5ad"):
        xa, xb = (anndata.read_h5ad(x / name).X for x in (a, b))
        assert xa.shape[0] > 20 and np.array_equal(xa, xb), name
    assert json.loads((b / "run.json").read_text())["cross_validation"] == \
        json.loads((a / "run.json").read_text())["cross_validation"]
    assert not list(tiny.glob(".trihrge*")) and not list(b.rglob(".trihrge*"))


def test_a_failing_rank_stops_every_rank_and_commits_nothing(tiny, tmp_path):
    """Rank 1 fails while training (an InputError injected through sitecustomize on that rank only):
    rank 0, which trained its own state, stops at the next synchronisation point, prints the one
    error line and commits no output and no manifest."""
    d = copy_demo(tiny, tmp_path / "d")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('RANK') == '1':\n"
        f"    sys.path.insert(0, {str(REPO)!r})\n"
        "    import utils.superres.states as states\n"
        "    from utils.core.errors import InputError\n"
        "    def fail(*args, **kwargs):\n"
        "        raise InputError('injected failure while training')\n"
        "    states.train_state = fail\n")
    before = snapshot(d)
    r = run_torchrun("HISTEX.py", d, *FAST, env={"PYTHONPATH": str(hook)})
    assert r.returncode != 0
    assert error_lines(r) == ["error: injected failure while training (rank 1 of 2)"], r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr  # the ranks' exit code, in torchrun's report
    after = snapshot(d)
    assert {k: v for k, v in after.items() if "/states/" not in k} == before  # only finished states
    assert not list(d.rglob(".trihrge*"))


def test_only_rank_0_takes_the_lock(tiny, tmp_path):
    """A DIR in use: rank 0 cannot take the lock and the other rank stops too, without waiting."""
    d = copy_demo(tiny, tmp_path / "d")
    fd = os.open(d / ".trihrge.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, json.dumps({"stage": "HISTEX", "pid": os.getpid()}).encode(), 0)
        r = run_torchrun("HISTEX.py", d, *FAST, timeout=120)
    finally:
        os.close(fd)
    lines = error_lines(r)
    assert r.returncode != 0 and len(lines) == 1 and "in use by HISTEX" in lines[0], r.stderr[-3000:]
    assert not (d / "results").exists()


def test_world_from_the_environment():
    assert world_from_env({}) == World(0, 1, 1)
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == World(0, 1, 1)
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_size, w.leader) == (3, 4, 2, False)
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "a", "WORLD_SIZE": "2"}):
        with pytest.raises(InputError):
            world_from_env(env)


def test_a_stray_world_size_is_one_error_line(tmp_path):
    """WORLD_SIZE left in the environment without torchrun: one line, not a traceback or a hang."""
    e = dict(os.environ, WORLD_SIZE="2", RANK="0")
    e.pop("MASTER_ADDR", None)
    r = subprocess.run([sys.executable, str(REPO / "HISTEX.py"), "--directory", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "WORLD_SIZE=2 is set but MASTER_ADDR" in r.stderr and "torchrun" in r.stderr


def test_ranks_started_by_hand_that_never_meet_give_up(monkeypatch):
    """Rank 0 of 2 started by hand (no torchrun agent), the other rank never comes: rank 0 waits
    JOIN_TIMEOUT, not the 24 h of TIMEOUT; a port in use is one line too."""
    import datetime
    import socket

    from utils.core import distributed
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", datetime.timedelta(seconds=2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        s.listen()
        with pytest.raises(InputError, match="cannot join the other processes"):
            distributed.launch(env)       # the port is taken
    with pytest.raises(InputError, match="cannot join the other processes .*1/2"):
        distributed.launch(env)
    assert distributed.current().size == 1


def test_shares_of_the_work():
    worlds = [World(r, 3, 3) for r in range(3)]
    assert [w.strided(range(7)) for w in worlds] == [[0, 3, 6], [1, 4], [2, 5]]
    blocks = [list(w.block(7)) for w in worlds]
    assert sum(blocks, []) == list(range(7)) and max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert World(0, 3, 3).cpus(16) == 5 and World(0, 4, 4).cpus(2) == 1 and World().cpus(16) == 16


def test_one_process_adds_rows_in_place():
    out = np.ones((5, 2), np.float32)
    World().add_rows_at_leader(np.array([4, 1]), np.full((2, 2), 2, np.float32), out)
    assert out[:, 0].tolist() == [1, 3, 1, 1, 3]
    World().sync()
    assert World().share("x") == "x" and World().gather(2) == [2]
