"""Shared by the scverse / analysis / report tests: one interpolation run on the small demo tissue
(seconds), built once per session from conftest's demo_upstream."""
import json
import shutil

import pytest
from conftest import copy_demo, run_script

HISTEX_REPORT = "histex-report.html"
NOT_PREDICTED = "NOTAGENE1"   # a marker the run does not predict: must be reported, not dropped


_RUN = {}     # built once per session although each test module imports the fixture (its own definition)


@pytest.fixture(scope="session")
def interp_run(demo_upstream, tmp_path_factory):
    """(data directory, run directory) of `HISTEX.py --model interp` on a private copy of the small demo.
    The analysis tests add to the run directory; HISTEX's own report is kept as HISTEX_REPORT next to DIR."""
    if not _RUN:
        d = copy_demo(demo_upstream, tmp_path_factory.mktemp("scverse") / "small")
        r = run_script("HISTEX.py", d, "--model", "interp", "-q")
        assert r.returncode == 0, r.stderr[-3000:]
        shutil.copy(d / "results" / "interp" / "report.html", d.parent / HISTEX_REPORT)
        _RUN["run"] = (d, d / "results" / "interp")
    return _RUN["run"]


def marker_tsv(directory, path, bom_crlf=True):
    """The simulator's markers (3 per type) plus one gene no run predicts, as a TSV with a BOM and CRLF."""
    markers = json.loads((directory / "truth" / "simulation.json").read_text())["marker_genes"]
    lines = ["cell_type\tgene"] + [f"{t}\t{g}" for t, genes in markers.items() for g in genes[:3]]
    lines.append(f"tumour\t{NOT_PREDICTED}")
    text = ("\r\n" if bom_crlf else "\n").join(lines) + "\r\n"
    path.write_bytes(("\ufeff" if bom_crlf else "").encode() + text.encode())
    return path
