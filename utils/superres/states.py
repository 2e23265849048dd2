"""Trained model states on disk: each state is trained once per inputs and settings, and a rerun
of HISTEX reuses it (a state's fingerprint is a hash of its training configuration and data).

<out>/states/state-NN.pt    the weights (torch.save of a state dict of tensors, read weights_only)
<out>/states/state-NN.json  fingerprint, seed, loss histories, timings, weights_sha256 (weights_digest)
A state that cannot be read (truncated, damaged, another format), whose weights are not finite, or
whose weights no longer match their recorded digest (edited after training) is trained again, with a
warning; a record without the digest (written before it existed) is not checked.

Bit-identical states for any thread count: on the CPU every state trains with one torch thread (a
multi-threaded weight gradient sums in a thread-dependent order: --threads 1 vs 2 moved counts by
0.3 on her2st C2); states train side by side in worker processes instead, one per CPU, in pieces
that any worker can continue (_train_in_pieces).

Under torchrun rank r trains states r, r + N, ... (each bit-identical to the same state trained in
one process), and after a barrier every rank loads them all from their files."""
import contextlib
import hashlib
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models import build_model

from ..core.atomic import StagedOutputs
from ..core.distributed import World
from ..core.errors import InputError
from ..core.layout import STATES_DIR
from ..core.workers import worker_pool
from .train import StateTraining, train_state

log = logging.getLogger("trihrge")


# raised when the same settings and seed train different weights, so that older states are retrained
# (2: dropout drawn for the kept tokens only and a fused Adam update; 3: dropout masks from PCG64 bits,
# models/layers.FastDropout; 4: the multi-scale gate fused on the CPU, models/scale_gate.py; 5: the
# output layer's element-wise part in numba loops on the CPU, models/footprint_loops.py)
TRAINING_VERSION = 5


def fingerprint(cfg: dict, data_fingerprint: dict) -> str:
    """Identity of a trained state: training settings, data (inference-only settings excluded) and
    TRAINING_VERSION."""
    train_cfg = {k: v for k, v in cfg.items() if k != "stride"}
    blob = json.dumps({"cfg": train_cfg, "data": data_fingerprint, "training": TRAINING_VERSION},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class DamagedState(ValueError):
    """Weights that load but cannot be the trained ones."""


def weights_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and tensor bytes: the same for bit-identical
    states (a .pt file's bytes are not: torch.save writes the temporary's name and a random id in them)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(state[k].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_weights(state: dict, digest) -> None:
    """DamagedState when a loaded state dict is not finite or not the one recorded (digest, None: not
    recorded): NaN weights made empty maps and a traceback, a weight x 1e30 a wrong map silently."""
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise DamagedState("weights that are not finite")
    if digest is not None and weights_digest(state) != digest:
        raise DamagedState("weights changed after training")


def load_state(cfg: dict, path: Path, device, digest=None):
    """The network of `cfg` with the weights in `path`, in eval mode on `device`; DamagedState when
    they are not finite or, given the digest recorded at training, differ from it."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_weights(state, digest)
    model = build_model(cfg["model"], cfg["dims"], cfg["n_genes"], 2 * cfg["half"] + 1, **cfg["model_opts"])
    model.load_state_dict(state)
    return model.to(device).eval()


def _paths(out_dir: Path, s: int):
    d = Path(out_dir) / STATES_DIR
    return d / f"state-{s:02d}.pt", d / f"state-{s:02d}.json"


def _reusable(cfg, fp_id, pt, meta_p, device):
    """(model, meta) of a finished state with this fingerprint; None when there is none or it is damaged."""
    if not (pt.exists() or meta_p.exists()):
        return None
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("loss_history"), list):
            raise ValueError("not a state record")
    except Exception as e:  # a state is a cache, not data: any damage means training it again
        log.warning("%s: damaged (%s); training this state again", meta_p, type(e).__name__)
        return None
    if meta.get("fingerprint") != fp_id:
        return None
    try:
        return load_state(cfg, pt, device, meta.get("weights_sha256")), meta
    except Exception as e:  # torch raises many types for truncated or foreign files
        log.warning("%s: damaged (%s); training this state again", pt, e if isinstance(e, DamagedState)
                    else type(e).__name__)
        return None


def _refuse_directories(paths) -> None:
    """A folder where a state's file goes would be taken for a damaged state, trained, and then fail
    to be committed: refused before training."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            raise InputError(f"{p}: is a directory where a trained state is to be written; remove or rename that "
                             f"directory and rerun")


def _check_writable(pt: Path) -> None:
    """Refuse a states folder that cannot be written before training, not at its commit (where a
    worker's torch.save failed with a long traceback): a temporary is made there and removed."""
    out = StagedOutputs()
    try:
        out.path(pt).touch()
    except OSError as e:
        raise InputError(f"{pt.parent}: cannot be written ({e.strerror or e}); the trained states are saved there: "
                         f"make it writable and rerun") from None
    finally:
        out.abort()


@contextlib.contextmanager
def _one_thread(device):
    """One intra-op torch thread on the CPU while training (see the module docstring)."""
    before = torch.get_num_threads()
    if str(device) == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_to_files(cfg, data, fp_id, seed, val_idx, pt, meta_p, device, progress, desc) -> dict:
    """Train one state and commit its weights and record together; returns the record."""
    t0 = time.time()
    with _one_thread(device):
        state, info = train_state(cfg, data, seed, device, progress, desc=desc, val_idx=val_idx)
    return _commit(fp_id, seed, cfg, state, info, time.time() - t0, pt, meta_p)


def _commit(fp_id, seed, cfg, state, info, seconds, pt, meta_p) -> dict:
    """Write a finished state's weights and record together (a later crash keeps it); returns the record."""
    meta = {"fingerprint": fp_id, "seed": seed, "epochs": cfg["epochs"], **info, "seconds": seconds,
            "spot_epochs_per_second": info["train_spots"] * info["epochs_run"] / max(1e-9, seconds),
            "weights_sha256": weights_digest(state)}
    with StagedOutputs() as out:
        torch.save(state, out.path(pt))
        out.write_json(meta_p, meta)
    return meta


def _log_trained(desc, cfg, meta):
    stop = (f"stopped after {meta['epochs_run']} epochs, best held-out loss at epoch {meta['best_epoch']}"
            if meta["epochs_run"] < cfg["epochs"] else f"{meta['epochs_run']} epochs")
    rates = meta.get("lr_history") or [cfg["lr"]]
    if rates[-1] < rates[0]:  # --lr-schedule cut it
        stop += f", learning rate cut to {rates[-1]:.2g}"
    log.info("%s: %s, final loss %.5f, in %.0f s", desc, stop, meta["loss_history"][-1], meta["seconds"])


# a worker trains a state for about this long, then hands it back to be continued by whichever worker
# is free next (see _train_in_pieces)
PIECE_SECONDS = 2.0
_WORKER_DATA = {}


def _start_training_worker(data):
    """A training worker's initializer: one torch thread for its whole life (switching the count for
    every piece would rebuild the thread pool), and the training data, sent once, not with every piece."""
    torch.set_num_threads(1)
    _WORKER_DATA["data"] = data


def _train_piece(cfg, job, snap, seconds_so_far, piece_seconds):
    """In a worker: continue state job[0] from snap (None: its start) for at least one epoch and
    about piece_seconds. Returns ("done", record) once it is finished and committed, else ("more",
    snapshot, seconds trained)."""
    s, fp_id, seed, val_idx, pt, meta_p, desc = job
    t0 = time.time()
    run = StateTraining(cfg, _WORKER_DATA["data"], seed, "cpu", val_idx)
    if snap is not None:
        run.restore(snap)
    run.run_epoch()
    while not run.done and time.time() - t0 < piece_seconds:
        run.run_epoch()
    seconds = seconds_so_far + time.time() - t0
    if run.done:
        return "done", _commit(fp_id, seed, cfg, *run.result(), seconds, pt, meta_p)
    return "more", run.snapshot(), seconds


def _train_in_pieces(pool, jobs, cfg, workers, progress, piece_seconds=PIECE_SECONDS):
    """Train jobs' states in the pool's workers, a piece at a time, always continuing the states
    that have trained least: a state's pieces may run in any worker (StateTraining restores it
    exactly), so the workers stay busy until fewer states than workers are left. Trained whole,
    one state per worker, the longest state often came last and trained alone (her2st C2: 17.6 of
    its 41 s). Returns {s: record}."""
    waiting = {job[0]: (job, None, 0.0) for job in jobs}   # s -> (job, snapshot, seconds trained)
    running, done = {}, {}
    with tqdm(total=len(jobs), desc="states", unit="state", disable=not progress, leave=False) as bar:
        while waiting or running:
            while waiting and len(running) < workers:
                s = min(waiting, key=lambda k: (waiting[k][2], k))
                job, snap, secs = waiting.pop(s)
                running[pool.submit(_train_piece, cfg, job, snap, secs, piece_seconds)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                job = running.pop(f)
                status, *rest = f.result()
                if status == "done":
                    done[job[0]] = rest[0]
                    _log_trained(job[-1], cfg, done[job[0]])
                    bar.update()
                else:
                    waiting[job[0]] = (job, *rest)
    return done


def _train_many(jobs, cfg, data, device, workers, progress):
    """Train the states of `jobs` [(s, fp_id, seed, val_idx, pt, meta_p, desc)]; returns {s: record}.
    On the CPU with workers > 1 they train in that many worker processes (core.workers), in pieces
    (_train_in_pieces); the results are the same as training them one after another."""
    done = {}
    if workers <= 1 or len(jobs) <= 1 or str(device) != "cpu":
        for s, *job, desc in jobs:
            done[s] = _train_to_files(cfg, data, *job, device, progress, desc)
            _log_trained(desc, cfg, done[s])
        return done
    workers = min(workers, len(jobs))   # a worker per state at most: the log said 64 for 4 states
    log.info("training %d states in %d worker processes (one CPU thread each)", len(jobs), workers)
    try:
        with worker_pool(workers, setup=(_start_training_worker, data)) as pool:
            try:
                return _train_in_pieces(pool, jobs, cfg, workers, progress)
            except BaseException:  # one state failed (e.g. diverged): do not start the others
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool:
        raise InputError("a training worker process died (out of memory?); the states trained so far are kept: "
                         "rerun with --threads 1 (one state at a time) or free memory") from None


def trained_states(cfg: dict, training, *, out_dir: Path, n_states: int, seed: int, retrain: bool, device,
                   folds=None, workers: int = 1, progress: bool = True, world: World = World()):
    """n_states independently seeded models (state s uses seed * 1000 + s and holds out folds[s]
    when folds are given), reusing finished ones; on the CPU up to `workers` states train at once.
    Under torchrun each rank trains its share (state s on rank s mod N) and loads the others'.
    Returns (models, loss histories [(train, held-out), ...])."""
    fp_id = fingerprint(cfg, training.fingerprint)
    _refuse_directories([p for s in range(n_states) for p in _paths(out_dir, s)])
    found, jobs = {}, []
    for s in range(n_states):
        pt, meta_p = _paths(out_dir, s)
        desc = f"state {s + 1}/{n_states}"
        found[s] = None if retrain else _reusable(cfg, fp_id, pt, meta_p, device)
        if found[s]:
            log.info("%s: already trained with these inputs and settings, reusing it", desc)
        else:
            jobs.append((s, fp_id, seed * 1000 + s, None if folds is None else folds[s], pt, meta_p, desc))
    world.sync()  # every rank has looked for finished states before any rank writes new ones
    if jobs:   # after the sync: a rank whose partner failed (e.g. DIR in use) has written nothing
        _check_writable(jobs[0][4])
    mine = [job for job in jobs if job[0] % world.size == world.rank]
    done = _train_many(mine, cfg, training.data, device, workers, progress)
    world.sync()  # every state is on disk
    for s, fp, *_ in jobs:
        found[s] = (load_state(cfg, _paths(out_dir, s)[0], device), done[s]) if s in done else \
            _trained_by_another_rank(cfg, fp, s, out_dir, device)
    models = [found[s][0] for s in range(n_states)]
    histories = [(found[s][1]["loss_history"], found[s][1].get("val_history", [])) for s in range(n_states)]
    return models, histories


def _trained_by_another_rank(cfg, fp_id, s, out_dir, device):
    """(model, record) of state s, which another rank has just trained and written."""
    state = _reusable(cfg, fp_id, *_paths(out_dir, s), device)
    if state is None:
        raise InputError(f"{_paths(out_dir, s)[0]}: state {s + 1} was not found after another rank trained it; "
                         f"the output folder must be on a file system every rank sees (a shared one across nodes)")
    return state
