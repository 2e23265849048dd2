"""Workers of a stage: thread_map for passes over independent chunks whose heavy loops release the
GIL (numpy, OpenCV), and worker processes: spawned (safe with OpenMP and CUDA, unlike fork), with malloc's
thresholds fixed (core.malloc), and ending with the process that started them: a HISTEX.py killed
with SIGKILL used to leave its training workers running as orphans for minutes, which then wrote
their states into DIR after its lock was gone (tests/test_robustness.py)."""
import contextlib
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from .malloc import keep_freed_memory, libc_function

PR_SET_PDEATHSIG = 1   # prctl option (linux/prctl.h): a signal for this process when its parent ends
END_WITH_PARENT = "TRIHRGE_END_WITH_PARENT"   # a command started with this pid in it stops when that process ends


def thread_map(fn, items, *, threads: int | None = None) -> list:
    """[fn(item) for item in items] on `threads` threads (default: the CPUs available, at most one
    per item); the first exception of a call is raised here."""
    from .device import available_cpus
    items = list(items)
    with ThreadPoolExecutor(max(1, min(threads or available_cpus(), len(items)))) as pool:
        return list(pool.map(fn, items))


def worker_pool(workers: int, setup: tuple | None = None) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that end with this one; setup (fn, arg): each worker
    calls fn(arg) once when it starts (data its tasks share, sent once)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(), setup))


def _start_worker(parent: int, setup: tuple | None = None):
    keep_freed_memory()
    end_with_parent(parent)
    if setup is not None:
        setup[0](setup[1])


def end_with_parent(parent: int, poll_seconds: float = 1.0, sig: int = signal.SIGKILL):
    """Send this process `sig` when `parent` ends: Linux's PR_SET_PDEATHSIG, elsewhere a daemon thread
    that checks the parent every poll_seconds; at once if the parent has already gone."""
    prctl = libc_function("prctl")  # Linux only
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig)) != 0:
        threading.Thread(target=_watch_parent, args=(parent, poll_seconds, sig), daemon=True).start()
    if os.getppid() != parent:  # it ended before the request took hold
        os.kill(os.getpid(), sig)


def end_with_launcher(environ=os.environ) -> None:
    """A command that utils.cohort started (END_WITH_PARENT set to the cohort's pid) gets SIGINT, and
    so cleans up as after a Ctrl-C, when the cohort ends: killed, or stopped by torchrun."""
    parent = environ.pop(END_WITH_PARENT, "")   # for this process only, not for the ones it starts
    if not parent.isdigit():
        return
    # started in the background by a script (`cmd &`), the cohort and so this process ignore SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    end_with_parent(int(parent), sig=signal.SIGINT)   # at once if the launcher died during the imports


def _watch_parent(parent, poll_seconds, sig):
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    os.kill(os.getpid(), sig)


# Commands this process runs to their end (the cohort's stages, the demo's steps). Each runs in its
# own process group, so a Ctrl-C at the terminal reaches only this process, which passes one SIGINT
# on (a command cleans up on the first; a second could interrupt that), and each ends with this
# process (END_WITH_PARENT): none is left writing into DIR as an orphan.
_CHILDREN: set = set()
_CHILDREN_LOCK = threading.Lock()
STOP_GRACE_SECONDS = 120


def run_child(cmd, *, env=None, **popen) -> int:
    """Run a command to its end and return its exit code; interrupted (KeyboardInterrupt), stop every
    running child cleanly first (interrupt_children)."""
    env = dict(os.environ if env is None else env, **{END_WITH_PARENT: str(os.getpid())})
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, process_group=0, **popen)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        interrupt_children()
        raise
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)


def interrupt_children() -> None:
    """SIGINT to every running child, then wait for each to clean up (SIGKILL after the grace)."""
    with _CHILDREN_LOCK:
        procs = list(_CHILDREN)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
