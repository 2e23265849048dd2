"""The model registry (timm-style): every network or baseline registers under a name, and code
outside models/ builds it and asks its class attributes, never which model it has.

A registered class declares:
  trainable                  False for a baseline without weights (kernel interpolation)
  default_spot_consistency   'local' | 'global' | 'none': how HISTEX maps its predictions to counts
  options(config)            its constructor keywords from a HistexConfig (what run.json records)
  inference_stride(half, opts)  spacing of the inference windows for a (2 half + 1)^2 window
                             (opts: its options(config))
and instance attributes `use_gene_tokens` (whether forward() reads the gene tokens) and
`independent_tokens` (whether a token's prediction depends on its own features only: then inference
predicts the tissue super-pixels directly, without windows). A network with a positive output
layer gets forward() and the fused footprint_mean() of training from layers.PositiveHead."""
MODELS = {}


def register_model(name: str):
    """Class decorator: make the model buildable as `name` (HISTEX.py --model name)."""
    def add(cls):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls
    return add


def model_class(name: str):
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}") from None


def build_model(name: str, dims: dict, n_genes: int, window: int, **opts):
    """A trainable network: dims = channels per feature scale, window = side of its token window."""
    cls = model_class(name)
    if not cls.trainable:
        raise ValueError(f"model {name!r} has no network to build")
    return cls(dims, n_genes, window, **opts)
