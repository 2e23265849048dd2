"""Inference over every tissue super-pixel in windows: the slide is cut into stride x stride blocks,
each predicted from the window centred on it, so memory is bounded by the window batch."""
import numpy as np
import torch
from tqdm.auto import tqdm

from . import geometry as geo
from .model_inputs import gather_windows
from .train import batch_inputs


def block_layout(rows, cols, half, stride):
    """Blocks of stride x stride super-pixels: block centres and each super-pixel's (block, token)."""
    stride = min(stride, 2 * half + 1)
    br, bc = rows // stride, cols // stride
    key = br.astype(np.int64) * (int(cols.max()) // stride + 2) + bc
    uniq, block = np.unique(key, return_inverse=True)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[block[::-1]] = np.arange(len(rows))[::-1]
    centre_r = br[first] * stride + stride // 2
    centre_c = bc[first] * stride + stride // 2
    dr, dc = rows - centre_r[block], cols - centre_c[block]
    token = (dr + half) * (2 * half + 1) + (dc + half)
    return centre_r, centre_c, block, token


@torch.no_grad()
def predict_tissue(models, cfg, maps, tokens, rows, cols, device, batch=64, progress=True, out=None):
    """Median over model states of the scaled predictions for the super-pixels (rows, cols).

    Returns (or fills `out`, e.g. a memmap) an (n, G) float32 array."""
    half, stride = cfg["half"], cfg["stride"]
    centre_r, centre_c, block, token = block_layout(rows, cols, half, stride)
    # the network's head runs only on the window's central block: token -> position in `keep`
    keep = np.unique(token)
    slot = np.searchsorted(keep, token)
    keep_t = torch.from_numpy(keep).to(device)
    order = np.argsort(block, kind="stable")
    starts = np.searchsorted(block[order], np.arange(len(centre_r) + 1))
    if out is None:
        out = np.empty((len(rows), cfg["n_genes"]), dtype=np.float32)
    use_tokens = cfg["model"] == "trihrge" and cfg["model_opts"].get("use_gene_tokens", True)
    for b0 in tqdm(range(0, len(centre_r), batch), desc="predict", unit="window", unit_scale=batch,
                   disable=not progress, leave=False):
        b1 = min(len(centre_r), b0 + batch)
        hist, _ = gather_windows(maps, centre_r[b0:b1], centre_c[b0:b1], half)
        data = {"hist": hist}
        if use_tokens:
            cx, cy = geo.superpixel_centres(centre_r[b0:b1], centre_c[b0:b1])
            idx, offs, hid = tokens.query(np.stack([cx, cy], 1))
            data.update(tok_full=idx, offs_full=offs, hid_full=hid, tok_lso=idx, offs_lso=offs, hid_lso=hid,
                        hr_expr=tokens.expr)
        sel = np.arange(b1 - b0)
        inputs = batch_inputs(data, sel, use_tokens, np.zeros(len(sel), bool), device)
        preds = torch.stack([m(*inputs, keep=keep_t) for m in models])
        med = preds.median(0).values if len(models) % 2 else preds.quantile(0.5, dim=0)
        med = med.float().cpu().numpy()
        members = order[starts[b0]:starts[b1]]
        out[members] = med[block[members] - b0, slot[members]]
    return out
