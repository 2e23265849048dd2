"""The settings of one HISTEX run (HistexConfig), their validation, the run's name, and the model
configuration a trained state is identified by (its fingerprint, utils/superres/states.py).

HISTEX.py builds its options from the same validators (VALIDATORS), so a value is checked in one
place whether it comes from the command line or from code."""
import argparse
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..core.cli import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, SEED, Number
from ..core.errors import InputError


class _LibraryId:
    """A library id (--library-id): None for the data directory's name, else one scverse.spatial
    accepts."""
    __name__ = "library id"

    @staticmethod
    def problem(v) -> str | None:
        from ..scverse.spatial import library_id_problem
        return library_id_problem(v) if isinstance(v, str) else "must be text"

    def __call__(self, text: str) -> str:
        if self.problem(text):
            raise argparse.ArgumentTypeError(f"{text!r} {self.problem(text)}; give a short name such as the sample's")
        return text

    def check(self, option: str, v):
        if v is not None and self.problem(v):
            raise InputError(f"{option} {v!r} {self.problem(v)}; give a short name such as the sample's")
        return v


VAL_FRACTION = Number(float, lo=0, hi=0.5, hi_open=True)
VAL_FRACTION_DEFAULT = 0.1
DROPOUT = Number(float, lo=0, hi=1, hi_open=True)
# each state is a network trained in full: 1,000 states on 171 spots ran for hours with one info line
N_STATES = Number(int, lo=1, hi=50, note="each state is a model trained in full; 5 is the default")
VALIDATORS = {
    "epochs": POSITIVE_INT, "n_states": N_STATES, "val_fraction": VAL_FRACTION, "patience": COUNT,
    "seed": SEED, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": COUNT, "k_tokens": POSITIVE_INT,
    "token_mask": PROBABILITY, "d_model": POSITIVE_INT, "heads": POSITIVE_INT, "depth": POSITIVE_INT,
    "dropout": DROPOUT, "head_hidden": POSITIVE_INT, "sigma": POSITIVE, "consistency_sigma": NON_NEGATIVE, "stride": COUNT,
    "batch_windows": POSITIVE_INT, "threads": COUNT, "library_id": _LibraryId(),
}
CHOICES = {"loss": ("mse", "poisson"), "spot_consistency": ("auto", "local", "global", "none"),
           "fusion": ("blend", "blend-linear", "stack", "none"), "device": ("auto", "cpu", "cuda"),
           "precision": ("auto", "fp32", "bf16"), "lr_schedule": ("auto", "plateau", "constant")}
# --batch-size 0: n // 16 spots per batch (iStar's rule: 16 updates an epoch), but at most BATCH_MAX. iStar's cap
# of 128 gave the large demo's 2,620 training spots 21 updates an epoch; 32 trains it in 38-40% fewer epochs (HISTEX
# 1.22-1.37 x faster, 2 seeds) at the same r and SSIM (docs/BENCHMARKS.md). Sections under 512 spots (her2st) are not affected.
BATCH_MAX = 32
ISTAR_BATCH_MAX = 128  # the cap of a model configuration without "batch_max" (states trained before it)
# settings that name the run (results/<model>-<tag>...) when on and when they change it: the ablations
# and opt-in parts
RUN_NAME_TAGS = (("no_macro", "nomacro"), ("no_multiscale", "micro"), ("gene_tokens", "tokens"),
                 ("no_linear_head", "nohead"), ("window_attention", "attn"), ("residual", "resid"),
                 ("standardize_features", "std"))
# of those, the settings of what a trainable model reads (the rest change its options(config))
INPUT_FLAGS = ("no_macro", "no_multiscale", "standardize_features")
# the settings of training, which a model without weights (interp) ignores
TRAINING = ("epochs", "n_states", "val_fraction", "cross_fit", "patience", "lr", "lr_schedule", "weight_decay",
            "batch_size", "loss", "precision", "retrain")
# the settings of the gene tokens, read only by a network that has them
TOKEN_SETTINGS = ("k_tokens", "token_mask")
# what ignored_options looks at: those, the tags and the network's settings (each changes options(config) or not)
CHECKED_FOR_USE = (*TRAINING, *TOKEN_SETTINGS, *(flag for flag, _ in RUN_NAME_TAGS),
                   "d_model", "heads", "depth", "dropout", "head_hidden")


@dataclass
class HistexConfig:
    """Every HISTEX.py option except --directory / --force / --quiet (see HISTEX.py --help)."""
    model: str = "trihrge"
    epochs: int = 500
    n_states: int = 5
    val_fraction: float = VAL_FRACTION_DEFAULT
    cross_fit: bool = True
    patience: int = 20
    seed: int = 0
    device: str = "auto"
    # auto: bf16 matrix products where the hardware has bf16 units (AMX or AVX512-BF16 CPUs, GPUs); on
    # an AMX CPU training 1.16 x, inference 1.65 x as fast (Zen 4: 1.25 x, 1.59 x), her2st within seed noise
    # (docs/BENCHMARKS.md, "CPU path": "The session after")
    precision: str = "auto"
    lr: float = 1e-3
    # auto: the plateau cut only while the held-out loss is noisy (train.NoisyPlateau): her2st 35% fewer
    # epochs, mean r +0.001 (3 seeds); the demos' smooth losses are never cut, so their states are those of
    # constant. plateau (opt-in) cuts any plateau: faster on the demos too, but -1.6% r (docs/BENCHMARKS.md)
    lr_schedule: str = "auto"
    weight_decay: float = 0.0
    batch_size: int = 0
    loss: str = "mse"
    k_tokens: int = 5
    token_mask: float = 0.5
    d_model: int = 64
    heads: int = 4
    depth: int = 2
    dropout: float = 0.1
    head_hidden: int = 128
    no_macro: bool = False
    no_multiscale: bool = False
    # opt-in: on her2st leave-out (3 seeds, full defaults) the gene-token cross-attention cost
    # accuracy next to the local spot consistency (docs/BENCHMARKS.md, "Components that pay")
    gene_tokens: bool = False
    no_linear_head: bool = False
    # opt-in: the super-pixels of a window exchange context by self-attention (no gene tokens);
    # it did not beat each super-pixel on its own multi-scale features on her2st (docs/BENCHMARKS.md)
    window_attention: bool = False
    # opt-in: the network predicts a signed correction to the leave-one-out interpolation of the spots
    residual: bool = False
    # opt-in: each feature channel standardised over the spots' footprints. The iStar MLP gains from it
    # on her2st leave-out and the demo; TriHRGE (a LayerNorm per scale) does not (docs/BENCHMARKS.md)
    standardize_features: bool = False
    spot_consistency: str = "auto"
    # near spots the per-gene blend with the interpolation after the spot consistency, between them the
    # stacking of utils/superres/stacking.py: her2st leave-out +0.023 / +0.012 over the blend alone
    # (2 seeds), coarsening +0.000 / -0.004 (docs/BENCHMARKS.md, "Components that pay")
    fusion: str = "stack"
    sigma: float = 0.5
    consistency_sigma: float = 0.0   # 0: --sigma
    # opt-in: her2st leave-out r +0.039 on C2 but -0.039 on C3 (docs/BENCHMARKS.md)
    choose_consistency_sigma: bool = False
    stride: int = 0
    batch_windows: int = 64
    plot_genes: list = None
    # opt-in: gzip'd X is a quarter smaller but slower to write and 16 x slower to read one gene from
    compress: bool = False
    library_id: str = None           # None: the data directory's name
    out: Path = None
    threads: int = 0
    retrain: bool = False

    @classmethod
    def from_options(cls, options: dict) -> "HistexConfig":
        """From a dict of option values (argparse's vars()); keys that are not settings are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}).validated()

    def validated(self) -> "HistexConfig":
        from models import MODELS
        if self.model not in MODELS:
            raise InputError(f"--model {self.model}: choose {', '.join(MODELS)}")
        for name, check in VALIDATORS.items():
            check.check(_option(name), getattr(self, name))
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise InputError(f"{_option(name)} {getattr(self, name)}: choose {', '.join(choices)}")
        if self.d_model % self.heads:
            raise InputError(f"--d-model {self.d_model}: must be a multiple of --heads {self.heads}")
        if self.loss == "poisson" and self.residual and self.model_class.trainable:
            # the deviance takes the log of the prediction; --residual predicts a signed correction
            raise InputError("--loss poisson needs a positive prediction, and --residual predicts a signed "
                             "correction to the interpolation: use one of them (--loss mse with --residual)")
        return self

    @property
    def model_class(self):
        from models import model_class
        return model_class(self.model)

    @property
    def run_name(self) -> str:
        """results/<run_name>: the model, its ablations and opt-in parts, e.g. trihrge-nomacro; a
        setting the model ignores (ignored_options) does not name the run."""
        ignored = self.ignored_options
        return self.model + "".join(f"-{tag}" for flag, tag in RUN_NAME_TAGS
                                    if getattr(self, flag) and _option(flag) not in ignored)

    @property
    def ignored_options(self) -> list:
        """The options set away from their defaults that change nothing for this model, e.g.
        --gene-tokens or --heads of --model mlp, --epochs or --residual of --model interp."""
        return [_option(name, self._default(name)) for name in self._ignored_fields()]

    def _ignored_fields(self) -> list:
        """The names behind ignored_options: a flag or setting that is neither read by a trainable
        model (INPUT_FLAGS, TRAINING) nor one of its options(config)."""
        cls = self.model_class

        def changes(name, default):
            if name in INPUT_FLAGS or name in TRAINING:
                return cls.trainable
            if name in TOKEN_SETTINGS:
                return cls.options(self).get("use_gene_tokens", False)
            return cls.options(self) != cls.options(replace(self, **{name: default}))
        return [f.name for f in fields(self) if f.name in CHECKED_FOR_USE
                and getattr(self, f.name) != f.default and not changes(f.name, f.default)]

    @staticmethod
    def _default(name: str):
        return HistexConfig.__dataclass_fields__[name].default

    @property
    def unused_settings(self) -> dict:
        """{why: [options]}: options given away from their defaults that this run's other options
        leave unread (ignored_options: those the model itself does not read)."""
        return {why: [_option(n, self._default(n)) for n in names] for why, names in self._unused_fields().items()}

    def _unused_fields(self) -> dict:
        """{why: [names]} behind unused_settings."""
        out = {}

        def unused(names, why):
            if names := [n for n in names if getattr(self, n) != self._default(n)]:
                out[why] = names
        if not self.model_class.trainable:
            unused(("fusion", "choose_consistency_sigma", "stride", "batch_windows", "seed"),
                   f"--model {self.model} trains nothing and predicts no windows")
            return out
        if self.cv_folds:
            unused(("val_fraction",), "with cross-fitting each state holds out its own fold of the spots; "
                                      "--no-cross-fit draws that share instead")
        elif self.val_fraction == 0:
            unused(("patience", "lr_schedule"), "no spot is held out (--val-fraction 0): every state runs all "
                                                "--epochs at a constant rate")
        if self.consistency in ("global", "none"):
            unused(("consistency_sigma", "choose_consistency_sigma"), f"--spot-consistency {self.consistency} "
                                                                       f"has no kernel")
        elif not self.cv_folds:
            unused(("choose_consistency_sigma",), "the width is chosen on the out-of-fold spots, which only "
                                                  "cross-fitting makes")
        return out

    @property
    def unread(self) -> list:
        """The settings given away from their defaults that this run does not read (ignored_options
        and unused_settings), by name."""
        return self._ignored_fields() + [n for names in self._unused_fields().values() for n in names]

    @property
    def scales(self) -> list:
        """Feature scales the network reads (besides 'extra')."""
        if self.no_multiscale:
            return ["micro"]
        return ["micro", "meso"] + ([] if self.no_macro else ["macro"])

    @property
    def cv_folds(self) -> int:
        """Cross-fitting: state s holds out fold s of n_states folds of the spots (0: off; then each
        state draws its own --val-fraction, and --val-fraction 0 holds out nothing)."""
        active = self.cross_fit and self.val_fraction > 0 and self.n_states >= 2 and self.model_class.trainable
        return self.n_states if active else 0

    @property
    def consistency(self) -> str:
        return self.model_class.default_spot_consistency if self.spot_consistency == "auto" else self.spot_consistency

    @property
    def resolved_precision(self) -> str:
        """'fp32' or 'bf16': --precision on the device this run computes on (core.device)."""
        from ..core.device import resolve_device, resolve_precision
        return resolve_precision(self.precision, resolve_device(self.device))

    def model_config(self, dims: dict, n_genes: int, half: int) -> dict:
        """What a trained state depends on (plus the inference stride): stored in run.json and
        hashed into the state fingerprint, so its keys and values must stay as they are."""
        cls = self.model_class
        opts = cls.options(self)
        return {"model": self.model, "dims": dims, "n_genes": n_genes, "half": half,
                "stride": self.stride or cls.inference_stride(half, opts), "model_opts": opts,
                "lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                # with cross-fitting the folds are the held-out spots: any --val-fraction above 0 trains alike
                "epochs": self.epochs, "val_fraction": VAL_FRACTION_DEFAULT if self.cv_folds else self.val_fraction,
                "patience": self.patience,
                "loss": self.loss, "token_mask": self.token_mask, "k_tokens": self.k_tokens,
                **({"cv_folds": self.cv_folds, "cv_seed": self.seed} if self.cv_folds else {}),
                **({"standardize_features": True} if self.standardize_features else {}),
                # only for the rule (--batch-size 0), so states trained before BATCH_MAX existed retrain once
                **({"batch_max": BATCH_MAX} if not self.batch_size else {}),
                # only when not constant, so states trained before the option existed still match
                **({"lr_schedule": self.lr_schedule} if self.lr_schedule != "constant" else {}),
                # only when not fp32, so states trained before the option existed still match
                **({"precision": p} if (p := self.resolved_precision) != "fp32" else {})}

    def library(self, directory) -> str:
        """The key of uns['spatial'] in both h5ad files: --library-id, else the directory's name."""
        from ..scverse.spatial import folder_library_id
        return self.library_id or folder_library_id(directory)

    def as_parameters(self) -> dict:
        """Plain data for the manifest and run.json."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def applied_parameters(self) -> dict:
        """as_parameters as the run applies them, for the manifest (what a rerun logs as changed):
        the unread settings at their defaults, --out as an absolute path."""
        applied = replace(self, **{n: self._default(n) for n in self.unread},
                          out=Path(self.out).resolve() if self.out else None)
        return applied.as_parameters()


def precision_of(model_cfg: dict) -> str:
    """'fp32' or 'bf16': the precision a model configuration (model_config, run.json) trains and
    predicts in; configurations without the key are fp32."""
    return model_cfg.get("precision", "fp32")


def _option(name: str, default=False) -> str:
    """The command-line spelling of a setting: --no-cross-fit for cross_fit, whose default is on."""
    return ("--no-" if default is True else "--") + name.replace("_", "-")
