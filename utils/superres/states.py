"""Trained model states on disk: each state is trained once per inputs and settings, and a rerun
of HISTEX reuses it (a state's fingerprint is a hash of its training configuration and data).

<out>/states/state-NN.pt    the weights (torch.save of a state dict of tensors, read weights_only)
<out>/states/state-NN.json  fingerprint, seed, loss histories, timings
A state that cannot be read (truncated, damaged, another format) is trained again, with a warning."""
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from models import build_model

from ..core.atomic import StagedOutputs
from ..core.layout import STATES_DIR
from .train import train_state

log = logging.getLogger("trihrge")


def fingerprint(cfg: dict, data_fingerprint: dict) -> str:
    """Identity of a trained state: training settings and data (inference-only settings excluded)."""
    train_cfg = {k: v for k, v in cfg.items() if k != "stride"}
    blob = json.dumps({"cfg": train_cfg, "data": data_fingerprint}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_state(cfg: dict, path: Path, device):
    """The network of `cfg` with the weights in `path`, in eval mode on `device`."""
    model = build_model(cfg["model"], cfg["dims"], cfg["n_genes"], 2 * cfg["half"] + 1, **cfg["model_opts"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
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
        return load_state(cfg, pt, device), meta
    except Exception as e:  # torch raises many types for truncated or foreign files
        log.warning("%s: damaged (%s); training this state again", pt, type(e).__name__)
        return None


def _train_and_save(cfg, data, fp_id, seed, pt, meta_p, device, progress, desc):
    t0 = time.time()
    state, info = train_state(cfg, data, seed, device, progress, desc=desc)
    dt = time.time() - t0
    meta = {"fingerprint": fp_id, "seed": seed, "epochs": cfg["epochs"], **info, "seconds": dt,
            "spot_epochs_per_second": info["train_spots"] * info["epochs_run"] / max(1e-9, dt)}
    with StagedOutputs() as out:  # committed at once: a later crash keeps the finished states
        torch.save(state, out.path(pt))
        out.write_json(meta_p, meta)
    stop = (f"stopped after {info['epochs_run']} epochs, best held-out loss at epoch {info['best_epoch']}"
            if info["epochs_run"] < cfg["epochs"] else f"{info['epochs_run']} epochs")
    log.info("%s: %s, final loss %.5f, in %.0f s", desc, stop, info["loss_history"][-1], dt)
    return load_state(cfg, pt, device), meta


def trained_states(cfg: dict, training, *, out_dir: Path, n_states: int, seed: int, retrain: bool, device,
                   progress: bool = True):
    """n_states independently seeded models (state s uses seed * 1000 + s), reusing finished ones.
    Returns (models, loss histories [(train, held-out), ...])."""
    fp_id = fingerprint(cfg, training.fingerprint)
    models, histories = [], []
    for s in range(n_states):
        pt, meta_p = _paths(out_dir, s)
        desc = f"state {s + 1}/{n_states}"
        found = None if retrain else _reusable(cfg, fp_id, pt, meta_p, device)
        if found:
            log.info("%s: already trained with these inputs and settings, reusing it", desc)
        else:
            found = _train_and_save(cfg, training.data, fp_id, seed * 1000 + s, pt, meta_p, device, progress, desc)
        model, meta = found
        models.append(model)
        histories.append((meta["loss_history"], meta.get("val_history", [])))
    return models, histories
