"""Atomic artifact writing: a stage writes every output to a temporary name next to its final
place and renames them all only once everything succeeded, so a crash or kill in the middle leaves
the previous artifacts intact and no half-written file under a real name.

Temporaries are named `.trihrge-tmp-<pid>-<name>`: the marker is one no user would choose, so the
sweep of temporaries left by killed runs never touches a user's own files (`.tmp-notes.txt`)."""
import contextlib
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

from .errors import InputError

TMP_MARKER = ".trihrge-tmp"
_TMP_NAME = re.compile(rf"^{re.escape(TMP_MARKER)}-(\d+)-")


def tmp_path_for(final: Path, tag: str = "") -> Path:
    """A temporary sibling of `final` that keeps its suffix (so writers pick the right format)."""
    final = Path(final)
    return final.with_name(f"{TMP_MARKER}-{os.getpid()}-{tag}{final.name}")


def is_disk_full(exc: BaseException) -> bool:
    """An OSError (from Python, h5py or OpenCV) that says the disk or quota is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "errno = 28" in str(exc)


def reserve(path: Path) -> None:
    """Allocate the disk blocks of a (sparse) memory-mapped file now: a full disk then raises ENOSPC
    here, instead of killing the process with SIGBUS when a page is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def npy_memmap(path: Path, dtype, shape):
    """A writable .npy memory map created at path, its disk blocks reserved (reserve)."""
    from numpy.lib.format import open_memmap
    arr = open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    reserve(path)
    return arr


def rgb_tiff_memmap(path: Path, height: int, width: int):
    """A writable uncompressed (height, width, 3) uint8 RGB TIFF memory map created at path, its disk
    blocks reserved (reserve)."""
    import tifffile
    mm = tifffile.memmap(str(path), shape=(height, width, 3), dtype="uint8", photometric="rgb")
    reserve(path)
    return mm


class StagedOutputs:
    """Collects temporary outputs and commits them together.

    with StagedOutputs() as out:
        p = out.path(dir / "locs.tsv")   # write to p
        ...
    # on normal exit every file is renamed into place; on an exception all temporaries are removed
    """

    def __init__(self):
        self._pending = []  # (tmp, final)
        self._discarded = []  # finals of an earlier run that this one does not write: removed on commit

    def path(self, final: Path) -> Path:
        final = Path(final)
        for parent in (final.parent, *final.parent.parents):
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise InputError(f"{parent}: is a file where a directory is expected (for {final.name}); "
                                     f"move it away or delete it and rerun")
                break
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(final)
        remove(tmp)
        self._pending.append((tmp, final))
        return tmp

    def write_text(self, final: Path, text: str) -> Path:
        self.path(final).write_text(text)
        return final

    def write_json(self, final: Path, obj) -> Path:
        return self.write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def memmap(self, final: Path, dtype, shape):
        """A writable .npy memory map staged for `final`, its disk blocks reserved up front."""
        return npy_memmap(self.path(final), dtype, shape)

    def staged(self, final: Path):
        """The temporary that `final` is being written to, None when it is not staged yet."""
        return next((tmp for tmp, f in self._pending if f == Path(final)), None)

    def discard(self, final: Path) -> None:
        """Remove `final` when the outputs are committed (an output of an earlier run that this run
        does not make, so that nothing reads it as this run's)."""
        self._discarded.append(Path(final))

    @property
    def discarded(self):
        return list(self._discarded)

    @property
    def pending(self):
        """(temporary, final) pairs not yet committed."""
        return list(self._pending)

    @property
    def finals(self):
        return [f for _, f in self._pending]

    def commit(self):
        for tmp, final in self._pending:
            if not tmp.exists():
                raise RuntimeError(f"internal error: staged output {tmp} was never written")
            # checked before the first rename: os.replace would fail there, halfway through the commit
            if final.is_dir() and not final.is_symlink() and not tmp.is_dir():
                raise InputError(f"{final}: is a directory where this file is to be written; remove or rename "
                                 f"that directory and rerun (nothing was changed)")
        for tmp, final in self._pending:
            if tmp.is_dir() and final.exists():
                # a directory cannot replace a non-empty one: move the old one aside first
                old = tmp_path_for(final, "old-")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        for final in self._discarded:
            remove(final)
        self._pending, self._discarded = [], []

    def abort(self):
        for tmp, _ in self._pending:
            remove(tmp)
        self._pending, self._discarded = [], []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.abort()   # what a failed commit left staged (after a commit: nothing)
        return False


def remove(p: Path) -> None:
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def folder_identity(directory: Path) -> tuple | None:
    """(device, inode) of a folder, None when there is none: a folder deleted or moved while a run
    worked in it, and made anew by that run's writes, has another."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def remove_empty_tree(directory: Path) -> None:
    """Remove the empty folders under and at `directory`, deepest first; anything holding a file stays."""
    for root, _, _ in sorted(os.walk(directory), key=lambda w: -len(Path(w[0]).parts)):
        with contextlib.suppress(OSError):
            os.rmdir(root)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that ended and that no parent has reaped: dead, though signal 0 still reaches it (in a
    container whose first process reaps nothing, a stage killed with its parent stays one for good)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def remove_stale_temporaries(directory: Path) -> list:
    """Sweep the temporaries of processes that are gone (only names with this project's marker)."""
    swept = []
    for p in Path(directory).rglob(f"{TMP_MARKER}-*"):
        m = _TMP_NAME.match(p.name)
        if m is None or (int(m.group(1)) != os.getpid() and pid_alive(int(m.group(1)))):
            continue
        remove(p)
        swept.append(p)
    return swept
