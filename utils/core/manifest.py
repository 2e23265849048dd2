"""Stage manifests: what each stage read, wrote and with which parameters, so that a rerun of one
stage is safe (a stage refuses to build on stale or hand-edited upstream artifacts unless --force).

Manifests live in DIR/manifests/<stage>.json; artifact paths inside are relative to DIR. A damaged
manifest (not JSON, not an object, missing keys) stops the stages that read its artifacts with one
line naming the stage to rerun, and never blocks rerunning the stage that writes it."""
import datetime
import hashlib
import importlib.metadata
import json
import logging
import platform
from pathlib import Path

from .errors import InputError

log = logging.getLogger("trihrge")

MANIFEST_DIR = "manifests"
HASH_LIMIT = 64 * 2 ** 20  # larger files are fingerprinted by size + mtime only

# stage -> (script, stages whose artifacts it reads), in pipeline order: the one list of stages
STAGES = {
    "image_calibration": ("image_calibration.py", ()),
    "get_HR": ("get_HR.py", ("image_calibration",)),
    "Histology_Extractor": ("Histology_Extractor.py", ("image_calibration",)),
    "masking_non_tissue": ("masking_non_tissue.py", ("image_calibration",)),
    "HISTEX": ("HISTEX.py", ("image_calibration", "get_HR", "Histology_Extractor", "masking_non_tissue")),
}
SCRIPTS = [script for script, _ in STAGES.values()]

_VERSIONED = ("numpy", "scipy", "pandas", "anndata", "scikit-image", "opencv-python-headless",
              "tifffile", "torch", "timm")


def script_of(stage: str) -> str:
    return STAGES[stage][0]


def rerun_hint(stage: str, directory) -> str:
    return f"`python {script_of(stage)} --directory {directory}`"


def fingerprint(path: Path) -> dict:
    path = Path(path)
    st = path.stat()
    fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        fp["sha256"] = h.hexdigest()
    return fp


def same_fingerprint(recorded, path: Path) -> bool:
    """Content hash when recorded (touching a file is harmless), else size + mtime."""
    path = Path(path)
    if not isinstance(recorded, dict) or not path.is_file():
        return False
    st = path.stat()
    if st.st_size != recorded.get("size"):
        return False
    if "sha256" in recorded:
        if st.st_mtime_ns == recorded.get("mtime_ns"):
            return True
        return fingerprint(path).get("sha256") == recorded["sha256"]
    return st.st_mtime_ns == recorded.get("mtime_ns")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def manifest_path(directory, stage: str) -> Path:
    return Path(directory) / MANIFEST_DIR / f"{stage}.json"


def read_manifest(directory, stage: str):
    """The manifest dict, None when there is none; InputError when it is damaged."""
    p = manifest_path(directory, stage)
    if not p.exists():
        return None
    fix = f"rerun {rerun_hint(stage, directory)}"
    if not p.is_file():
        raise InputError(f"{p}: is not a file; remove it and {fix}")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"{p}: damaged manifest, not valid JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(m, dict) or not all(isinstance(m.get(k), dict) for k in ("inputs", "outputs", "parameters")):
        raise InputError(f"{p}: damaged manifest (not an object with inputs, outputs and parameters); {fix}")
    return m


def _rel(directory, path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path(directory).resolve()))
    except ValueError:
        return str(path.resolve())


def _files(tmp: Path, final: Path):
    """(file as it is now, name it will have): a staged directory contributes every file inside."""
    if tmp.is_dir():
        return [(f, final / f.relative_to(tmp)) for f in sorted(tmp.rglob("*")) if f.is_file()]
    return [(tmp, final)] if tmp.is_file() else []


def build_manifest(directory, stage: str, parameters: dict, inputs, staged, views=()) -> dict:
    """The manifest dict. staged: (current path, final path) pairs of the outputs; they are
    fingerprinted where they are now (renaming keeps size and mtime), except files named in `views`
    (a run's report, which the analysis and `score --write` rewrite: not a sign of a stale run)."""
    directory = Path(directory)
    outputs = {}
    for tmp, final in staged:
        for now, later in _files(Path(tmp), Path(final)):
            if later.name not in views:
                outputs[_rel(directory, later)] = fingerprint(now)
    return {
        "stage": stage,
        "script": script_of(stage),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": parameters,
        "inputs": {_rel(directory, p): fingerprint(p) for p in inputs if Path(p).is_file()},
        "outputs": outputs,
        "versions": package_versions(),
    }


def upstream_closure(stage: str) -> list:
    seen, todo = [], list(STAGES[stage][1])
    while todo:
        s = todo.pop(0)
        if s not in seen:
            seen.append(s)
            todo.extend(STAGES[s][1])
    order = list(STAGES)
    return sorted(seen, key=order.index)


def _stale(directory: Path, m: dict, script: str) -> list:
    problems = []
    for rel, fp in m["outputs"].items():
        if not same_fingerprint(fp, directory / rel):
            problems.append(f"{directory / rel} was changed after {script} wrote it")
    for rel, fp in m["inputs"].items():
        p = directory / rel if not Path(rel).is_absolute() else Path(rel)
        if not same_fingerprint(fp, p):
            problems.append(f"{p} changed (or vanished) since {script} last ran, so its outputs are stale")
    return problems


def check_upstream(directory, stage: str, force: bool = False, log=None) -> None:
    """Refuse to run `stage` on missing, stale or hand-modified upstream artifacts.

    Missing artifacts always stop the run; staleness is overridable with --force (then logged)."""
    directory = Path(directory)
    this_script = script_of(stage)
    for up in upstream_closure(stage):
        script = script_of(up)
        m = read_manifest(directory, up)
        if m is None:
            raise InputError(f"{manifest_path(directory, up)}: not found, so {script} has not run on {directory}; "
                             f"run {rerun_hint(up, directory)} before {this_script}")
        for rel in m["outputs"]:
            if not (directory / rel).is_file():
                raise InputError(f"{directory / rel}: missing (it is written by {script}); rerun {rerun_hint(up, directory)}")
        problems = _stale(directory, m, script)
        if problems:
            msg = (f"{problems[0]}{' (and %d more)' % (len(problems) - 1) if len(problems) > 1 else ''}; "
                   f"rerun {rerun_hint(up, directory)} and the stages after it, or pass --force to {this_script}")
            if not force:
                raise InputError(msg)
            if log is not None:
                log.warning("--force: using stale upstream artifacts: %s", msg)


def changed_since_last_run(directory, stage: str, inputs, parameters: dict) -> list:
    """Human-readable reasons why this stage's previous outputs are out of date (for the log). A
    damaged manifest of the stage itself is only reported: rerunning the stage repairs it."""
    try:
        m = read_manifest(directory, stage)
    except InputError as e:
        log.warning("ignoring the previous manifest: %s", str(e).split(";")[0])
        return ["the previous manifest is damaged"]
    if m is None:
        return []
    reasons = []
    for p in inputs:
        rel = _rel(directory, p)
        if rel in m["inputs"] and not same_fingerprint(m["inputs"][rel], p):
            reasons.append(f"{rel} changed")
    for k, v in parameters.items():
        if k in m["parameters"] and m["parameters"][k] != v:
            reasons.append(f"--{k.replace('_', '-')} {m['parameters'][k]} -> {v}")
    return reasons


def out_of_date(directory, stage: str) -> list:
    """Why the artifacts `stage` wrote in DIR are not current, [] when they are: it never ran, its
    manifest is damaged, an output is missing or was changed, or an input it read changed since.
    What rerunning the stage would fix, so a cohort run skips a stage only when this is empty."""
    directory = Path(directory)
    try:
        m = read_manifest(directory, stage)
    except InputError as e:
        return [str(e).split(";")[0]]
    if m is None:
        return [f"{script_of(stage)} has not run on {directory}"]
    return _stale(directory, m, script_of(stage))
