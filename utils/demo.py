"""`make demo`: simulate the built-in demo tissue (once) and run the five stages on it, each as its
own command exactly as a user would, then say where the outputs are."""
import json
import sys
import time
from pathlib import Path

from .core.cli import SEED, Parser, output_directory, run
from .core.manifest import SCRIPTS
from .core.workers import run_child

REPO = Path(__file__).resolve().parent.parent
DEMO_MARKERS = "demo-markers.tsv"

# stage script, extra arguments the demo passes (kept small so the medium demo runs in minutes on 2 cores)
DEMO_STAGES = [
    *((script, []) for script in SCRIPTS[:-1]),   # stages 1-4 with their defaults
    # demo training budget: 2 states x 30 epochs at lr 1e-3 on every spot (too short for early stopping,
    # so no held-out spots); the defaults (5 states, up to 500 epochs, early stopping) take several times longer
    ("HISTEX.py", ["--epochs", "30", "--n-states", "2", "--lr", "1e-3", "--val-fraction", "0"]),
    ("HISTEX.py", ["--model", "interp"]),   # the image-free baseline, seconds, for comparison
]


def _simulated_with(directory, size, seed):
    p = Path(directory) / "truth" / "simulation.json"
    if not p.is_file() or not (Path(directory) / "cnts.tsv").is_file():
        return False
    meta = json.loads(p.read_text())
    return meta.get("size") == size and meta.get("seed") == seed


def write_demo_markers(directory) -> Path:
    """DIR/demo-markers.tsv: the simulator's marker genes per cell type (truth/simulation.json), for
    `python -m utils.analysis --markers`; written when the analysis step runs (after the simulation)."""
    p = Path(directory) / DEMO_MARKERS
    markers = json.loads((Path(directory) / "truth" / "simulation.json").read_text())["marker_genes"]
    p.write_text("cell_type\tgene\n" + "".join(f"{t}\t{g}\n" for t, genes in markers.items() for g in genes))
    return p


def main(argv=None):
    p = Parser(prog="python -m utils.demo", description="Run the whole TriHRGE pipeline on the built-in demo tissue.")
    p.add_argument("--directory", type=output_directory, default=Path("demo/medium"),
                   help="where the demo data and outputs go")
    p.add_argument("--size", default="medium", choices=["small", "medium", "large"], help="demo tissue size")
    p.add_argument("--seed", type=SEED, default=0, help="simulation seed")
    args = p.parse_args(argv)
    d = args.directory
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    steps = []
    if not _simulated_with(d, args.size, args.seed):
        steps.append(([sys.executable, "-m", "utils.simulate", "--directory", str(d), "--size", args.size,
                       "--seed", str(args.seed)], "simulate demo tissue"))
    for script, extra in DEMO_STAGES:
        steps.append(([sys.executable, str(REPO / script), "--directory", str(d), *extra], script))
    # after the maps: domains and cell types (the simulator's marker genes) on the TriHRGE run
    steps.append(([sys.executable, "-m", "utils.analysis", str(d / "results" / "trihrge"), "--markers",
                   str(d / DEMO_MARKERS), "--smooth", "2", "-q"], "utils.analysis (results/trihrge)"))
    for cmd, name in steps:
        print(f"==> {name}", flush=True)
        if name.startswith("utils.analysis"):
            write_demo_markers(d)
        t = time.time()
        rc = run_child(cmd, cwd=REPO)   # it ends with the demo, and a Ctrl-C stops it cleanly
        print(f"    {name}: {'ok' if rc == 0 else 'FAILED (exit %d)' % rc} in {time.time() - t:.1f} s", flush=True)
        if rc != 0:
            print(f"demo stopped at {name}; the artifacts so far are in {d}", file=sys.stderr)
            return rc
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    runs = [d / "results" / m for m in ("trihrge", "interp")]
    for r in runs:
        print(f"  {r.name:8s} super-resolution: {r / 'super-res.h5ad'}  maps: {r / 'maps'}/")
    from .evaluation.score import format_table
    scored = [(r.name, json.loads((r / "metrics.json").read_text())) for r in runs if (r / "metrics.json").is_file()]
    if scored:
        print("\nscores against the simulated 8 um truth (per gene, then median/mean over genes):")
        print(format_table(scored))
    print(f"\nreport: {runs[0] / 'report.html'}")
    return 0


if __name__ == "__main__":
    run(main)
