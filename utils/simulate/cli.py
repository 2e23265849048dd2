"""python -m utils.simulate: the command line of the simulator."""
import argparse

from ..core.cli import POSITIVE, POSITIVE_INT, SEED, HelpFormatter, Parser, output_directory, setup_logging
from .constants import DEFAULT_N_GENES, DEFAULT_PIXEL_SIZE_UM, MAX_GENES, MIN_GENES, PIXEL_SIZE_RANGE_UM, SIZES_MM
from .simulation import memory_needed, simulate


def _parser():
    p = Parser(
        prog="python -m utils.simulate",
        description="Simulate the built-in demo tissue: an H&E-like breast cancer section with pseudo-Visium\n"
                    "spots (55 um, 100 um hexagonal lattice) and ground truth at 8 um super-pixels, written in\n"
                    "the raw layout (he-raw.tif, pixel-size-raw.txt, cnts.tsv, locs-raw.tsv, radius-raw.txt,\n"
                    "section.json) plus DIR/truth/ (super.h5ad, mask.png, regions.png, cells.tsv.gz,\n"
                    "simulation.json).",
        formatter_class=HelpFormatter)
    p.add_argument("--directory", "-d", required=True, type=output_directory,
                   help="output folder (created if missing): new, empty, or an earlier simulation, whose files are "
                        "replaced (a folder of other data is refused)")
    p.add_argument("--size", default="small", metavar="{small,medium,large}",
                   help="field of view: small = 1.5 x 1.5 mm (seconds), medium = 3 x 3 mm, "
                        "large = 6.5 x 6.5 mm (a Visium capture area, minutes)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed; the same seed gives a byte-identical data set")
    lo, hi = PIXEL_SIZE_RANGE_UM
    most = memory_needed(SIZES_MM["large"], DEFAULT_PIXEL_SIZE_UM, MAX_GENES)[0] / 2 ** 30
    p.add_argument("--pixel-size", type=POSITIVE, default=DEFAULT_PIXEL_SIZE_UM,
                   help=f"raw image pixel size in um/px, {lo}-{hi} (deliberately not the pipeline's 0.5)")
    p.add_argument("--n-genes", type=POSITIVE_INT, default=DEFAULT_N_GENES,
                   help=f"number of simulated genes, {MIN_GENES}-{MAX_GENES}; memory grows with genes x area "
                        f"(large at {MAX_GENES}: about {most:.0f} GiB); a run that would not fit is refused at once")
    p.add_argument("--extent-mm", type=POSITIVE, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    setup_logging(args.quiet)
    simulate(args.directory, size=args.size, seed=args.seed, pixel_size=args.pixel_size, n_genes=args.n_genes,
             extent_mm=args.extent_mm, progress=not args.quiet)
    return 0
