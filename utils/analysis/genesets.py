"""Gene sets: `--gene-set NAME=G1,G2,...` or a two-column TSV (set, gene), scored per observation by
scanpy.tl.score_genes (mean log expression of the set minus that of expression-matched control genes)."""
import argparse
import logging
import re

from ..core.errors import InputError
from ..core.raw_io import unknown_names
from ..core.text_io import read_text
from ..scverse.keys import Key

log = logging.getLogger("trihrge")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")   # also a file name and an obs column
MAX_NAME = 100   # gene-set-<name>.png: file names end at 255 bytes
_HEADER_FIRST = {"set", "gene_set", "name", "cell_type", "cell type", "celltype", "type"}

def _check_name(name: str, where: str = "", kind: str = "set name") -> str:
    if not _NAME.match(name) or len(name) > MAX_NAME:
        raise InputError(f"{where + ': ' if where else ''}{name[:40]!r}{'...' if len(name) > 40 else ''} is not a "
                         f"usable {kind}; use at most {MAX_NAME} letters, digits and _ . + - (it names an obs "
                         f"column and a file)")
    return name


def parse_gene_set(text: str) -> tuple:
    """argparse type of --gene-set: 'NAME=G1,G2,...' -> (NAME, [G1, G2, ...])."""
    name, sep, genes = str(text).partition("=")
    names = [g.strip() for g in genes.split(",") if g.strip()]
    if not sep or not name.strip() or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=GENE1,GENE2,... (for example "
                                         f"TLS=CXCL13,CCL19,CCL21,MS4A1)")
    try:
        return _check_name(name.strip()), list(dict.fromkeys(names))   # argparse names the option
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_gene_table(path, *, what: str, kind: str = "set name", reserved: tuple = ()) -> dict:
    """A two-column table (name, gene), tab-separated, UTF-8 with or without a BOM, any line ends,
    '#' comments, an optional header line (set/cell_type ..., gene): {name: [genes in file order]}.

    Parameters
    ----------
    path
        The file.
    what
        What the file is, for messages ('marker table', 'gene-set file').
    kind
        What its first column names, for messages ('set name', 'cell-type name').
    reserved
        Names the caller gives a meaning of its own (a marker table's 'unassigned'), refused.
    """
    out = {}
    lines = read_text(path, what).split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) == 2 and not all(fields):
            raise InputError(f"{path}: line {i} has an empty {'gene' if fields[0] else kind} ({line[:60]!r}); write "
                             f"name<TAB>gene, one gene per line")
        if len(fields) != 2:
            raise InputError(f"{path}: line {i} has {len(fields)} tab-separated field(s) {line[:60]!r}; a "
                             f"{what} holds two columns, name<TAB>gene, one gene per line")
        if not out and fields[0].lower() in _HEADER_FIRST and fields[1].lower() in ("gene", "genes", "marker"):
            continue
        if fields[0].lower() in reserved:
            raise InputError(f"{path}: line {i}: {fields[0]!r} is reserved (the {kind} of an observation that "
                             f"no set matches); rename it")
        out.setdefault(_check_name(fields[0], f"{path}: line {i}", kind), [])
        if fields[1] not in out[fields[0]]:
            out[fields[0]].append(fields[1])
    if not out:
        raise InputError(f"{path}: holds no (name, gene) line; write one name<TAB>gene pair per line")
    return out


def require_genes(sets: dict, genes, *, source: str) -> None:
    """Refuse a gene set naming a gene that is not predicted (a typo, or a gene not selected by get_HR)."""
    known = set(genes)
    for name, members in sets.items():
        unknown = [g for g in members if g not in known]
        if unknown:
            raise InputError(f"{source}: gene set {name}: {unknown_names(unknown, genes, 5)} not among the {len(known)} "
                             f"predicted genes (see the run's super-res.h5ad var_names / DIR/genes.tsv); check "
                             f"the spelling or drop the gene")


def score(adata, *, genes, key: str, seed: int = 0) -> None:
    """obs[key]: scanpy.tl.score_genes of `genes` on the log-normalised expression.

    Parameters
    ----------
    adata
        Log-normalised expression.
    genes
        Genes of the set (all in var_names).
    key
        obs column to write.
    seed
        Random state of the control-gene draw.
    """
    import scanpy as sc
    try:
        sc.tl.score_genes(adata, list(genes), score_name=key, random_state=seed, ctrl_size=min(50, adata.n_vars),
                          n_bins=control_bins(adata.n_vars))
    except RuntimeError as e:   # "No control genes found in any cut"
        raise InputError(f"{key}: scanpy found no control genes of the same expression as the set's ({e}); "
                         f"add genes expressed at other levels to the set") from None


def control_bins(n_genes: int, most: int = 25) -> int:
    """scanpy's 25 expression bins, fewer for small panels so that every bin holds control genes.
    scanpy cuts the genes' expression ranks into runs of round(n / (bins - 1)); the last run (the
    most expressed genes) holds only the remainder, a single gene for 300 genes in 25 bins, and a set
    of just that gene then has no control. So the bins are cut to give the last run half a bin."""
    start = min(most, max(2, n_genes // 10))
    for bins in [*range(start, 1, -1), *range(start + 1, min(most, n_genes // 2) + 1)]:   # fewer first
        per_bin = int(round(n_genes / (bins - 1)))
        if n_genes - (n_genes // per_bin) * per_bin + 1 >= max(2, per_bin // 2):
            return bins
    return start


def score_gene_sets(adata, *, sets: dict, seed: int = 0) -> list:
    """obs['gene_set_<NAME>'] for every set; returns the obs keys written.

    Parameters
    ----------
    adata
        Log-normalised expression; every gene of every set in var_names (require_genes).
    sets
        {name: [genes]}.
    seed
        Random state of the control-gene draws.
    """
    keys = []
    for name, members in sets.items():
        key = Key.GENE_SET_SCORE.format(name)
        score(adata, genes=members, key=key, seed=seed)
        log.info("gene set %s: %d genes, score median %.3f", name, len(members), float(adata.obs[key].median()))
        keys.append(key)
    return keys
