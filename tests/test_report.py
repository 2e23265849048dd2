"""report.html: self-contained (every image embedded), rendered by a real headless browser when one is here."""
import base64
import io
import re
import shutil
import subprocess

import pytest
from analysis_fixtures import HISTEX_REPORT, interp_run  # noqa: F401  (fixture)
from PIL import Image

from utils.scverse.keys import File

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# after load: how many images decoded (naturalWidth > 0), written into the DOM for --dump-dom
PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];document.body.setAttribute("
         "'data-decoded',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)});</script>")


def test_histex_writes_a_self_contained_report(interp_run):  # noqa: F811
    text = (interp_run[0].parent / HISTEX_REPORT).read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', text)
    assert len(sources) >= 3                          # H&E, mask overlay, gene maps
    for s in sources:
        assert s.startswith("data:image/jpeg;base64,")
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    assert not re.search(r'(src|href)="(https?:)?//', text)     # nothing from the network
    assert "Settings (run.json)" in text and "Gene maps" in text


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium)")
def test_report_renders_in_headless_chromium(interp_run, tmp_path):  # noqa: F811
    """The current report (with the analysis maps when test_analysis ran first)."""
    page = tmp_path / "report.html"
    page.write_text((interp_run[1] / File.REPORT).read_text().replace("</body>", PROBE + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-decoded="(\d+)/(\d+)"', r.stdout)
    assert m, r.stderr[-2000:]
    assert int(m.group(2)) >= 3 and m.group(1) == m.group(2), m.group(0)
