"""What every command shares: the parser (one `error:` line, exit 2, for any bad option), the
option validators (argparse types that config dataclasses reuse), logging, and turning InputError
into one clear line with exit code 2 (no traceback)."""
import argparse
import logging
import math
import os
import sys
import tempfile
import traceback
import unicodedata
from pathlib import Path

from .errors import InputError, Stopped
from .workers import end_with_launcher

log = logging.getLogger("trihrge")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with our error contract: a bad option is one `error:` line (no usage dump), exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------
# validators: each parses a command-line string (argparse `type=`) and checks a value (`check`)

class Number:
    """A number within bounds: Number(int, lo=1) for a count, Number(float, lo=0, lo_open=True) for
    a positive finite value. NaN and infinities are always refused."""

    def __init__(self, kind, lo=None, hi=None, *, lo_open=False, hi_open=False, note=""):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open, self.note = kind, lo, hi, lo_open, hi_open, note
        self.__name__ = "integer" if kind is int else "number"  # argparse's word for a value it cannot parse

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        parts = []
        if self.lo is not None and self.lo == self.hi:
            parts.append(f"exactly {self.lo}")
        elif self.lo is not None:
            parts.append(f"{'above' if self.lo_open else 'at least'} {self.lo}")
        if self.hi is not None and self.hi != self.lo:
            parts.append(f"{'below' if self.hi_open else 'at most'} {self.hi}")
        return f"{what} {' and '.join(parts)}".strip() + (f" ({self.note})" if self.note else "")

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.kind is int and v != int(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __call__(self, text: str):
        try:
            v = self.kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {self.describe()}")
        return v

    def check(self, option: str, v):
        """For values that did not come through argparse (a config built in code)."""
        if not self.ok(v):
            raise InputError(f"{option} {v!r}: must be {self.describe()}")
        return v


POSITIVE_INT = Number(int, lo=1)
COUNT = Number(int, lo=0)                           # 0 allowed (usually "auto" or "off")
SEED = Number(int, lo=0, hi=2 ** 32 - 1)
POSITIVE = Number(float, lo=0, lo_open=True)
NON_NEGATIVE = Number(float, lo=0)
PROBABILITY = Number(float, lo=0, hi=1)


NAME_MAX, PATH_MAX = 255, 4096   # Linux's limits (bytes), the same on every common file system


def gene_name(text: str) -> str:
    """A gene name from the command line, without the spaces around it (a shell's quoting leaves them)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: an empty gene name")
    return text.strip()


def path_arg(text: str) -> Path:
    """A path from the command line; an empty one is refused (Path('') would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: an empty path; give a file or folder")
    path = Path(text).expanduser()
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > NAME_MAX or len(os.fsencode(str(path))) > PATH_MAX:   # every use would be Errno 36
        raise argparse.ArgumentTypeError(f"{text[:60]}...: longer than the file system allows ({NAME_MAX} bytes a "
                                         f"name, {PATH_MAX} a path); give a shorter path")
    return path


def output_directory(text: str) -> Path:
    """A directory to write into: refused at once when the path (or the nearest of its folders that
    exists) is a file, or when nothing can be written there (no permission, a read-only or virtual file
    system such as /proc: found by making and removing an empty folder, not after hours of training)."""
    p = path_arg(text)
    _check_writable(text, p)
    return p


def output_file(text: str) -> Path:
    """A file to write (a summary, a table): refused at once when it is a directory or when nothing can
    be written in its folder (as output_directory)."""
    p = path_arg(text)
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text}: names a folder; give a file name")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; give a file name")
    _check_writable(text, p.parent)
    return p


def _check_writable(text: str, folder: Path) -> None:
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {base} exists and is not a directory; give a folder for the outputs")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=base))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: nothing can be written in {base} ({e.strerror or e}); "
                                         f"give a writable place for the outputs") from None


def text_file(text: str) -> Path:
    p = path_arg(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {'is a directory, not a file' if p.is_dir() else 'not found'}")
    return p


# ---------------------------------------------------------------------------------------------

def make_parser(description: str, epilog: str = None) -> Parser:
    """The parser of a stage script, with the options every stage shares."""
    p = Parser(description=description, epilog=epilog)
    p.add_argument("--directory", "-d", required=True, type=path_arg,
                   help="data directory in the raw layout (he-raw.*, pixel-size-raw.txt, cnts.*, "
                        "locs-raw.*, radius-raw.txt); every stage reads and writes its artifacts here")
    p.add_argument("--force", action="store_true",
                   help="run even if upstream artifacts are stale (their inputs changed after they were made)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors in the log")
    return p


def add_seed(p, default: int = 0) -> None:
    p.add_argument("--seed", type=SEED, default=default,
                   help="random seed; same inputs + seed give the same outputs (see README, 'Reproducibility')")


def add_device(p) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute: auto takes the GPU when one is present")


def setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)


def check_directory(directory) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d}: not a directory; pass --directory pointing at the folder that holds he-raw.* and the other raw inputs")
    if not os.access(d, os.W_OK | os.X_OK):
        raise InputError(f"{d}: no write permission; the stages write their artifacts there, so make it writable "
                         f"(chmod u+w) or copy the data to a folder you own")
    return d


def one_line(message: str) -> str:
    """message with its control characters escaped (a newline in a folder's name as \\n), so an
    error stays one line whatever the paths it names hold."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c)[0] == "C" else c
                   for c in message)


def run(main, argv=None, *, distributed: bool = False):
    """Run a command's main(argv); InputError -> one line on stderr and exit code 2.

    distributed: the command may run under torchrun (utils.core.distributed): its ranks join one
    process group first, and every rank's success or failure is exchanged when main ends or fails,
    so a failure on any rank stops them all with one `error:` line (from rank 0) and its exit code;
    after a failure the ranks leave together, so torchrun stops none of them before rank 0 has
    cleaned up and printed the line."""
    world, code = None, 1
    try:
        end_with_launcher()
        world = _launch() if distributed else None
        code = _main(main, argv, world) or 0
    except InputError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        code = 2
    except Stopped as e:
        if e.message:
            print(f"error: {one_line(e.message)}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted: the previous artifacts are intact; rerun the same command to finish", file=sys.stderr)
        code = 130
    except Exception:
        if world is None or world.size == 1:
            raise
        traceback.print_exc()  # now: torchrun may stop this rank as soon as the others have left
        code = 1
    finally:
        if world is not None:
            world.leave(failed=code != 0)
    if world is not None and world.size > 1:
        # every rank has cleaned up and reported: exit at once, without the interpreter's teardown of
        # torch. After a failure torchrun would stop the slower ranks (SIGTERM) during it; after a
        # success it aborted now and then by itself (gloo's threads: "terminate called without an
        # active exception", about 1 run in 20 of two ranks extracting tile features here)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _main(main, argv, world):
    """main(argv), with its success or failure agreed among the ranks of a distributed run."""
    if world is None:
        return main(argv)
    try:
        rc = main(argv)
    except Stopped:
        raise
    except BaseException as e:
        world.agree(e)
        raise
    world.sync()
    return rc


def _launch():
    from .distributed import launch
    return launch()
