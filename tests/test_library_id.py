"""The library id of uns['spatial'] (scanpy's library_id): the data directory's name by default,
storable for any folder name, or HISTEX.py --library-id; two sections with their own ids keep both
images through anndata.concat."""
import os
from pathlib import Path

import anndata
import pytest
from conftest import assert_user_error, copy_demo, run_script, snapshot

from utils.core import layout as L
from utils.scverse.keys import Key
from utils.scverse.spatial import folder_library_id, library_id_problem, library_of


def test_folder_names_become_storable_ids(tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/lat\xe9in"))    # not UTF-8: h5py refused to store it
    assert folder_library_id(odd) == "lat\ufffdin" and library_id_problem("lat\ufffdin") is None
    assert folder_library_id(tmp_path / "two\nlines") == "two_lines"
    assert len(folder_library_id(tmp_path / ("x" * 200))) == 100


@pytest.mark.parametrize("text, problem", [("", "empty"), ("  ", "empty"), ("p1/visium", "'/'"),
                                           ("a\tb", "control"), ("x" * 101, "longer"), ("\udce9", "UTF-8")])
def test_unusable_ids_are_named(text, problem):
    assert problem in library_id_problem(text)


def _interp(d, *args):
    r = run_script("HISTEX.py", d, "--model", "interp", "-q", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return anndata.read_h5ad(d / "results" / "interp" / L.SUPER_RES), d / "results" / "interp"


def test_default_and_given_ids_and_two_sections_concatenated(demo_upstream, tmp_path):
    odd = copy_demo(demo_upstream, Path(os.fsdecode(bytes(tmp_path) + b"/lat\xe9in")))
    a, _ = _interp(odd)          # stopped at writing super-res.h5ad before: 'surrogates not allowed'
    assert library_of(a) == "lat\ufffdin"

    d = copy_demo(demo_upstream, tmp_path / "p2" / "visium")
    before = snapshot(d)
    assert_user_error(run_script("HISTEX.py", d, "--library-id", "p2/visium"), "--library-id", "holds '/'")
    assert_user_error(run_script("HISTEX.py", d, "--library-id=."), "--library-id", "library level")
    assert snapshot(d) == before
    b, run_dir = _interp(d, "--library-id", "p2-visium")
    assert library_of(b) == "p2-visium" == library_of(anndata.read_h5ad(run_dir / L.SPOTS_PRED))
    assert '"library_id": "p2-visium"' in (run_dir / L.RUN_JSON).read_text()

    both = anndata.concat({"s1": a, "s2": b}, label="library_id", index_unique="-", uns_merge="unique")
    assert sorted(both.uns[Key.SPATIAL]) == ["lat\ufffdin", "p2-visium"]
    for lib in both.uns[Key.SPATIAL].values():
        assert lib[Key.IMAGES][Key.HIRES].ndim == 3
