"""Stage manifests: what each stage read, wrote and with which parameters, so that a rerun of one
stage is safe (a stage refuses to build on stale or hand-edited upstream artifacts unless --force).

Manifests live in DIR/manifests/<stage>.json; artifact paths inside are relative to DIR."""
import datetime
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

from .errors import InputError

MANIFEST_DIR = "manifests"
HASH_LIMIT = 64 * 2 ** 20  # larger files are fingerprinted by size + mtime only

# stage -> (script, stages whose artifacts it reads)
STAGES = {
    "image_calibration": ("image_calibration.py", ()),
    "get_HR": ("get_HR.py", ("image_calibration",)),
    "Histology_Extractor": ("Histology_Extractor.py", ("image_calibration",)),
    "masking_non_tissue": ("masking_non_tissue.py", ("image_calibration",)),
    "HISTEX": ("HISTEX.py", ("image_calibration", "get_HR", "Histology_Extractor", "masking_non_tissue")),
}

_VERSIONED = ("numpy", "scipy", "pandas", "anndata", "scikit-image", "opencv-python-headless",
              "tifffile", "torch", "timm")


def fingerprint(path):
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


def same_fingerprint(recorded, path):
    """Content hash when recorded (touching a file is harmless), else size + mtime."""
    path = Path(path)
    if not path.is_file():
        return False
    st = path.stat()
    if st.st_size != recorded.get("size"):
        return False
    if "sha256" in recorded:
        if st.st_mtime_ns == recorded.get("mtime_ns"):
            return True
        return fingerprint(path).get("sha256") == recorded["sha256"]
    return st.st_mtime_ns == recorded.get("mtime_ns")


def package_versions():
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def manifest_path(directory, stage):
    return Path(directory) / MANIFEST_DIR / f"{stage}.json"


def read_manifest(directory, stage):
    p = manifest_path(directory, stage)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: manifest is not valid JSON ({e}); delete it and rerun {STAGES[stage][0]}") from None


def _rel(directory, path):
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path(directory).resolve()))
    except ValueError:
        return str(path.resolve())


def build_manifest(directory, stage, parameters, inputs, outputs):
    """The manifest dict; call after the outputs are in their final place."""
    directory = Path(directory)
    return {
        "stage": stage,
        "script": STAGES[stage][0],
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": parameters,
        "inputs": {_rel(directory, p): fingerprint(p) for p in inputs},
        "outputs": {_rel(directory, p): fingerprint(p) for p in outputs},
        "versions": package_versions(),
    }


def write_manifest(directory, stage, parameters, inputs, outputs):
    from .atomic import StagedOutputs
    m = build_manifest(directory, stage, parameters, inputs, outputs)
    with StagedOutputs() as out:
        out.write_json(manifest_path(directory, stage), m)
    return m


def upstream_closure(stage):
    seen, todo = [], list(STAGES[stage][1])
    while todo:
        s = todo.pop(0)
        if s not in seen:
            seen.append(s)
            todo.extend(STAGES[s][1])
    order = list(STAGES)
    return sorted(seen, key=order.index)


def check_upstream(directory, stage, force=False, log=None):
    """Refuse to run `stage` on missing, stale or hand-modified upstream artifacts.

    Missing artifacts always stop the run; staleness is overridable with --force (then logged)."""
    directory = Path(directory)
    this_script = STAGES[stage][0]
    for up in upstream_closure(stage):
        script = STAGES[up][0]
        m = read_manifest(directory, up)
        if m is None:
            raise InputError(f"{manifest_path(directory, up)}: not found, so {script} has not run on {directory}; "
                             f"run `python {script} --directory {directory}` before {this_script}")
        for rel, fp in m["outputs"].items():
            p = directory / rel
            if not p.is_file():
                raise InputError(f"{p}: missing (it is written by {script}); rerun `python {script} --directory {directory}`")
        problems = []
        for rel, fp in m["outputs"].items():
            if not same_fingerprint(fp, directory / rel):
                problems.append(f"{directory / rel} was changed after {script} wrote it")
        for rel, fp in m["inputs"].items():
            p = directory / rel if not Path(rel).is_absolute() else Path(rel)
            if not same_fingerprint(fp, p):
                problems.append(f"{p} changed (or vanished) since {script} last ran, so its outputs are stale")
        if problems:
            msg = (f"{problems[0]}{' (and %d more)' % (len(problems) - 1) if len(problems) > 1 else ''}; "
                   f"rerun `python {script} --directory {directory}` and the stages after it, or pass --force to {this_script}")
            if not force:
                raise InputError(msg)
            if log is not None:
                log.warning("--force: using stale upstream artifacts: %s", msg)


def changed_since_last_run(directory, stage, inputs, parameters):
    """Human-readable reasons why this stage's previous outputs are out of date (for the log)."""
    m = read_manifest(directory, stage)
    if m is None:
        return []
    reasons = []
    for p in inputs:
        rel = _rel(directory, p)
        if rel in m["inputs"] and not same_fingerprint(m["inputs"][rel], p):
            reasons.append(f"{rel} changed")
    for k, v in parameters.items():
        if k in m.get("parameters", {}) and m["parameters"][k] != v:
            reasons.append(f"--{k.replace('_', '-')} {m['parameters'][k]} -> {v}")
    return reasons
