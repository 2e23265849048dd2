"""Training one model state with the footprint loss: the mean of the super-pixel predictions over
each spot's footprint against the spot's min-max scaled counts (MSE, or Poisson)."""
import copy
import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from models import build_model

from ..core.device import autocast
from ..core.errors import InputError
from .config import ISTAR_BATCH_MAX, precision_of
from .inputs import batch_inputs

log = logging.getLogger("trihrge")
MIN_IMPROVEMENT = 1e-3  # early stopping: a held-out loss must beat the best by 0.1% to count as better
MIN_VAL_SPOTS, MIN_TRAIN_SPOTS = 2, 8  # fewer spots cannot validate / train a state: no hold-out then
# --lr-schedule plateau (opt-in): the rate x 0.3 after 3 epochs in a row without a better held-out loss.
# At a constant 1e-3 a her2st state's held-out loss jumps by up to 3 x between epochs (19 spots); cut,
# the states settle and stop sooner. On the demos it stops them too soon (docs/BENCHMARKS.md)
LR_PLATEAU = {"factor": 0.3, "patience": 3}
# --lr-schedule auto: that cut only while the held-out loss is noisy (loss_noise above 4%): her2st's 19-spot
# folds measured 1-67% at their plateaus, the demos' 130-650-spot folds 0.1-2.6%, where cuts cost accuracy.
# After two cuts the next plateau stops the state (at 0.09 x --lr its loss has settled)
LR_AUTO = {"noise": 0.04, "window": 6, "max_cuts": 2}


def spot_loss(mean, target, kind="mse"):
    """mean (B, G) footprint means of the predictions; target (B, G) scaled counts."""
    if kind == "poisson":
        return (mean - target * torch.log(mean)).mean()
    return ((mean - target) ** 2).mean()


def footprint_tokens(fp):
    """Per spot, the window tokens of its footprint, padded to the largest footprint: (index (n, M),
    weight (n, M) with 0 on padding). Only these tokens need a prediction during training."""
    fp = np.asarray(fp) > 0
    m = max(1, int(fp.sum(1).max()))
    idx = np.argsort(~fp, axis=1, kind="stable")[:, :m]
    return idx.astype(np.int64), np.take_along_axis(fp, idx, 1).astype(np.float32)


def footprint_shares(fp, device):
    """(keep (n, M) token indices, share (n, M): 1 / footprint size, 0 on padding) as tensors."""
    keep, w = footprint_tokens(fp)
    share = w / np.maximum(w.sum(1, keepdims=True), 1.0)
    return torch.from_numpy(keep).to(device), torch.from_numpy(share).to(device)


def spot_means(model, inputs, keep, share, precision="fp32"):
    """(B, G) float32 footprint means of a model's predictions for the windows of `inputs`
    (batch_inputs): the fused model.footprint_mean when it has one (models/layers.py), else from its
    predictions; precision 'bf16': under a bfloat16 autocast (core.device.resolve_precision)."""
    with autocast(share.device, precision):
        if hasattr(model, "footprint_mean"):
            return model.footprint_mean(*inputs, keep=keep, weights=share).float()
        return predicted_means(model, inputs, keep, share).float()


def predicted_means(model, inputs, keep, share):
    """spot_means from the model's (B, M, G) predictions (the unfused path; bench/profile_training.py
    --unfused times it)."""
    return (model(*inputs, keep=keep) * share.unsqueeze(-1)).sum(1)


def split_validation(n, fraction, gen):
    """A seeded random `fraction` of the spots held out from one state's training to detect
    overfitting (each state draws its own, so the median of the states still uses every spot).
    Returns (train index, validation index); no validation when too few spots."""
    n_val = int(round(n * fraction))
    if fraction <= 0 or n_val < MIN_VAL_SPOTS or n - n_val < MIN_TRAIN_SPOTS:
        return np.arange(n), np.arange(0)
    perm = gen.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def validation_loss(model, data, idx, keep, share, target, cfg, use_tokens, device, bs):
    """Footprint loss of held-out spots; their own HR pseudo-spots are hidden, as in training.
    keep, share: footprint_shares of all spots."""
    model.eval()
    total = 0.0
    for s in range(0, len(idx), bs):
        b = idx[s:s + bs]
        mean = spot_means(model, batch_inputs(data, b, use_tokens, np.ones(len(b), bool), device), keep[b], share[b],
                          precision_of(cfg))
        total += spot_loss(mean, target[b], cfg["loss"]).item() * len(b)
    model.train()
    return total / max(1, len(idx))


def loss_noise(losses, window=LR_AUTO["window"]):
    """How much a loss moves beyond its trend: the median absolute deviation of its last `window`
    epoch-to-epoch log changes from their median (0 with fewer than 3 changes)."""
    d = np.diff(np.log(np.asarray(losses[-window - 1:], np.float64)))
    return float(np.median(np.abs(d - np.median(d)))) if len(d) >= 3 else 0.0


class NoisyPlateau:
    """--lr-schedule auto: LR_PLATEAU's cut (counted as torch's ReduceLROnPlateau counts), taken only
    while the held-out loss is noisy (loss_noise > LR_AUTO["noise"]); after LR_AUTO["max_cuts"] cuts,
    the next plateau, noisy or not, stops the state instead: step returns True."""

    def __init__(self, opt):
        self.opt, self.losses, self.best, self.bad, self.cuts = opt, [], math.inf, 0, 0

    def state_dict(self) -> dict:
        """Its counters (torch's schedulers' interface; the optimizer is not part of it)."""
        return {k: v for k, v in vars(self).items() if k != "opt"}

    def load_state_dict(self, state: dict):
        vars(self).update(state)

    def step(self, loss):
        self.losses.append(loss)
        self.best, self.bad = (loss, 0) if loss < self.best * (1.0 - MIN_IMPROVEMENT) else (self.best, self.bad + 1)
        if self.bad <= LR_PLATEAU["patience"]:
            return False
        if self.cuts == LR_AUTO["max_cuts"]:
            return True
        if loss_noise(self.losses) <= LR_AUTO["noise"]:
            return False
        self.bad, self.cuts = 0, self.cuts + 1
        for group in self.opt.param_groups:
            group["lr"] *= LR_PLATEAU["factor"]
        return False


def lr_scheduler(opt, cfg):
    """The held-out loss's learning-rate schedule: torch's ReduceLROnPlateau under --lr-schedule
    plateau (with early stopping's 0.1% as what counts as better), NoisyPlateau under auto, None for
    a constant rate. Its step(loss) returns True when the state should stop."""
    kind = cfg.get("lr_schedule", "constant")
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, threshold=MIN_IMPROVEMENT, **LR_PLATEAU)
    return NoisyPlateau(opt) if kind == "auto" else None


def batch_spots(cfg, n: int) -> int:
    """Spots per batch of a model configuration (model_config) training n spots: --batch-size, or
    for 0 n // 16 capped at its "batch_max" (ISTAR_BATCH_MAX in configurations from before the key)."""
    return cfg["batch_size"] or max(1, min(cfg.get("batch_max", ISTAR_BATCH_MAX), n // 16))


class StateTraining:
    """One state's training, an epoch at a time (train_state runs it to the end). snapshot() holds
    everything a next epoch reads (weights, Adam's moments, the rate schedule, the torch and numpy
    random generators, the histories, the best epoch's weights), and restore() puts it into a fresh
    StateTraining of the same arguments, in any process: a state trained in pieces has the bits of
    one trained in one go (the CPU's generator only: the pieces train on the CPU, states.py)."""

    def __init__(self, cfg, data, seed, device, val_idx=None):
        torch.manual_seed(seed)
        self.gen = np.random.default_rng(seed)
        self.model = build_model(cfg["model"], cfg["dims"], cfg["n_genes"], 2 * cfg["half"] + 1,
                                 **cfg["model_opts"]).to(device)
        # fused: one kernel updates every parameter (Adam was ~9% of a CPU step; values within 1 ulp of foreach)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
        self.schedule = lr_scheduler(self.opt, cfg)
        if val_idx is None:
            self.train_idx, self.val_idx = split_validation(len(data["target"]), cfg.get("val_fraction", 0.0), self.gen)
        else:
            self.train_idx, self.val_idx = np.setdiff1d(np.arange(len(data["target"])), val_idx), val_idx
        self.cfg, self.data, self.device = cfg, data, device
        self.bs = batch_spots(cfg, len(self.train_idx))
        self.use_tokens, self.precision = self.model.use_gene_tokens, precision_of(cfg)
        self.keep, self.share = footprint_shares(data["fp"], device)
        self.target = torch.from_numpy(data["target"]).to(device)
        self.history, self.val_history, self.lr_history = [], [], []
        self.best, self.best_epoch, self.best_state, self.stopped = math.inf, -1, None, False
        self.model.train()

    @property
    def done(self) -> bool:
        return self.stopped or len(self.history) >= self.cfg["epochs"]

    def run_epoch(self):
        """One epoch over the shuffled training spots, then the held-out loss, the best weights, the
        rate schedule and early stopping (done turns True)."""
        n, cfg, epoch = len(self.train_idx), self.cfg, len(self.history)
        perm = self.train_idx[self.gen.permutation(n)]  # shuffled every epoch (HISTEX's loader did not shuffle)
        self.lr_history.append(self.opt.param_groups[0]["lr"])
        total = 0.0
        for s in range(0, n, self.bs):
            idx = np.sort(perm[s:s + self.bs])
            masked = self.gen.random(len(idx)) < cfg["token_mask"]
            inputs = batch_inputs(self.data, idx, self.use_tokens, masked, self.device)
            loss = spot_loss(spot_means(self.model, inputs, self.keep[idx], self.share[idx], self.precision),
                             self.target[idx], cfg["loss"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
        self.history.append(total / n)
        if not math.isfinite(self.history[-1]):
            raise InputError(f"training diverged at epoch {epoch + 1} (loss {self.history[-1]}); rerun with a lower "
                             f"--lr (now {cfg['lr']:g})")
        if len(self.val_idx):
            self.val_history.append(validation_loss(self.model, self.data, self.val_idx, self.keep, self.share,
                                                    self.target, cfg, self.use_tokens, self.device, self.bs))
            if self.val_history[-1] < self.best * (1.0 - MIN_IMPROVEMENT):
                self.best, self.best_epoch = self.val_history[-1], epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            stop = self.schedule is not None and bool(self.schedule.step(self.val_history[-1]))
            patience = cfg.get("patience", 0)
            self.stopped = stop or bool(patience and epoch - self.best_epoch >= patience)

    def postfix(self) -> dict:
        """The progress bar's figures after an epoch."""
        if not self.val_history:
            return {"loss": f"{self.history[-1]:.5f}"}
        return {"loss": f"{self.history[-1]:.5f}", "val": f"{self.val_history[-1]:.5f}", "best": self.best_epoch + 1}

    _KEPT = ("history", "val_history", "lr_history", "best", "best_epoch", "best_state", "stopped")

    def snapshot(self) -> dict:
        """Plain data (tensors, numbers, lists) from which restore() continues this training."""
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "schedule": None if self.schedule is None else self.schedule.state_dict(),
                              "torch_rng": torch.get_rng_state(), "numpy_rng": self.gen.bit_generator.state,
                              **{k: getattr(self, k) for k in self._KEPT}})

    def restore(self, snap: dict):
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["opt"])
        if self.schedule is not None:
            self.schedule.load_state_dict(snap["schedule"])
        torch.set_rng_state(snap["torch_rng"])
        self.gen.bit_generator.state = snap["numpy_rng"]
        for k in self._KEPT:
            setattr(self, k, copy.deepcopy(snap[k]))

    def result(self):
        """(state_dict on CPU with the best epoch's weights, info with loss and learning-rate histories)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        info = {"loss_history": self.history, "val_history": self.val_history, "lr_history": self.lr_history,
                "train_spots": int(len(self.train_idx)), "val_spots": int(len(self.val_idx)),
                "epochs_run": len(self.history),
                "best_epoch": (self.best_epoch + 1) if len(self.val_idx) else len(self.history)}
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, info


def train_state(cfg, data, seed, device, progress=True, desc="state", val_idx=None):
    """Train one independently initialised model for up to cfg["epochs"] epochs, stopping early
    when the loss of its held-out spots (val_idx, its cross-fitting fold; None: a seeded
    --val-fraction draw) has not improved (by 0.1%) for cfg["patience"] epochs (then the weights of
    the best epoch are kept); the same loss drives the learning rate's schedule (lr_scheduler), which
    may also stop the state.
    Returns (state_dict on CPU, info with loss and learning-rate histories)."""
    run = StateTraining(cfg, data, seed, device, val_idx)
    with tqdm(total=cfg["epochs"], desc=desc, disable=not progress, leave=False, unit="epoch") as bar:
        while not run.done:
            run.run_epoch()
            bar.update()
            bar.set_postfix(**run.postfix())
    return run.result()
