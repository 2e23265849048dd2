"""Training one model state with the footprint loss: the mean of the super-pixel predictions over
each spot's footprint against the spot's min-max scaled counts (MSE, or Poisson)."""
import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from models import build_model

log = logging.getLogger("trihrge")


def resolve_device(device):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import InputError
        raise InputError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    return torch.device(device)


def footprint_loss(pred, fp, target, kind="mse"):
    """pred (B, T, G); fp (B, T) 0/1 footprint; target (B, G)."""
    mean = (pred * fp.unsqueeze(-1)).sum(1) / fp.sum(1, keepdim=True).clamp_min(1.0)
    if kind == "poisson":
        return (mean - target * torch.log(mean)).mean()
    return ((mean - target) ** 2).mean()


def batch_inputs(data, idx, use_tokens, masked, device):
    hist = {k: torch.from_numpy(v[idx]).to(device) for k, v in data["hist"].items()}
    if not use_tokens:
        return hist, None, None, None
    tok_idx = np.where(masked[:, None], data["tok_lso"][idx], data["tok_full"][idx])
    offs = np.where(masked[:, None, None], data["offs_lso"][idx], data["offs_full"][idx])
    hidden = np.where(masked[:, None], data["hid_lso"][idx], data["hid_full"][idx])
    genes = torch.from_numpy(data["hr_expr"][tok_idx]).to(device)
    return hist, genes, torch.from_numpy(offs).to(device), torch.from_numpy(hidden).to(device)


def train_state(cfg, data, seed, device, progress=True, desc="state"):
    """Train one independently initialised model; returns (state_dict on CPU, loss history)."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = build_model(cfg["model"], cfg["dims"], cfg["n_genes"], 2 * cfg["half"] + 1, **cfg["model_opts"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n = len(data["target"])
    bs = cfg["batch_size"] or max(1, min(128, n // 16))
    use_tokens = cfg["model"] == "trihrge" and cfg["model_opts"].get("use_gene_tokens", True)
    fp = torch.from_numpy(data["fp"]).to(device)
    target = torch.from_numpy(data["target"]).to(device)
    history = []
    bar = tqdm(range(cfg["epochs"]), desc=desc, disable=not progress, leave=False, unit="epoch")
    model.train()
    for epoch in bar:
        perm = gen.permutation(n)  # shuffled every epoch (HISTEX's loader did not shuffle)
        total, count = 0.0, 0
        for s in range(0, n, bs):
            idx = np.sort(perm[s:s + bs])
            masked = gen.random(len(idx)) < cfg["token_mask"]
            hist, genes, offs, hidden = batch_inputs(data, idx, use_tokens, masked, device)
            pred = model(hist, genes, offs, hidden)
            loss = footprint_loss(pred, fp[idx], target[idx], cfg["loss"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.append(total / count)
        if not math.isfinite(history[-1]):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {history[-1]}); lower --lr")
        bar.set_postfix(loss=f"{history[-1]:.5f}")
    bar.close()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


def load_state(cfg, path, device):
    model = build_model(cfg["model"], cfg["dims"], cfg["n_genes"], 2 * cfg["half"] + 1, **cfg["model_opts"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()
