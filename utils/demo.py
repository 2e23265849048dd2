"""`make demo`: simulate the built-in demo tissue (once) and run the five stages on it, each as its
own command exactly as a user would, then say where the outputs are."""
import json
import sys
import time
from pathlib import Path

from .core import layout as L
from .core.cli import SEED, Parser, output_directory, run
from .core.errors import InputError
from .core.manifest import SCRIPTS
from .core.workers import run_child
from .simulate.constants import DEFAULT_N_GENES, DEFAULT_PIXEL_SIZE_UM, RAW_FILES, SIZES_MM

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


def _simulated_with(directory, size, seed) -> bool:
    """DIR holds a complete simulation as the demo makes it (this size and seed, the simulator's defaults);
    else the demo simulates again, which also replaces a damaged record."""
    try:
        meta = L.read_json(L.TRUTH_SIMULATION, directory, keys=("size", "seed", "n_genes", "raw_pixel_size_um"))
    except InputError:
        return False
    files = (*RAW_FILES, L.TRUTH.name)
    return (all((Path(directory) / f).is_file() for f in files) and meta["size"] == size and meta["seed"] == seed
            and meta["n_genes"] == DEFAULT_N_GENES and meta["raw_pixel_size_um"] == DEFAULT_PIXEL_SIZE_UM)


def _marker_genes(directory) -> dict:
    """{cell type: its marker genes} of truth/simulation.json."""
    markers = L.read_json(L.TRUTH_SIMULATION, directory, keys=("marker_genes",))["marker_genes"]
    if not (isinstance(markers, dict) and all(isinstance(g, list) for g in markers.values())):
        raise L.TRUTH_SIMULATION.damaged(directory, "damaged: marker_genes is not {cell type: [genes]}")
    return markers


def write_demo_markers(directory) -> Path:
    """DIR/demo-markers.tsv: the simulator's marker genes per cell type (truth/simulation.json), for
    `python -m utils.analysis --markers`; written when the analysis step runs (after the simulation)."""
    p = Path(directory) / DEMO_MARKERS
    markers = _marker_genes(directory)
    p.write_text("cell_type\tgene\n" + "".join(f"{t}\t{g}\n" for t, genes in markers.items() for g in genes))
    return p


def _check_markers_path(directory) -> None:
    """The marker table is written after every stage ran: a folder in its place is refused before them."""
    p = Path(directory) / DEMO_MARKERS
    if p.exists() and not p.is_file():
        raise InputError(f"{p}: is a directory, not a file; the demo writes the simulator's marker genes there, so "
                         f"move it away and rerun")


def main(argv=None):
    p = Parser(prog="python -m utils.demo", description="Run the whole TriHRGE pipeline on the built-in demo tissue.")
    p.add_argument("--directory", type=output_directory, default=None,
                   help="where the demo data and outputs go (default: demo/SIZE)")
    p.add_argument("--size", default="medium", choices=list(SIZES_MM), help="demo tissue size")
    p.add_argument("--seed", type=SEED, default=0, help="simulation seed")
    args = p.parse_args(argv)
    # absolute: the steps run in the repository, wherever the demo was started
    d = (args.directory or Path("demo") / args.size).absolute()
    _check_markers_path(d)
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
    for i, (cmd, name) in enumerate(steps):
        print(f"==> {name}", flush=True)
        if name.startswith("utils.analysis"):
            write_demo_markers(d)
        t = time.time()
        rc = run_child(cmd, cwd=REPO)   # it ends with the demo, and a Ctrl-C stops it cleanly
        print(f"    {name}: {'ok' if rc == 0 else 'FAILED (exit %d)' % rc} in {time.time() - t:.1f} s", flush=True)
        if rc != 0:
            done = f"the artifacts of the steps before it are in {d}" if i else "no step before it ran"
            print(f"demo stopped at {name}; {done}", flush=True)   # the step's own error line says why
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
