"""RUN_DIR/report.html: one self-contained page about a run (every image embedded, no network).

    write_report(out, run_dir, directory=DIR)   # staged in `out` (utils.core.atomic.StagedOutputs)

HISTEX.py writes it with its outputs, `python -m utils.analysis` rewrites it with the analysis."""
from .page import write_report

__all__ = ["write_report"]
