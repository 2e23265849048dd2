"""Atomic artifact writing: a stage writes every output to a temporary name next to its final
place and renames them all only once everything succeeded, so a crash or kill in the middle leaves
the previous artifacts intact and no half-written file under a real name."""
import contextlib
import json
import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"


def tmp_path_for(final):
    """A temporary sibling of `final` that keeps its suffix (so writers pick the right format)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")


class StagedOutputs:
    """Collects temporary outputs and commits them together.

    with StagedOutputs() as out:
        p = out.path(dir / "locs.tsv")   # write to p
        ...
    # on normal exit every file is renamed into place; on an exception all temporaries are removed
    """

    def __init__(self):
        self._pending = []  # (tmp, final)

    def path(self, final):
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(final)
        _remove(tmp)
        self._pending.append((tmp, final))
        return tmp

    def write_text(self, final, text):
        tmp = self.path(final)
        tmp.write_text(text)
        return final

    def write_json(self, final, obj):
        return self.write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    @property
    def finals(self):
        return [f for _, f in self._pending]

    def commit(self):
        for tmp, _ in self._pending:
            if not tmp.exists():
                raise RuntimeError(f"internal error: staged output {tmp} was never written")
        for tmp, final in self._pending:
            if tmp.is_dir() and final.exists():
                # a directory cannot replace a non-empty one: move the old one aside first
                old = final.with_name(f"{TMP_PREFIX}{os.getpid()}-old-{final.name}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        self._pending = []

    def abort(self):
        for tmp, _ in self._pending:
            _remove(tmp)
        self._pending = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def _remove(p):
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory):
    """Sweep temporaries left by killed processes (never under a real artifact name)."""
    for p in Path(directory).glob(f"**/{TMP_PREFIX}*"):
        pid = p.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        _remove(p)
