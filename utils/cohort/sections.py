"""Which section directories a cohort run works on: paths and glob patterns from the command line
or a list file, expanded and checked before any stage runs, and this process's share of them when
several processes (torchrun ranks) split the cohort."""
import glob
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..core.distributed import check_launcher, world_from_env
from ..core.errors import InputError
from ..core.text_io import read_text
from ..scverse.spatial import folder_library_id, storable_library_id

GLOB_CHARS = set("*?[")


def expand_one(text: str, *, base: Path = Path(".")) -> list[Path]:
    """The directories named by one path or glob pattern (relative ones under `base`), as absolute
    paths (the stages may run elsewhere; symbolic links are kept as given).

    A directory that exists as written is taken as it is, even with [ ] * ? in its name; otherwise
    a pattern is expanded here (so it may be quoted against the shell; `base` is never read as a
    pattern) and keeps the directories it matches, sorted. A pattern that matches no directory, or a
    path that is not a directory, is an InputError."""
    path = (base / Path(text).expanduser()).absolute()
    if GLOB_CHARS & set(text) and not path.is_dir():
        relative = Path(text).expanduser()
        pattern = str(relative) if relative.is_absolute() else os.path.join(glob.escape(str(base.absolute())), text)
        found = sorted(Path(p).absolute() for p in glob.glob(pattern) if Path(p).is_dir())
        if not found:
            raise InputError(f"{text}: the pattern matches no directory; check the pattern (quote it so that the "
                             f"shell leaves it to this command) or the current directory")
        return found
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "not found"
        raise InputError(f"{path}: {what}; give the section directories (each in the raw layout)")
    return [path]


def read_list_file(path: Path) -> list[Path]:
    """The directories listed in a text file, one path or glob pattern a line; blank lines and lines
    starting with # are skipped, and relative paths are taken from the file's own folder (so the
    list works from anywhere)."""
    lines = [line.strip() for line in read_text(path, "list of section directories").splitlines()]
    out = []
    for line in lines:
        if line and not line.startswith("#"):
            out += expand_one(line, base=Path(path).parent)
    if not out:
        raise InputError(f"{path}: lists no section directory (only blank or # lines); write one directory "
                         f"or glob pattern a line")
    return out


def collect_sections(patterns: Sequence[str], *, from_file: Path | None = None) -> list[Path]:
    """Every section directory of the command line and the list file, in the order given, each
    once (the same folder reached twice, e.g. by a path and a pattern, is kept the first time)."""
    found = [p for text in patterns for p in expand_one(text)]
    if from_file is not None:
        found += read_list_file(from_file)
    if not found:
        raise InputError("no section directories given; pass them as arguments (paths or quoted glob patterns) "
                         "or with --from-file FILE")
    unique = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def rank_share(sections: Sequence[Path], *, environ: Mapping = os.environ) -> tuple[list[Path], int, int]:
    """(this process's sections, rank, world size). Under torchrun (RANK and WORLD_SIZE set) rank r
    takes sections r, r + N, r + 2N, ... of the N ranks; otherwise all of them (rank 0 of 1). The
    ranks run independently: no process group (utils.core.distributed.world_from_env only reads
    the variables)."""
    world = world_from_env(environ)
    check_launcher(world, environ)   # a stray WORLD_SIZE would leave the other ranks' sections undone
    return world.strided(sections), world.rank, world.size


def library_ids(sections: Sequence[Path]) -> dict[Path, str]:
    """{section: library id} for the sections whose folder names collide (p1/visium, p2/visium):
    the shortest tail of their paths that tells them apart, its folders joined by '-' (p1-visium),
    so that anndata.concat of their maps keeps each section's images. Other sections keep the
    default (their folder's name) and are not listed."""
    groups = {}
    for s in sections:
        groups.setdefault(folder_library_id(s), []).append(Path(s))
    out = {}
    for paths in (g for g in groups.values() if len(g) > 1):
        parts = [p.resolve().parts[1:] for p in paths]
        names = [storable_library_id(q[-1]) for q in parts]
        for n in range(2, max(map(len, parts)) + 1):
            names = [storable_library_id("-".join(q[-n:])) for q in parts]   # cut at the end: the telling part is first
            if len(set(names)) == len(names):
                break
        else:   # told apart only beyond the length limit, or by where '-' joins
            names = [storable_library_id(f"{i + 1}-{name}") for i, name in enumerate(names)]
        out.update(zip(paths, names))
    return out
