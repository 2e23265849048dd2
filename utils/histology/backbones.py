"""Tile backbones for Histology_Extractor: building the network, finding and loading its weights.

Backbone names:
  uni          UNI, ViT-L/16, 1024-d (MahmoodLab/UNI)
  uni2-h       UNI2-h, ViT-H/14 with 8 register tokens, 1536-d (MahmoodLab/UNI2-h)
  timm:NAME    any timm ViT or CNN, weights from --weights
  stain        weights-free stain/texture features (histology/stain_features.py; no network)
  stain-nuclei the same plus nuclear morphology from a hematoxylin segmentation (nuclei_morphology.py)

Weights come from a local file (--weights: pytorch_model.bin / *.pth read with
torch.load(weights_only=True), or *.safetensors), from the Hugging Face hub when a token is given
(--login or HF_TOKEN), or from the local hub cache of an earlier download. The token is only
passed to huggingface_hub; it is never written or logged.

A tile model maps tiles of `tile_px` calibrated pixels (resized to `input_px`) to a `grid x grid`
map of tokens, one per 16 px super-pixel, and one summary vector (CLS / pooled feature).
"""
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import geometry as geo
from ..core.errors import InputError

log = logging.getLogger("trihrge")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HUB_MODELS = {
    # backbone: (hub repository, file, timm architecture)
    "uni": ("MahmoodLab/UNI", "pytorch_model.bin", "vit_large_patch16_224"),
    "uni2-h": ("MahmoodLab/UNI2-h", "pytorch_model.bin", "vit_huge_patch14_224"),
}
STAIN_BACKBONES = ("stain", "stain-nuclei")
BACKBONES = (*STAIN_BACKBONES, "uni", "uni2-h", "timm:NAME")


def timm_kwargs_for(backbone):
    """The timm keyword arguments that build each foundation model exactly as published."""
    if backbone == "uni":
        return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
    if backbone == "uni2-h":
        return {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True}
    return {"num_classes": 0}


def access_help(backbone):
    repo, fname, _ = HUB_MODELS[backbone]
    return (f"--backbone {backbone} needs the {repo} weights, which are gated: request access at "
            f"https://huggingface.co/{repo}, then either pass --login YOUR_HF_TOKEN (or set HF_TOKEN) "
            f"to download them, or download {fname} yourself and pass --weights /path/to/{fname}; "
            f"or use --backbone stain, which needs no weights")


def parse_backbone(name):
    """'stain' | 'stain-nuclei' | 'uni' | 'uni2-h' | 'timm:NAME' -> (kind, timm architecture or None)."""
    name = (name or "").strip()
    if name in STAIN_BACKBONES:
        return "stain", None
    if name in HUB_MODELS:
        return name, HUB_MODELS[name][2]
    if name == "timm:":
        raise InputError("--backbone timm: names no architecture; give timm:NAME, a name from timm.list_models() "
                         "(e.g. timm:vit_large_patch16_224)")
    if name.startswith("timm:"):
        arch = name[5:]
        import timm
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
            raise InputError(f"--backbone {name}: timm has no architecture {arch!r}"
                             + (f" (similar: {', '.join(close)})" if close else "")
                             + "; give a name from timm.list_models()")
        return "timm", arch
    raise InputError(f"--backbone {name!r}: unknown backbone; choose one of {', '.join(BACKBONES)}")


@dataclass
class WeightSource:
    kind: str                    # "file" | "hub" | "hub-cache" | "random"
    path: Path = None            # the local file that will be read (file, hub, hub-cache)
    description: str = ""        # what goes into features.json and the manifest (never the token)
    token_given: bool = False
    extra: dict = field(default_factory=dict)


def resolve_weights(backbone, weights=None, token=None, random_init=False):
    """Decide where the weights come from, before anything heavy is imported; fails fast.

    Without a token the hub is never contacted (HF_HUB_OFFLINE and local_files_only), so a missing
    licence never turns into a minute of network retries."""
    token_given = bool(token)
    if random_init:
        return WeightSource("random", description="random initialisation (benchmarks/tests only; features are meaningless)",
                            token_given=token_given)
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_dir():
            raise InputError(f"{p}: is a directory; pass --weights the checkpoint file inside it (pytorch_model.bin, "
                             f".pth or .safetensors)")
        if not p.is_file():
            raise InputError(f"{p}: weights file not found; pass --weights the path of a pytorch_model.bin / .pth / "
                             f".safetensors checkpoint" + (f" ({access_help(backbone)})" if backbone in HUB_MODELS else ""))
        if p.stat().st_size == 0:
            raise InputError(f"{p}: the weights file is empty; download the checkpoint again")
        return WeightSource("file", path=p, description=f"file {p.name} ({p.stat().st_size} bytes)", token_given=token_given)
    if backbone not in HUB_MODELS:
        raise InputError("--backbone timm:...: needs --weights PATH (a local checkpoint of that architecture); "
                         "the timm hub names are not downloaded here")
    repo, fname, _ = HUB_MODELS[backbone]
    if not token:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency
        raise InputError("huggingface_hub is not installed; pip install huggingface_hub, or pass --weights") from None
    if not token:
        try:
            path = hf_hub_download(repo, fname, local_files_only=True)
        except (OSError, ValueError):  # LocalEntryNotFoundError: never downloaded on this machine
            raise InputError(access_help(backbone)) from None
        log.info("using %s from the local Hugging Face cache", repo)
        return WeightSource("hub-cache", path=Path(path), description=f"hub {repo} (local cache)", token_given=False)
    unreachable = _hub_unreachable()
    if unreachable:
        raise InputError(f"hub {repo}: the hub cannot be reached ({unreachable}); {access_help(backbone)}")
    log.info("downloading %s/%s from the Hugging Face hub (token given: yes)", repo, fname)
    try:
        path = hf_hub_download(repo, fname, token=token)
    except Exception as e:
        name = type(e).__name__
        if "Gated" in name or "401" in str(e) or "403" in str(e):
            why = "the token has no access to this gated repository"
        elif "NotFound" in name and "Entry" not in name:
            why = "the repository was not found (or the token cannot see it)"
        elif "Offline" in name or "LocalEntry" in name or isinstance(e, (ConnectionError, TimeoutError)) \
                or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            why = "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set)"
        else:
            why = f"the download failed ({name})"
        raise InputError(f"hub {repo}: {why}; {access_help(backbone)}") from None
    return WeightSource("hub", path=Path(path), description=f"hub {repo}", token_given=True)


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub's host cannot be connected to, or None. Without a network huggingface_hub retries
    five times (24 s, 24 log lines) before failing; one connection attempt says so at once. Behind a
    proxy (HTTPS_PROXY, ALL_PROXY) only huggingface_hub can tell, so nothing is checked."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


# ---------------------------------------------------------------------------------------------
# checkpoints

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "teacher", "student", "net", "network")


def load_state_dict(path):
    """A flat {name: tensor} from a checkpoint file; InputError (one line) for anything else."""
    import torch
    path = Path(path)
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        try:
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        except Exception as e:
            raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__}); download the checkpoint "
                             f"again or give the pytorch_model.bin instead") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e)
            if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
                why = "it holds more than tensors (a pickled model object?); save model.state_dict() instead"
            else:
                why = f"it is not a PyTorch checkpoint ({type(e).__name__}); the file is damaged or of another kind"
            raise InputError(f"{path}: cannot be loaded with torch.load(weights_only=True): {why}") from None
    for _ in range(3):  # unwrap {'state_dict': {...}} and the like
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
            if inner is None:
                break
            sd = inner
    if isinstance(sd, dict) and any(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}   # e.g. a "version": 1 entry
    if not isinstance(sd, dict) or not sd:
        raise InputError(f"{path}: does not hold a state dict of tensors; give the checkpoint file of the model "
                         f"(pytorch_model.bin or .safetensors)")
    keys = list(sd)
    for prefix in ("module.", "model.", "backbone.", "encoder.", "trunk."):
        if all(k.startswith(prefix) for k in keys):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            keys = list(sd)
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise InputError(f"{path}: tensor {bad} holds NaN or infinite values; the checkpoint is damaged, download it "
                         f"again")
    return sd


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file whatever its name: 8 bytes of header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    except OSError:
        return False


def _resolve_layer_names(kwargs):
    """JSON-able layer names ('SwiGLUPacked', 'SiLU', 'GELU') -> classes for timm."""
    import timm.layers
    import torch
    out = dict(kwargs)
    for k in ("mlp_layer", "act_layer", "norm_layer"):
        v = out.get(k)
        if isinstance(v, str):
            cls = getattr(timm.layers, v, None) or getattr(torch.nn, v, None)
            if cls is None:
                raise InputError(f"--timm-kwargs: {k}={v!r} is neither a timm.layers nor a torch.nn class")
            out[k] = cls
    return out


def infer_vit_kwargs(sd):
    """For timm:NAME ViTs: settings a checkpoint reveals (layer scale, register tokens)."""
    kw = {}
    if any(k.endswith("ls1.gamma") for k in sd):
        kw["init_values"] = 1e-5
    if "reg_token" in sd:
        kw["reg_tokens"] = int(sd["reg_token"].shape[1])
    return kw


def compare_state_dicts(expected, sd):
    """None when sd fits the model's state dict (names and shapes), else a short description.
    A classifier head the model does not have (num_classes=0) is ignored."""
    exp = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in exp if k not in got]
    unexpected = [k for k in got if k not in exp and not k.startswith(("head.", "fc.", "classifier.", "head_dist."))]
    shapes = [f"{k} {got[k]} vs {exp[k]}" for k in exp if k in got and got[k] != exp[k]]
    types = [f"{k} {sd[k].dtype}" for k in exp if k in got and expected[k].is_floating_point()
             and not sd[k].is_floating_point()]
    if not (missing or unexpected or shapes or types):
        return None
    parts = [f"{len(types)} tensors not of a float type (e.g. {types[0]})"] if types else []
    if shapes:
        parts.append(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# the tile model

class TileModel:
    """A timm network plus the geometry that ties its output to super-pixels."""

    def __init__(self, model, arch, device, precision):
        import torch
        self.model = model.eval()
        self.arch = arch
        self.device = torch.device(device)
        self.precision = precision
        cfg = getattr(model, "pretrained_cfg", None) or {}
        # UNI, UNI2-h and most pathology models expect ImageNet statistics, whatever timm's default
        # configuration of the architecture says
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        pe = getattr(model, "patch_embed", None)
        self.is_vit = pe is not None and hasattr(model, "num_prefix_tokens")
        if self.is_vit:
            patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else int(pe.patch_size)
            img = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else int(pe.img_size)
            if img % patch:
                raise InputError(f"{arch}: input size {img} is not a multiple of the patch size {patch}")
            self.input_px = img
            self.grid = img // patch
            self.num_prefix_tokens = int(model.num_prefix_tokens)
        else:
            size = cfg.get("input_size", (3, 224, 224))
            self.input_px = int(size[-1])
            self.grid = max(1, self.input_px // geo.SUPER_PIXEL_PX)
            self.num_prefix_tokens = 0
        # one token per 16 px super-pixel: the tile covers grid super-pixels, resized to input_px
        self.tile_px = self.grid * geo.SUPER_PIXEL_PX
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.dim = None
        self.summary_dim = None
        self._white = None
        w = np.full((1, self.input_px, self.input_px, 3), 255, np.uint8)
        tok, summ = self._forward(w)
        self.dim, self.summary_dim = tok.shape[-1], summ.shape[-1]
        self._white = (tok[0], summ[0])

    @property
    def autocast_dtype(self):
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def _forward(self, tiles):
        """uint8 (n, input_px, input_px, 3) -> tokens (n, grid, grid, D), summary (n, Ds), float32 numpy."""
        import torch
        import torch.nn.functional as F
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean_t) / self._std_t
        dt = self.autocast_dtype
        with torch.inference_mode():
            if dt is not None:
                with torch.autocast(self.device.type, dtype=dt):
                    feats = self.model.forward_features(x)
                    summ = self.model.forward_head(feats, pre_logits=True)
            else:
                feats = self.model.forward_features(x)
                summ = self.model.forward_head(feats, pre_logits=True)
            if feats.ndim == 3:      # ViT tokens (n, prefix + grid^2, D)
                tok = feats[:, self.num_prefix_tokens:]
                if tok.shape[1] != self.grid * self.grid:
                    raise RuntimeError(f"{self.arch}: {tok.shape[1]} patch tokens, expected {self.grid}^2")
                tok = tok.reshape(tok.shape[0], self.grid, self.grid, tok.shape[-1])
            elif feats.ndim == 4:    # CNN map, NCHW (or NHWC for some timm models)
                nf = getattr(self.model, "num_features", feats.shape[1])
                if feats.shape[-1] == nf and feats.shape[1] != nf:
                    feats = feats.permute(0, 3, 1, 2)
                if feats.shape[-2:] != (self.grid, self.grid):
                    feats = F.interpolate(feats.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
                tok = feats.permute(0, 2, 3, 1)
            else:
                raise RuntimeError(f"{self.arch}: forward_features gave shape {tuple(feats.shape)}")
            if summ.ndim != 2:
                summ = summ.flatten(1)
            return tok.float().cpu().numpy(), summ.float().cpu().numpy()

    def __call__(self, tiles):
        """Like _forward, but tiles that are pure white (padding) reuse one cached result."""
        tiles = np.asarray(tiles)
        white = tiles.reshape(len(tiles), -1).min(axis=1) == 255
        if not white.any():
            return self._forward(tiles)
        tok = np.empty((len(tiles), self.grid, self.grid, self.dim), np.float32)
        summ = np.empty((len(tiles), self.summary_dim), np.float32)
        tok[white], summ[white] = self._white
        if (~white).any():
            tok[~white], summ[~white] = self._forward(tiles[~white])
        return tok, summ


def pick_precision(precision, device):
    """The autocast precision of the tile network: on the GPU 'auto' is bf16 where supported, else
    fp16; on the CPU bf16 (with AMX or AVX512-BF16 units, where a ViT-L ran 3.7 x or 2.1 x its fp32
    speed with token cosine similarity >= 0.9999 to fp32, docs/BENCHMARKS.md) or fp32 (core.device.resolve_precision)."""
    if device != "cuda":
        if precision == "fp16":
            log.warning("--precision fp16 applies on the GPU only; computing in fp32 on the CPU")
            return "fp32"
        from ..core.device import resolve_precision
        return resolve_precision(precision, "cpu")
    if precision == "auto":
        import torch
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def build_tile_model(backbone, weights_source, device="cpu", precision="fp32", timm_kwargs=None, seed=0):
    """The network for backbone 'uni' | 'uni2-h' | 'timm', with weights from weights_source."""
    import timm
    import torch
    kind, arch = parse_backbone(backbone)
    if kind == "stain":
        raise ValueError("stain has no network")
    kwargs = timm_kwargs_for(kind)
    inferred = {}
    sd = None
    if weights_source.kind != "random":
        sd = load_state_dict(weights_source.path)
        if kind == "timm" and "pos_embed" in sd:
            inferred = infer_vit_kwargs(sd)
    kwargs.update(timm_kwargs or {})
    kwargs = _resolve_layer_names(kwargs)
    where = f"--backbone {backbone}"

    def create(kw):
        if sd is not None:
            with torch.device("meta"):  # no memory, no slow initialisation: the weights replace it all
                return timm.create_model(arch, pretrained=False, **kw)
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False, **kw)

    model = None
    if inferred:
        try:  # what the checkpoint reveals (layer scale, registers), unless the user said otherwise
            model = create({**inferred, **kwargs})
            kwargs = {**inferred, **kwargs}
        except TypeError:
            model = None  # not a ViT after all: the comparison below explains the mismatch
    if model is None:
        try:
            model = create(kwargs)
        except Exception as e:   # timm reports bad settings as TypeError, ValueError, AssertionError, ...
            raise InputError(f"{where}: timm cannot build {arch} with {sorted(kwargs)} ({_first_line(e)}); fix "
                             f"--timm-kwargs") from None
    if sd is not None:
        problem = compare_state_dicts(model.state_dict(), sd)
        if problem:
            raise InputError(f"{weights_source.path}: not a checkpoint of {arch} as {where} builds it: {problem}; "
                             f"pass the weights of this model, or the --backbone that matches the file")
        sd = {k: v for k, v in sd.items() if k in model.state_dict()}
        model.load_state_dict(sd, strict=True, assign=True)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:  # non-persistent buffers: build for real and load again
            model = timm.create_model(arch, pretrained=False, **kwargs)
            model.load_state_dict(sd, strict=True)
        model = model.float()
        log.info("loaded %d tensors from %s", len(sd), weights_source.description)
    model = model.to(device)
    try:   # its first forward pass: a white tile
        return TileModel(model, arch if kind == "timm" else f"{kind} ({arch})", device, precision)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{where}: the network fails on a tile ({_first_line(e)}); fix --timm-kwargs") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def parse_timm_kwargs(text):
    if not text:
        return {}
    def not_a_number(name):
        raise ValueError(f"{name} is not a number timm can use")
    try:
        kw = json.loads(text, parse_constant=not_a_number)
    except ValueError as e:   # JSONDecodeError is one
        raise InputError(f"--timm-kwargs: not valid JSON ({e}); e.g. --timm-kwargs '{{\"init_values\": 1e-5}}'") from None
    if not isinstance(kw, dict):
        raise InputError("--timm-kwargs: must be a JSON object, e.g. '{\"init_values\": 1e-5}'")
    return kw
