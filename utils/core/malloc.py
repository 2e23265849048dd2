"""glibc's malloc thresholds, fixed for processes that allocate and free the same multi-megabyte
temporaries at every step (training, the row-chunk passes).

glibc starts by serving blocks over 128 KB with mmap and by giving freed memory at the top of the
heap back to the kernel once 128 KB of it is free; it raises both thresholds only after it frees a
larger mmap'ed block. Until then each step's temporaries are unmapped and faulted in again, zeroed,
at the next step: the first state of each training worker on the large demo took 1.5 M page faults
and ran its epochs 1.25-1.4 x slower than the next state in the same process (docs/BENCHMARKS.md,
"glibc's malloc thresholds"). Fixed at 32 MB (mmap) and 64 MB (trim), a process keeps at most
64 MB of freed memory for reuse."""
import ctypes
import logging

log = logging.getLogger("trihrge")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt's parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20                        # glibc's largest dynamic threshold on 64-bit systems
TRIM_THRESHOLD = 64 << 20


def libc_function(name: str):
    """The function `name` of this process's C library (ctypes), or None where it has none (mallopt
    and prctl on macOS) or there is no such library (Windows: no CDLL(None), a TypeError)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None


def keep_freed_memory() -> bool:
    """Fix this process's malloc thresholds (module docstring). Returns False, changing nothing,
    where the C library has no mallopt (macOS, Windows) or refuses the values."""
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.debug("mallopt refused the malloc thresholds; glibc's defaults stay")
    return done
