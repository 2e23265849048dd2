"""Runs under torchrun: the process group of one stage run and the few operations the stages share.

    world = distributed.current()         # World(rank=0, size=1) outside torchrun: every method is a no-op
    mine = world.strided(items)           # rank r's share: items r, r + N, r + 2N, ...
    world.sync()                          # a barrier that also tells every rank whether all are well
    paths = world.share(paths)            # rank 0's object on every rank
    world.add_rows_at_leader(index, values, out)   # every rank's partial rows added into rank 0's array

The group is set up by cli.run(main, distributed=True) from the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo for CPU tensors, plus
NCCL for CUDA tensors when a GPU is visible (each rank on GPU LOCAL_RANK). Outside torchrun, or
with WORLD_SIZE=1, torch.distributed is never touched.

Failures: every synchronisation point is the same collective, an exchange of each rank's status
(`agree`). A rank that raises reports its failure at the next synchronisation point of the others
(cli.run does that for an exception anywhere in the stage), so no rank waits in a barrier for a
rank that has stopped; then every rank stops: rank 0 prints the one `error:` line (its own, or the
failing rank's message with its rank), the others stop quietly (utils.core.errors.Stopped), all
with the exit code of the failure (2 for an InputError). Data collectives (broadcast, the row
exchange) run only right after a synchronisation point that every rank passed."""
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError, Stopped

# A rank waits at a synchronisation point for the slowest one, which may train states for hours; a
# rank that dies is noticed by torchrun, which stops the others, so this only bounds a real hang.
TIMEOUT = datetime.timedelta(hours=24)
JOIN_TIMEOUT = datetime.timedelta(minutes=10)   # processes started by hand: how long rank 0 waits for the rest
EXCHANGE_ROWS = 16384       # rows per message of the row exchange (bounds its memory)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run (rank 0 of 1 outside torchrun)."""
    rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0: holds the DIR lock and writes everything but the other ranks' rows and states."""
        return self.rank == 0

    def strided(self, items: Sequence) -> list:
        """This rank's share of `items`: items rank, rank + size, ... (all of them in one process)."""
        return list(items[self.rank::self.size])

    def block(self, n: int) -> range:
        """This rank's contiguous share of range(n): the size blocks differ by at most one item."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def cpus(self, available: int) -> int:
        """This rank's share of the node's `available` CPUs (the ranks of a node split them)."""
        return max(1, available // self.local_size)

    def agree(self, error: BaseException | None = None) -> None:
        """A synchronisation point: returns when every rank reports success; otherwise raises on every
        rank (see the module docstring). The failing rank 0 returns, so that it re-raises its own
        exception; a failing rank > 0 re-raises a non-InputError itself (its traceback is the news)."""
        if self.size == 1:
            return
        import torch.distributed as dist
        statuses = [None] * self.size
        dist.all_gather_object(statuses, _status(error))
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if not failed:
            return
        first, (kind, text, code) = failed[0]
        if error is not None and (self.leader or not isinstance(error, InputError)):
            return
        if not self.leader:
            raise Stopped(code)
        detail = text if code == 2 else f"failed with {kind}: {text} (its traceback is above)"
        raise Stopped(code, f"{detail} (rank {first} of {self.size})")

    def sync(self) -> None:
        """A barrier at which every rank learns whether all the others are well."""
        self.agree(None)

    def share(self, obj):
        """Rank 0's `obj` on every rank (after a synchronisation point)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        self.sync()
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (after a synchronisation point)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        self.sync()
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def leave(self, *, failed: bool) -> None:
        """Leave the process group at the end of a run; after a failure (which every rank knows by
        then) only once all ranks are here, so that torchrun, which stops the others when one exits
        with an error, stops none that is still cleaning up or reporting."""
        global _WORLD
        if self.size == 1:
            return
        import torch.distributed as dist
        if failed:
            try:
                dist.all_gather_object([None] * self.size, None)
            except Exception:  # a rank that is gone: torchrun takes over
                pass
        dist.destroy_process_group()
        _WORLD = World()

    def add_rows_at_leader(self, index: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
        """out[index] += values on rank 0 for the (index, values) of every rank, in rank order (after a
        synchronisation point); out is rank 0's and may be None elsewhere; a rank's indices are distinct. Every rank's values have
        the same dtype and trailing shape. Rows several ranks hold are summed in rank order, which
        may differ from the order of one process by float rounding."""
        if self.size == 1:
            _add(out, index, values)
            return
        import torch.distributed as dist
        self.sync()
        counts = [None] * self.size
        dist.all_gather_object(counts, len(index))
        if not self.leader:
            for a in range(0, len(index), EXCHANGE_ROWS):
                dist.send(_tensor(index[a:a + EXCHANGE_ROWS].astype(np.int64)), dst=0)
                dist.send(_tensor(values[a:a + EXCHANGE_ROWS]), dst=0)
            return
        _add(out, index, values)
        for src in range(1, self.size):
            for a in range(0, counts[src], EXCHANGE_ROWS):
                n = min(EXCHANGE_ROWS, counts[src] - a)
                rows = _tensor(np.empty(n, np.int64))
                vals = _tensor(np.empty((n, *values.shape[1:]), values.dtype))
                dist.recv(rows, src=src)
                dist.recv(vals, src=src)
                _add(out, rows.numpy(), vals.numpy())


def _add(out, index, values):
    """out[index] += values for distinct indices, in chunks (out may be a large memmap)."""
    for a in range(0, len(index), EXCHANGE_ROWS):
        rows = index[a:a + EXCHANGE_ROWS]
        out[rows] = out[rows] + values[a:a + EXCHANGE_ROWS]


def _tensor(a: np.ndarray):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a))


def exit_code(error: BaseException) -> int:
    """The exit code a failure gives the run: 2 for bad input (cli.run's contract), 130 for an
    interruption, else 1."""
    if isinstance(error, Stopped):
        return error.exit_code
    if isinstance(error, InputError):
        return 2
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def _status(error: BaseException | None):
    """What a rank tells the others at a synchronisation point: None, or (kind, message, exit code)."""
    if error is None:
        return None
    return type(error).__name__, str(error), exit_code(error)


_WORLD = World()


def current() -> World:
    """The World of this process: set by launch(), rank 0 of 1 before (and outside torchrun)."""
    return _WORLD


def world_from_env(environ: Mapping = os.environ) -> World:
    """The World torchrun's variables describe; rank 0 of 1 when WORLD_SIZE is unset or 1."""
    size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise InputError(f"RANK={rank}, WORLD_SIZE={size}: the rank must be from 0 to WORLD_SIZE - 1 (torchrun "
                         f"sets both); unset them to run in one process")
    return World(rank, size, max(1, _env_int(environ, "LOCAL_WORLD_SIZE", size)) if size > 1 else 1)


def check_launcher(world: World, environ: Mapping = os.environ) -> None:
    """Several processes (WORLD_SIZE > 1) need the rendezvous torchrun sets up with them; a WORLD_SIZE
    left in the environment without it would make this process one of N that never come."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k, "").strip()]
    if world.size > 1 and missing:
        raise InputError(f"WORLD_SIZE={world.size} is set but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: start the processes with torchrun (README, "
                         f"'Many GPUs and clusters'), or unset WORLD_SIZE and RANK to run in one process")


def _own_store(world: World, environ: Mapping) -> dict:
    """Under torchrun the ranks have met already (its agent's store). Started some other way, with
    the variables set by hand, rank 0 waits JOIN_TIMEOUT for the others to connect instead of the
    24 h of TIMEOUT (a lone process with a stray WORLD_SIZE would otherwise wait that long)."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return {}
    import torch.distributed as dist
    store = dist.TCPStore(environ["MASTER_ADDR"].strip(), _env_int(environ, "MASTER_PORT", 0), world.size,
                          is_master=world.leader, timeout=JOIN_TIMEOUT, wait_for_workers=True)
    store.set_timeout(TIMEOUT)
    return {"store": store, "rank": world.rank, "world_size": world.size}


def _env_int(environ: Mapping, name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{name}={text!r}: not a whole number (torchrun sets it); unset it or fix it") from None


def launch(environ: Mapping = os.environ) -> World:
    """Join the process group torchrun set up (once per process) and return this process's World;
    outside torchrun the World of one process, with torch.distributed untouched."""
    global _WORLD
    world = world_from_env(environ)
    if world.size == 1 or _WORLD.size > 1:
        return _WORLD
    check_launcher(world, environ)
    import torch
    import torch.distributed as dist
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT, **_own_store(world, environ))
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        where = f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')}"
        raise InputError(f"RANK={world.rank}, WORLD_SIZE={world.size}: cannot join the other processes at {where} "
                         f"({str(e).strip().splitlines()[0][:160]}); start all of them with torchrun (README, 'Many "
                         f"GPUs and clusters'), or unset WORLD_SIZE and RANK to run in one process") from None
    if not world.leader:  # one log for the run: the other ranks report warnings only
        logging.getLogger("trihrge").setLevel(logging.WARNING)
    _WORLD = world
    return world


