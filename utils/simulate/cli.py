"""python -m utils.simulate: the command line of the simulator."""
import argparse

from ..core.cli import POSITIVE, POSITIVE_INT, SEED, HelpFormatter, Parser, output_directory, setup_logging
from .simulation import simulate


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
                   help="output folder (created if missing); existing files of the data set are replaced")
    p.add_argument("--size", default="small", metavar="{small,medium,large}",
                   help="field of view: small = 1.5 x 1.5 mm (seconds), medium = 3 x 3 mm, "
                        "large = 6.5 x 6.5 mm (a Visium capture area, minutes)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed; the same seed gives a byte-identical data set")
    p.add_argument("--pixel-size", type=POSITIVE, default=0.3,
                   help="raw image pixel size in um/px (deliberately not the pipeline's 0.5)")
    p.add_argument("--n-genes", type=POSITIVE_INT, default=300, help="number of simulated genes")
    p.add_argument("--extent-mm", type=POSITIVE, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    setup_logging(args.quiet)
    simulate(args.directory, size=args.size, seed=args.seed, pixel_size=args.pixel_size, n_genes=args.n_genes,
             extent_mm=args.extent_mm, progress=not args.quiet)
    return 0
