"""The stage runner: the one skeleton every stage script and converter runs in.

    with Stage("get_HR", directory, force=force) as st:      # lock, sweep, check upstream
        ...read and check the inputs...
        st.record(inputs=[...], parameters={...})            # logs what changed since the last run
        st.require_space(n_bytes, "spots.h5ad")              # before writing anything big
        path = st.out.path(directory / "spots.h5ad")         # staged outputs (utils.core.atomic)
    # normal exit: the outputs and the manifest are committed together; any exception: nothing in
    # DIR changes, the temporaries are gone, a full disk becomes one `error:` line

In this order on entry: an exclusive lock on DIR (a second run on the same DIR is refused with the
holder's stage and pid; the lock of a process that died is taken over, with a log line), the sweep
of this project's temporaries left by killed runs, and the check of the upstream artifacts."""
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

from . import manifest as mf
from .atomic import (
    TMP_MARKER,
    StagedOutputs,
    folder_identity,
    is_disk_full,
    remove,
    remove_empty_tree,
    remove_stale_temporaries,
    tmp_path_for,
)
from .distributed import current
from .errors import InputError

log = logging.getLogger("trihrge")

LOCK_NAME = ".trihrge.lock"
SPACE_MARGIN = 1.05     # require the estimate plus 5% (file-system overhead, manifests, logs)


class DirectoryLock:
    """An exclusive flock on DIR/.trihrge.lock naming its holder; the file goes when released."""

    def __init__(self, directory: Path, holder: str):
        self.path = Path(directory) / LOCK_NAME
        self.holder = holder
        self._fd = None

    @staticmethod
    def _holder_of(fd) -> dict:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _busy_message(directory: Path, holder: dict) -> str:
        return (f"{directory}: in use by {holder.get('stage', 'another TriHRGE process')} (pid "
                f"{holder.get('pid', '?')}, since {holder.get('started', '?')}); wait until it has finished (or "
                f"stop it), then rerun")

    @classmethod
    def holder_message(cls, directory: Path) -> str | None:
        """The refusal acquire() would give now, without taking the lock; None when it is free."""
        try:
            fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return cls._busy_message(Path(directory), cls._holder_of(fd))
        finally:
            os.close(fd)   # also lets go of the shared lock

    def acquire(self) -> "DirectoryLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                fix = f"remove that folder ({self.path})" if self.path.is_dir() else "make the directory writable"
                raise InputError(f"{self.path.parent}: cannot create the lock file {LOCK_NAME} ({e.strerror}); "
                                 f"{fix}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                h = self._holder_of(fd)
                os.close(fd)
                raise InputError(self._busy_message(self.path.parent, h)) from None
            try:  # the previous holder may have removed the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._holder_of(fd)
        if previous.get("pid"):
            log.info("taking over the lock of %s (pid %s), which ended without releasing it",
                     previous.get("stage", "?"), previous["pid"])
        me = {"stage": self.holder, "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its label is missing
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        remove(self.path)
        os.close(self._fd)
        self._fd = None


class Stage:
    """One run of a pipeline stage (or a converter, with manifest=False) on DIR.

    stage: the key in utils.core.manifest.STAGES (for a converter: a label for the lock).
    force: use stale upstream artifacts (logged). sweep: further folders whose temporaries are this
    run's business (HISTEX's --out outside DIR). create: make DIR when it is missing (a converter's
    new folder); a folder made here, for DIR or lock_also, is removed again when a failed run leaves
    it empty."""

    def __init__(self, stage: str, directory: Path, *, force: bool = False, manifest: bool = True,
                 sweep: tuple = (), lock_also: tuple = (), create: bool = False, views: tuple = ()):
        self.stage = stage
        self.views = tuple(views)   # names of outputs that later commands rewrite by design: not fingerprinted
        self.directory = Path(directory)
        self.force = force
        self.write_manifest = manifest
        self.sweep = tuple(Path(p) for p in sweep)
        self.out = StagedOutputs()
        self.inputs: list = []
        self.parameters: dict = {}
        self._scratch: list = []
        holder = mf.STAGES[stage][0] if stage in mf.STAGES else stage
        self._lock = DirectoryLock(self.directory, holder)
        # folders outside DIR written too (HISTEX --out elsewhere): locked as well, made if missing
        self._more_locks = [DirectoryLock(Path(d), holder) for d in lock_also]
        self._made: list = []
        self._create = create
        self._identity = None

    # --- entry ------------------------------------------------------------------------------
    def __enter__(self) -> "Stage":
        try:
            if self._create:
                self._make(self.directory)
            self._lock.acquire()
            self._identity = folder_identity(self.directory)
            for lock in self._more_locks:
                self._make(lock.path.parent)
                lock.acquire()
            for d in (self.directory, *self.sweep):
                if d.is_dir():
                    remove_stale_temporaries(d)
            if self.write_manifest:
                mf.check_upstream(self.directory, self.stage, force=self.force, log=log)
        except BaseException:
            self._release()
            raise
        return self

    def _make(self, folder: Path) -> None:
        self._made += [p for p in (folder, *folder.parents) if not p.exists()]   # deepest first
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{e.filename or folder}: cannot be created ({e.strerror or e}); pass a folder in a "
                             f"place you can write to") from None

    def _release(self) -> None:
        for lock in (*self._more_locks, self._lock):
            lock.release()
        for d in self._made:   # folders this run made, left empty by a failure
            with contextlib.suppress(OSError):
                d.rmdir()

    def record(self, inputs, parameters: dict) -> None:
        """The inputs (files) and parameters that go into the manifest; logs what changed since the
        previous run of this stage."""
        self.inputs = [Path(p) for p in inputs]
        self.parameters = dict(parameters)
        if self.write_manifest:
            reasons = mf.changed_since_last_run(self.directory, self.stage, self.inputs, self.parameters)
            if reasons:
                log.info("recomputing: %s", "; ".join(reasons))

    def require_space(self, n_bytes: float, what: str, where: Path = None) -> None:
        """Refuse to start writing `what` (about n_bytes) when the disk cannot hold it."""
        where = Path(where or self.directory)
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        if n_bytes * SPACE_MARGIN > free:
            raise InputError(f"{where}: {what} needs about {_size(n_bytes * SPACE_MARGIN)} of disk and only {_size(free)} is free; "
                             f"free some space and rerun (the previous artifacts are replaced only once the new "
                             f"ones are complete)")

    def scratch(self, near: Path) -> Path:
        """A per-process scratch path next to `near` (the output it becomes), removed on every exit."""
        p = tmp_path_for(Path(near), "scratch-")
        p.parent.mkdir(parents=True, exist_ok=True)
        self._scratch.append(p)
        return p

    # --- exit -------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb):
        committing = exc_type is None
        try:
            if committing:
                try:
                    self._commit()
                except BaseException as e:
                    exc = e
            if exc is not None:
                self.out.abort()
        finally:
            for p in self._scratch:
                remove(p)
            self._release()
        if exc is None:
            return False
        if is_disk_full(exc):
            raise InputError(f"{self.directory}: the disk is full (No space left on device) while writing the "
                             f"outputs; free some space and rerun (nothing was changed, no temporary is left)") from None
        if isinstance(exc, OSError) and (committing or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise InputError(f"{exc.filename or self.directory}: cannot be written ({exc.strerror or exc}); make it "
                             f"writable and rerun (the previous artifacts are unchanged)") from None
        if committing:
            raise exc
        return False

    def _commit(self) -> None:
        if folder_identity(self.directory) != self._identity:   # deleted or moved while the stage ran
            self.out.abort()
            if self._identity is not None and self.directory.is_dir():   # made anew by this run's writes
                remove_empty_tree(self.directory)
            raise InputError(f"{self.directory}: the folder was deleted or moved while {self.stage} ran; nothing was "
                             f"written: rerun it on the folder where it is now")
        if self.write_manifest:
            staged = [(tmp, final) for tmp, final in self.out.pending]
            m = mf.build_manifest(self.directory, self.stage, self.parameters, self.inputs, staged, views=self.views)
            self.out.write_json(mf.manifest_path(self.directory, self.stage), m)
        self.out.commit()  # the manifest is the last rename: it never describes outputs not in place


def user_entries(folder: Path) -> list:
    """The names in folder other than a stage's lock and temporaries (what a killed run leaves): whether
    a folder holds someone's files."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name != LOCK_NAME and not p.name.startswith(TMP_MARKER))


def run_folder_stage(stage: str, run_dir: Path, directory: Path | None) -> Stage:
    """The Stage of a command that writes into a HISTEX run folder (analysis, score --write): it locks
    the data directory and the run folder, as HISTEX does while it writes the run (a run folder may be
    reached from more than one DIR with --out); without a data directory, the run folder alone."""
    first, *also = _run_folder_locks(run_dir, directory)
    return Stage(stage, first, manifest=False, sweep=(Path(run_dir),), lock_also=tuple(also))


def run_folder_in_use(run_dir: Path, directory: Path | None) -> str | None:
    """The refusal run_folder_stage would give now (another process holds one of its locks), or None."""
    return next(filter(None, map(DirectoryLock.holder_message, _run_folder_locks(run_dir, directory))), None)


def _run_folder_locks(run_dir: Path, directory: Path | None) -> list:
    run_dir = Path(run_dir)
    if directory is None or Path(directory).resolve() == run_dir.resolve():
        return [run_dir]
    return [Path(directory), run_dir]


def rank_stage(stage: str, directory: Path, **options):
    """Stage(stage, directory, **options) in one process and on rank 0 under torchrun; on the other
    ranks a context that gives None: they neither lock DIR nor commit anything (their only writes
    are their trained states and their rows of rank 0's staged arrays)."""
    return Stage(stage, directory, **options) if current().leader else contextlib.nullcontext()


def _size(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"
