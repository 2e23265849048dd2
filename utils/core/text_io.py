"""Opening the user's text inputs (numbers, gene lists, tables): a directory, UTF-16/32 text and a
UTF-8 byte-order mark get one clear line or are accepted; CRLF line ends are accepted everywhere."""
import gzip
import json
from pathlib import Path

from .errors import InputError

# byte-order marks of encodings we do not read (UTF-8 with a BOM is read as UTF-8)
_FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                 (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def require_file(path, what="file", fix=None) -> Path:
    """The path, which must exist and be a regular file (not a directory); `fix` says what to pass."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file; {fix or f'put the {what} there as a file'}")
    if not path.is_file():
        raise InputError(f"{path}: not found" + (f"; {fix}" if fix else ""))
    return path


def is_gzip(path) -> bool:
    """By content, not by name: a gzip'd table named cnts.tsv (or a plain one named .gz) is read as what it is."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def check_encoding(path) -> None:
    """Refuse UTF-16/32 text (Excel's "Unicode text") with a line that says how to fix it."""
    path = Path(path)
    opener = gzip.open if is_gzip(path) else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
    except (OSError, EOFError):
        return  # the reader that follows reports damage
    for bom, name in _FOREIGN_BOMS:
        if head.startswith(bom):
            raise InputError(f"{path}: is {name} text; save it as UTF-8 (e.g. 'CSV UTF-8' or "
                             f"'Tab delimited Text' in Excel, or iconv -f {name} -t UTF-8)")


def read_text(path, what="file") -> str:
    """A small text input as str: UTF-8 with or without a BOM, any line ends (normalised to \\n)."""
    path = require_file(path, what)
    check_encoding(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: is not UTF-8 text; save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def object_problem(text: str, keys=()) -> tuple:
    """(the JSON object in `text`, None), or (None, what is wrong with it: not JSON, not an object, a key missing)."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, f"not valid JSON ({type(e).__name__})"
    if not isinstance(obj, dict):
        return None, f"holds a JSON {type(obj).__name__}, not an object" + (f" with {', '.join(keys)}" if keys else "")
    missing = [k for k in keys if k not in obj]
    return (None, f"has no {', '.join(missing)}") if missing else (obj, None)


def json_object(path, keys, fix):
    """A JSON object holding `keys` (a user's or a protocol folder's small file), else one error line."""
    obj, problem = object_problem(read_text(path, "JSON file"), keys)
    if problem:
        raise InputError(f"{path}: {problem}; {fix}")
    return obj


def positive_number(value) -> bool:
    """Whether a value read from JSON or an h5ad's uns is a finite number above 0 (not a bool, not text)."""
    import math
    import numbers
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf
