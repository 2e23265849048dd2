"""Reading the tables of 10x outputs: JSON, CSV/TSV/parquet, required and numeric columns, unique names."""
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.raw_io import examples

log = logging.getLogger("trihrge")


def decode(values):
    """bytes / numbers -> array of str (10x HDF5 and parquet files store ids as bytes in some versions)."""
    out = [v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in values]
    return np.array(out, dtype=object)


def make_unique(names, path, what="gene"):
    """Unique names: later duplicates get -1, -2, ... (as anndata's var_names_make_unique), with a log line."""
    names = [str(n) for n in names]
    seen = set(names)
    counts = {}
    out, renamed = [], []
    first = set()
    for n in names:
        if n not in first:
            first.add(n)
            out.append(n)
            continue
        k = counts.get(n, 0)
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in seen:
                break
        counts[n] = k
        seen.add(cand)
        out.append(cand)
        renamed.append(f"{n} -> {cand}")
    if renamed:
        log.info("%s: %d duplicated %s name(s) made unique by a suffix (%s%s)", Path(path).name, len(renamed), what,
                 ", ".join(renamed[:5]), ", ..." if len(renamed) > 5 else "")
    return pd.Index(out)


def check_plain_names(names, path, what):
    """Refuse names holding a tab or a line break: the raw-layout tables (TSV) cannot hold them, and
    quoting them would not survive the iStar-style readers."""
    bad = [str(n) for n in names if any(ch in str(n) for ch in "\t\n\r")]
    if bad:
        raise InputError(f"{path}: {len(bad)} {what}(s) hold a tab or line break ({examples(map(repr, bad))}), "
                         f"which a tab-separated count table cannot hold; rename them before converting")


def read_json(path, what):
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:   # a byte-order mark (Windows editors) is not damage
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({type(e).__name__}); give the {what} written by the "
                         f"10x software, unchanged") from None


def read_table(path, what, **kw):
    """A parquet or (gzipped) CSV table as a DataFrame."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".parquet"):
            return pd.read_parquet(path)
        return pd.read_csv(path, **kw)
    except Exception as e:  # pyarrow/pandas raise many types for damaged files
        raise InputError(f"{path}: cannot be read as the {what} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}); check that the file is complete") from None


def require_columns(df, columns, path, what):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: column(s) {', '.join(missing)} missing from the {what} (found "
                         f"{examples(df.columns, 8)}); give the file written by the 10x software")


def numeric(df, column, path, label=None, fix="give the file written by the 10x software, unchanged"):
    """A column as finite float64, else one line naming it (`label`, default "column NAME") and how many
    values are missing or non-numeric."""
    col = df[column]
    if isinstance(col.dtype, pd.CategoricalDtype):   # numbers stored as categories (an R conversion)
        col = col.astype(object)
    v = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(v).all():
        raise InputError(f"{path}: {label or f'column {column}'} holds {int((~np.isfinite(v)).sum())} missing or "
                         f"non-numeric value(s); {fix}")
    return v


IN_TISSUE_WORDS = {"1": True, "0": False, "true": True, "false": False}   # R conversions write "True"/"False"


def in_tissue_flags(values: pd.Series, path, label: str, fix: str) -> np.ndarray:
    """in_tissue as booleans: 1/0, booleans, or "True"/"False" / "1"/"0" as text in any case; any other
    value (a 2, a NaN) is one line naming `label`."""
    col = values.astype(object)
    num = pd.to_numeric(col, errors="coerce").astype(float)   # booleans too: 1.0 / 0.0
    words = col.astype(str).str.strip().str.lower().map(IN_TISSUE_WORDS)
    flags = num.map({1.0: True, 0.0: False}).where(num.notna(), words)
    if flags.isna().any():
        raise InputError(f"{path}: {label} holds {int(flags.isna().sum())} value(s) other than 1/0 or True/False "
                         f"({examples(col[flags.isna()].map(repr).unique())}); {fix}")
    return flags.to_numpy(dtype=bool)
