import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def run_script(script, directory, *args, env=None, timeout=600):
    """Run a stage the way a user does; returns CompletedProcess with text output."""
    cmd = [sys.executable, str(REPO / script), "--directory", str(directory), *map(str, args)]
    e = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1")
    e.update(env or {})
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=e, timeout=timeout)


def assert_user_error(proc, *fragments):
    """Exit code 2, exactly one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f.lower() in errors[0].lower(), (f, errors[0])
    return errors[0]


def mount(*args):
    """`mount ARGS`; False where this machine does not let us (not root)."""
    return subprocess.run(["mount", *args], capture_output=True, text=True).returncode == 0


def snapshot(directory):
    """{relative path: (size, mtime_ns)} of every file, to prove nothing was written or changed."""
    d = Path(directory)
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def hex_lattice(nx, ny, spacing, angle_deg=0.0, origin=(0.0, 0.0)):
    """Visium-like points: rows spaced spacing*sqrt(3)/2, odd rows shifted by spacing/2."""
    pts = []
    for j in range(ny):
        for i in range(nx):
            pts.append((i * spacing + (spacing / 2 if j % 2 else 0.0), j * spacing * np.sqrt(3) / 2))
    pts = np.array(pts)
    a = np.radians(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return pts @ R.T + np.asarray(origin)


def square_lattice(nx, ny, spacing, angle_deg=0.0, origin=(0.0, 0.0)):
    g = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * spacing
    a = np.radians(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return g @ R.T + np.asarray(origin)


def write_raw_dir(directory, xy_raw, counts=None, pixel_size=0.4, radius_raw=None, image=None,
                  n_genes=20, seed=0, image_name="he-raw.png", counts_name="cnts.tsv", genes=None):
    """A small raw-layout data set: a pinkish image, the given spot centres, Poisson counts."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xy_raw = np.asarray(xy_raw, dtype=float)
    if image is None:
        h = int(xy_raw[:, 1].max() + 300)
        w = int(xy_raw[:, 0].max() + 300)
        image = np.full((h, w, 3), (235, 200, 225), np.uint8)
    if image_name is not None:
        if image_name.endswith((".tif", ".tiff")):
            import tifffile
            tifffile.imwrite(d / image_name, image)
        else:
            cv2.imwrite(str(d / image_name), image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image)
    ids = [f"s{i}" for i in range(len(xy_raw))]
    if counts is None:
        lam = rng.gamma(2.0, 3.0, size=(len(xy_raw), n_genes))
        counts = rng.poisson(lam)
    genes = genes or [f"G{j}" for j in range(counts.shape[1])]
    df = pd.DataFrame(counts, index=pd.Index(ids, name="spot"), columns=genes)
    if counts_name.endswith(".h5ad"):
        import anndata
        anndata.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=ids),
                        var=pd.DataFrame(index=genes)).write_h5ad(d / counts_name)
    else:
        sep = "," if ".csv" in counts_name else "\t"
        df.to_csv(d / counts_name, sep=sep, compression="gzip" if counts_name.endswith(".gz") else None)
    pd.DataFrame({"spot": ids, "x": xy_raw[:, 0], "y": xy_raw[:, 1]}).to_csv(d / "locs-raw.tsv", sep="\t", index=False)
    (d / "pixel-size-raw.txt").write_text(f"{pixel_size}\n")
    (d / "radius-raw.txt").write_text(f"{radius_raw if radius_raw is not None else 27.5 / pixel_size}\n")
    return d


@pytest.fixture
def her2st_c2(tmp_path):
    src = SHARED / "her2st" / "C2"
    if not (src / "he-raw.jpg").is_file():
        pytest.skip("../shared/data/her2st/C2 not present")
    import shutil
    dst = tmp_path / "C2"
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    dst.chmod(0o755)
    return dst


UPSTREAM = (("image_calibration.py", []), ("get_HR.py", ["--n-genes", 40]),
            ("Histology_Extractor.py", []), ("masking_non_tissue.py", []))


def run_stages_1_to_4(d):
    for script, args in UPSTREAM:
        r = run_script(script, d, *args, "-q")
        assert r.returncode == 0, (script, r.stderr[-3000:])


@pytest.fixture(scope="session")
def demo_upstream(tmp_path_factory):
    """The small simulated tissue after stages 1-4, built once per session. Never modify it: copy it
    (copy_demo)."""
    from utils.simulate.simulation import simulate
    d = tmp_path_factory.mktemp("demo-upstream") / "small"
    simulate(d, size="small", seed=3, extent_mm=1.0, n_genes=60, progress=False)
    run_stages_1_to_4(d)
    return d


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    """A tiny raw-layout data set (hex lattice of 30 spots), not yet calibrated. Never modify it: copy it."""
    d = tmp_path_factory.mktemp("raw") / "d"
    write_raw_dir(d, hex_lattice(6, 5, 250.0, origin=(150.0, 150.0)), pixel_size=0.4)
    return d


def copy_demo(src, dst, results=False):
    """A private copy of a demo directory (without results/ unless asked)."""
    import shutil
    shutil.copytree(src, dst, ignore=None if results else shutil.ignore_patterns("results"))
    return dst
