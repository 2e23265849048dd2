"""Finding and reading the raw inputs of the data contract (iStar's raw layout and its variants).

Every reader validates what it reads and raises InputError naming the file, the problem and the fix."""
import csv
import gzip
import itertools
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .h5ad_io import read_anndata
from .layout import RAW_COUNTS as COUNTS_NAMES
from .layout import RAW_IMAGES as IMAGE_NAMES  # noqa: F401  (re-exported: the names the readers look for)
from .layout import RAW_LOCS as LOCS_NAMES
from .text_io import check_encoding, is_gzip, read_text

PIXEL_SIZE_RANGE_UM = (0.05, 2.0)
RADIUS_RANGE_UM = (1.0, 500.0)         # a plausible spot radius (Visium 27.5, ST 50)
ID_COLUMNS = ("spot", "id", "barcode", "spot_id", "Unnamed: 0", "")


def find_one(directory, names, what):
    """The single file among `names` in directory (error when none or several)."""
    directory = Path(directory)
    found = [directory / n for n in names if (directory / n).exists()]
    for p in (directory / n for n in names):
        if p.is_symlink() and not p.exists():   # a converter's --image-mode symlink whose target moved
            raise InputError(f"{p}: is a symbolic link to {os.readlink(p)}, which does not exist (moved or "
                             f"deleted?); put that file back, or point the link at the {what} (ln -sf FILE {p})")
    for p in found:
        if not p.is_file():
            raise InputError(f"{p}: is a directory, not a file; put the {what} there as a file")
    if not found:
        stems = {n.split(".")[0].lower() for n in names}   # he-raw.TIF, he-raw.webp: the file meant, misnamed
        near = sorted(p.name for p in directory.iterdir() if p.name.split(".")[0].lower() in stems) \
            if directory.is_dir() else []
        hint = (f"{', '.join(near)} is there: rename it to one of those names (a format not listed: convert it "
                f"to TIFF)" if near else "put it there in the raw layout described in the README (section 'Inputs')")
        raise InputError(f"{directory}/{names[0]}: {what} not found (looked for {', '.join(names)}); {hint}")
    if len(found) > 1:
        raise InputError(f"{found[0]}: several candidates for the {what} ({', '.join(p.name for p in found)}); "
                         f"keep exactly one of them in {directory}")
    return found[0]


def _read_number(path, what):
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found; write the {what} as a single number into it")
    text = read_text(path, f"{what} (a single number)").strip()
    numbers = [v for v in (_as_number(t) for t in text.split()) if v is not None]  # a unit after it is fine
    first = text.split()[0] if text else ""
    if _as_number(first) is None and (glued := re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[^\W\d_]+",
                                                            first)):
        first = glued.group(1)   # a unit written without a space: 0.4um
    if len(numbers) > 1:
        raise InputError(f"{path}: holds {len(numbers)} numbers ({text[:40]!r}); write just the {what}, one number")
    if re.fullmatch(r"[+-]?\d+,\d+", first):
        raise InputError(f"{path}: found {first!r}; write the {what} with a dot as the decimal separator "
                         f"({first.replace(',', '.')})")
    value = _as_number(first)
    if value is None or not np.isfinite(value):
        raise InputError(f"{path}: expected one number (the {what}), found {text[:40]!r}; write just the number")
    return value


def _as_number(token):
    try:
        return float(token)
    except ValueError:
        return None


def read_pixel_size(directory):
    path = Path(directory) / "pixel-size-raw.txt"
    v = _read_number(path, "raw image pixel size in um/px")
    lo, hi = PIXEL_SIZE_RANGE_UM
    if v <= 0:
        raise InputError(f"{path}: pixel size must be positive, got {v}; write the um per pixel of he-raw "
                         f"(about 0.25-0.5 for a 20x/40x scan)")
    if not lo <= v <= hi:
        raise InputError(f"{path}: pixel size {v} um/px is outside the plausible range {lo}-{hi} um/px "
                         f"(an 8 um super-pixel must span several pixels); give the full-resolution H&E "
                         f"and its um per pixel")
    return v


def read_radius(directory, pixel_size_um):
    path = Path(directory) / "radius-raw.txt"
    v = _read_number(path, "spot radius in raw pixels")
    if v <= 0:
        raise InputError(f"{path}: spot radius must be positive, got {v}; write the spot radius in raw image "
                         f"pixels (27.5 um / pixel size for Visium)")
    um = v * pixel_size_um
    lo, hi = RADIUS_RANGE_UM
    if not lo <= um <= hi:
        raise InputError(f"{path}: a radius of {v} px is {um:.1f} um at {pixel_size_um} um/px, not a plausible "
                         f"spot radius ({lo:g}-{hi:g} um); write the radius in raw pixels of he-raw")
    return v


def _open(path, gz):
    return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="") if gz else \
        open(path, encoding="utf-8-sig", errors="replace", newline="")


def _format(path) -> tuple:
    """(separator, gzip'd) of a raw table, by content: the separator its name says (.csv: comma, else
    tab) unless the header line holds none of it and holds the other (a comma-separated cnts.tsv)."""
    gz = is_gzip(path)
    named = "," if ".csv" in Path(path).name.lower() else "\t"
    try:
        with _open(path, gz) as f:
            header = f.readline()
    except (OSError, EOFError):
        return named, gz   # the reader that follows reports damage
    other = "\t" if named == "," else ","
    return (other if named not in header and other in header else named), gz


def _first_rows(path, fmt, n=2):
    """The first n rows, fields exactly as written (pandas renames duplicates to NAME.1)."""
    try:
        with _open(path, fmt[1]) as f:
            return [[c.strip() for c in row] for row in itertools.islice(csv.reader(f, delimiter=fmt[0]), n)]
    except (OSError, EOFError, csv.Error):
        return []


def _header(path, rows) -> tuple[list, bool]:
    """(the column names, whether the file leaves the first one unnamed) from the first two rows.
    The data rows may be one field longer than the header only as R's write.table writes them: with
    row.names=TRUE the id column is unnamed (named 'spot' here), or R's row numbers come before a named
    id column (pandas makes them the index). Any other difference would shift the columns."""
    header = rows[0] if rows else []
    one_more = len(rows) == 2 and len(rows[1]) == len(header) + 1
    if one_more and rows[1][-1] != "" and not any(_is_id_name(name) for name in header):
        return ["spot", *header], True
    if len(rows) == 2 and len(rows[1]) != len(header) and not (one_more and rows[1][0].isdigit()):
        raise InputError(f"{path}: the first line below the header has {len(rows[1])} fields, the header "
                         f"{len(header)}{' (a trailing tab or comma?)' if rows[1][-1] == '' else ''}; write one "
                         f"name in the header for every column")
    return header, False


def _unique(names):
    """Names with pandas' suffixes for repeats (NAME.1), so that read_csv takes them; the duplicate
    check reads the names as written."""
    seen = {}
    out = []
    for n in names:
        out.append(f"{n}.{seen[n]}" if n in seen else n)
        seen[n] = seen.get(n, 0) + 1
    return out


def _is_id_name(name) -> bool:
    return str(name).strip().lower() in ID_COLUMNS or str(name).startswith("Unnamed")


def _read_as_text(i, name) -> bool:
    """Columns that may hold spot ids: the first one and every id-named one."""
    return i == 0 or _is_id_name(name)


def _read_table(path):
    """A raw table; the columns that may hold ids are read as text, so that ids such as
    0.1 / 0.10 / 000 / NA stay distinct strings (pandas would coerce them to numbers or NaN)."""
    check_encoding(path)
    fmt = _format(path)
    header, unnamed = _header(path, _first_rows(path, fmt))
    as_text = {i: str for i, name in enumerate(header) if _read_as_text(i, name)}
    try:
        df = pd.read_csv(path, sep=fmt[0], index_col=None, low_memory=False, encoding="utf-8-sig",
                         compression="gzip" if fmt[1] else None, converters=as_text, header=0,
                         names=_unique(header) if unnamed else None)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, gzip.BadGzipFile,
            EOFError, OSError) as e:
        if isinstance(e, pd.errors.EmptyDataError):
            raise InputError(f"{path}: the file is empty; write a header line and one line per spot") from None
        raise InputError(f"{path}: cannot be read as a {'comma' if fmt[0] == ',' else 'tab'}-separated "
                         f"table ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                         f"check that the file is complete and in that format") from None
    if len(df) == 0:
        raise InputError(f"{path}: holds only a header line, no spots; write one line per spot below it")
    df.attrs["header"] = header  # the names as written, for the duplicate check
    return df


def _numbers_back(df, idc):
    """Columns read as text that are not the id column go back to numbers where they are numbers."""
    for i, c in enumerate(df.columns):
        if _read_as_text(i, c) and c != idc:
            try:
                df[c] = pd.to_numeric(df[c])
            except (ValueError, TypeError):
                pass
    return df


def _id_column(df, path, what):
    for c in df.columns:
        if _is_id_name(c):
            return c
    first = df.columns[0]
    if df[first].dtype == object:
        return first
    raise InputError(f"{path}: no spot id column (expected a first column named 'spot', 'barcode' or 'id' "
                     f"holding the {what} spot ids); add it")


def _spot_ids(df, idc, path) -> pd.Index:
    """The id column as text; an empty id would be matched to nothing (or to another empty one)."""
    ids = df[idc].astype(str).str.strip()
    empty = np.flatnonzero(ids.to_numpy() == "")
    if len(empty):
        raise InputError(f"{path}: line {empty[0] + 2} has an empty spot id ({len(empty)} line(s) in all); give "
                         f"every spot an id")
    return pd.Index(ids)


def _refuse_unnamed_genes(header, path) -> None:
    """A gene column without a name in the header, which pandas would call 'Unnamed: N'."""
    blank = [i + 1 for i, name in enumerate(header) if i > 0 and name == ""]
    if blank:
        raise InputError(f"{path}: column {blank[0]} of the header has no gene name ({len(blank)} in all); write "
                         f"a name for every gene column")


def examples(items, k=3):
    """The first k items for a message: "a, b, c, ..."."""
    items = list(items)
    s = ", ".join(map(str, items[:k]))
    return s + (", ..." if len(items) > k else "")


def unknown_names(unknown, known, k=3) -> str:
    """The first k names not found, for a message, each with the known name it most likely meant:
    the same name in another case (gene symbols differ in case between species and references), else
    a close spelling (difflib), e.g. "hk_01 (HK_01?), ERB2 (ERBB2?)"."""
    import difflib
    unknown, known = [str(n) for n in unknown], [str(n) for n in known]
    by_case = {n.lower(): n for n in known}

    def likely(name):
        hit = by_case.get(name.lower()) or next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None)
        return f"{name} ({hit}?)" if hit else name
    return examples([likely(n) for n in unknown[:k]] + unknown[k:], k)   # only the k shown are looked up


def read_counts(directory):
    """(spot_ids, genes, X float32 dense spots x genes) from cnts.* ; raw integer counts are required."""
    path = find_one(directory, COUNTS_NAMES, "spot count matrix (cnts.tsv)")
    if path.suffix == ".h5ad":
        ids, genes, X = _read_counts_h5ad(path)
    else:
        df = _read_table(path)
        if df.shape[1] < 2:
            raise InputError(f"{path}: expected a spot id column and one column per gene, found {df.shape[1]} "
                             f"column(s); write spots as rows and genes as columns")
        idc = _id_column(df, path, "counted")
        df = _numbers_back(df, idc)
        ids = _spot_ids(df, idc, path)
        _refuse_unnamed_genes(df.attrs["header"], path)
        gdf = df.drop(columns=[idc])
        genes = pd.Index([str(g) for g in gdf.columns])
        nonnum = [c for c in gdf.columns if not pd.api.types.is_numeric_dtype(gdf[c])]
        if nonnum:
            raise InputError(f"{path}: gene column(s) {examples(nonnum)} hold non-numeric values; "
                             f"the count matrix must hold numbers only")
        X = gdf.to_numpy(dtype=np.float32)
        header = df.attrs["header"]
        dups = pd.Index(header[1:])[pd.Index(header[1:]).duplicated()].unique()
        if len(dups):
            raise InputError(f"{path}: duplicated gene names ({examples(dups)}); "
                             f"make gene names unique (e.g. sum or rename duplicates)")
    return validate_counts(path, pd.Index(ids), pd.Index(genes), X)


def _read_counts_h5ad(path):
    ad = read_anndata(path, "write it with anndata's write_h5ad", damaged=False)
    X = ad.layers["counts"] if "counts" in ad.layers else (ad.raw.X if ad.raw is not None else ad.X)
    genes = ad.raw.var_names if ("counts" not in ad.layers and ad.raw is not None) else ad.var_names
    if X is None:
        raise InputError(f"{path}: the AnnData holds no count matrix (X is empty and there is no layers['counts'] "
                         f"or raw); store the raw UMI counts in X or layers['counts'] before write_h5ad")
    if hasattr(X, "toarray"):
        X = X.toarray()
    return ad.obs_names.astype(str), genes.astype(str), np.asarray(X, dtype=np.float32)


def validate_counts(path, ids, genes, X):
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{path}: the count matrix is empty ({X.shape[0]} spots x {X.shape[1]} genes); "
                         f"give spots as rows and genes as columns")
    if ids.duplicated().any():
        raise InputError(f"{path}: duplicated spot ids ({examples(ids[ids.duplicated()].unique())}); "
                         f"every spot must appear once")
    if genes.duplicated().any():
        raise InputError(f"{path}: duplicated gene names ({examples(genes[genes.duplicated()].unique())}); "
                         f"make gene names unique (e.g. sum or rename duplicates)")
    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise InputError(f"{path}: missing or non-finite count for spot {ids[bad[0]]}, gene {genes[bad[1]]}; "
                         f"the matrix must be complete (write 0 for no counts)")
    if (X < 0).any():
        bad = np.argwhere(X < 0)[0]
        raise InputError(f"{path}: negative count for spot {ids[bad[0]]}, gene {genes[bad[1]]}; "
                         f"give raw (non-negative integer) UMI counts")
    if not np.all(X == np.round(X)):
        bad = np.argwhere(X != np.round(X))[0]
        raise InputError(f"{path}: non-integer count {float(X[bad[0], bad[1]]):.6g} (spot {ids[bad[0]]}, gene "
                         f"{genes[bad[1]]}); give raw UMI counts, not normalised or log values")
    if X.sum() == 0:
        raise InputError(f"{path}: every count is zero; give the raw UMI counts of the section")
    if X.shape[0] < 3:
        raise InputError(f"{path}: only {X.shape[0]} spot(s); at least 3 measured spots are needed to learn anything")
    return ids, genes, X


def read_locs(directory, name_stem="locs-raw"):
    """DataFrame indexed by spot id with float columns x (column) and y (row)."""
    names = tuple(n.replace("locs-raw", name_stem) for n in LOCS_NAMES)
    path = find_one(directory, names, "spot locations (locs-raw.tsv)")
    df = _read_table(path)
    cols = {str(c).strip().lower(): c for c in df.columns}
    missing = [c for c in ("x", "y") if c not in cols]
    if missing:
        raise InputError(f"{path}: column(s) {', '.join(missing)} missing (found {examples(df.columns, 6)}); "
                         f"write a spot id column and columns 'x' (image column) and 'y' (image row) in pixels")
    idc = _id_column(df.drop(columns=[cols["x"], cols["y"]]), path, "located")
    out = pd.DataFrame({"x": pd.to_numeric(df[cols["x"]], errors="coerce"),
                        "y": pd.to_numeric(df[cols["y"]], errors="coerce")})
    out.index = pd.Index(_spot_ids(df, idc, path), name="spot")
    if out.index.duplicated().any():
        raise InputError(f"{path}: duplicated spot ids ({examples(out.index[out.index.duplicated()].unique())}); "
                         f"every spot must appear once")
    bad = out.index[~np.isfinite(out[["x", "y"]].to_numpy()).all(axis=1)]
    if len(bad):
        raise InputError(f"{path}: {len(bad)} spot(s) with missing or non-numeric x/y ({examples(bad)}); "
                         f"give numeric pixel coordinates for every spot")
    same = out.duplicated(subset=["x", "y"], keep=False)
    if same.any():
        first = out[same].iloc[0]
        raise InputError(f"{path}: {int(same.sum())} spots share a location (e.g. {examples(out.index[same])} at "
                         f"x={first.x:g}, y={first.y:g}); every spot needs its own x, y (check the x/y columns)")
    return out, path


def match_spots(count_ids, locs, counts_path, locs_path, genes=None):
    """Locations in the order of the count matrix; every counted spot must have a location."""
    missing = count_ids[~count_ids.isin(locs.index)]
    if genes is not None and len(missing) == len(count_ids) and pd.Index(genes).isin(locs.index).mean() > 0.5:
        raise InputError(f"{counts_path}: holds spots as columns and genes as rows (its columns are the spot ids of "
                         f"{Path(locs_path).name}); transpose it: one row per spot, one column per gene")
    if len(missing) == len(count_ids):
        raise InputError(f"{locs_path}: none of the {len(count_ids)} spot ids of {Path(counts_path).name} is there "
                         f"(counts: {examples(count_ids)}; locations: {examples(locs.index)}); "
                         f"both files must use the same spot ids")
    if len(missing):
        raise InputError(f"{locs_path}: {len(missing)} of the {len(count_ids)} spots of {Path(counts_path).name} "
                         f"have no location ({examples(missing)}); add them or drop them from the counts")
    return locs.loc[count_ids]
