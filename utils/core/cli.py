"""What every stage script shares: common options, logging, and turning InputError into one clear
line with exit code 2 (no traceback)."""
import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import InputError

log = logging.getLogger("trihrge")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(description, epilog=None):
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    p.add_argument("--directory", "-d", required=True, type=Path,
                   help="data directory in the raw layout (he-raw.*, pixel-size-raw.txt, cnts.*, "
                        "locs-raw.*, radius-raw.txt); every stage reads and writes its artifacts here")
    p.add_argument("--force", action="store_true",
                   help="run even if upstream artifacts are stale (their inputs changed after they were made)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")
    return p


def add_seed(p, default=0):
    p.add_argument("--seed", type=int, default=default, help="random seed; same inputs + seed give the same outputs on CPU")


def add_device(p):
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute: auto takes the GPU when one is present")


def setup_logging(quiet=False):
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)


def check_directory(directory):
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d}: not a directory; pass --directory pointing at the folder that holds he-raw.* and the other raw inputs")
    if not os.access(d, os.W_OK | os.X_OK):
        raise InputError(f"{d}: no write permission; the stages write their artifacts there, so make it writable "
                         f"(chmod u+w) or copy the data to a folder you own")
    return d


def run(main, argv=None):
    """Run a stage's main(argv); InputError -> one line on stderr and exit code 2."""
    try:
        rc = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the previous artifacts are intact; rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
