"""Running the pipeline stages over the sections of a cohort.

Each stage runs as its own process, exactly as a user runs it (`python SCRIPT --directory DIR
[options]`), with its output in DIR/logs/cohort-<stage>.log. A stage is skipped when its manifest
shows its artifacts current (utils.core.manifest.out_of_date) and the options asked for it are the
ones it last ran with (compared as the stage's own parser reads them); a section stops at its first
failing stage and the other sections go on."""
import argparse
import contextlib
import errno
import functools
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..core import manifest as mf
from ..core.atomic import StagedOutputs, folder_identity, is_disk_full
from ..core.device import available_cpus
from ..core.errors import InputError
from ..core.stage import DirectoryLock
from ..core.workers import interrupt_children, run_child

log = logging.getLogger("trihrge")

REPO = Path(__file__).resolve().parents[2]
LOG_DIR = "logs"
OPTIONS_RECORD = "cohort-options.json"   # in DIR/logs: the options each stage last ran with here
# set by torchrun for the cohort's own processes; a stage that inherited them would take itself for
# a rank of the cohort's process group
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                      "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@dataclass(frozen=True)
class StagePlan:
    """One stage to run on every section: its key in utils.core.manifest.STAGES and the extra
    command-line options it gets."""
    stage: str
    args: tuple[str, ...] = ()

    @property
    def script(self) -> str:
        return mf.script_of(self.stage)


@dataclass
class SectionResult:
    """What happened to one section: status ok (stages ran), skipped (all current) or failed."""
    section: str
    status: str
    stages_run: list = field(default_factory=list)
    seconds: float = 0.0
    failed_stage: str | None = None
    exit_code: int | None = None
    error: str = ""


def stage_command(plan: StagePlan, directory: Path) -> list[str]:
    """The command a user would type for this stage on this section."""
    return [sys.executable, str(REPO / plan.script), "--directory", str(directory), *plan.args]


def stage_log(directory: Path, plan: StagePlan) -> Path:
    return Path(directory) / LOG_DIR / f"cohort-{Path(plan.script).stem}.log"


def stage_environment(*, jobs: int = 1, environ: Mapping = os.environ) -> dict:
    """The environment of every stage process: the cohort's own, without torchrun's variables; with
    --jobs N the CPUs shared out (OMP_NUM_THREADS, unless set); under torchrun with LOCAL_RANK the
    rank's own GPU (the LOCAL_RANK-th of CUDA_VISIBLE_DEVICES, or of all GPUs)."""
    env = {k: v for k, v in environ.items() if k not in LAUNCHER_VARIABLES}
    if jobs > 1 and not environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // jobs))
    local, local_world = environ.get("LOCAL_RANK", "").strip(), environ.get("LOCAL_WORLD_SIZE", "").strip()
    if local.isdigit() and local_world.isdigit() and int(local_world) > 1:
        visible = [g for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[int(local) % len(visible)] if visible else local
    return env


# ---------------------------------------------------------------------------------------------
# what a stage's options mean

SECTION = "<each section>"   # the --directory that options are read with, apart from any section
_PARSER_LOCK = threading.Lock()


@functools.cache
def _load_stage_parser(stage: str) -> argparse.ArgumentParser:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    script = REPO / mf.script_of(stage)
    spec = importlib.util.spec_from_file_location(f"_cohort_{stage}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    parser.prog = script.name
    return parser


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """The argparse parser of a stage's script (its build_parser()), named as the script; loaded
    once per process (HISTEX.py's imports torch) and by one thread at a time under --jobs."""
    with _PARSER_LOCK:
        return _load_stage_parser(stage)


def read_stage_options(stage: str, args: Sequence[str]) -> argparse.Namespace:
    """The values the stage's own parser reads from these options, its defaults filled in (a -h or
    --version among them: SystemExit, with nothing printed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return stage_parser(stage).parse_args(["--directory", SECTION, *args])


def same_options(stage: str, last: Sequence[str], now: Sequence[str]) -> bool:
    """Whether two option lists run the stage alike: the same values once its parser has read them,
    whatever the order, `--opt=value` or spelled-out defaults."""
    if list(last) == list(now):   # the usual case, without loading the script
        return True
    try:
        return read_stage_options(stage, last) == read_stage_options(stage, now)
    except (InputError, SystemExit):   # options the script no longer takes: run it as asked now
        return False


# ---------------------------------------------------------------------------------------------
# which stages are current

def _options_record_path(directory: Path) -> Path:
    return Path(directory) / LOG_DIR / OPTIONS_RECORD


def read_options_record(directory: Path) -> dict:
    """{stage: {"args": [...], "manifest": fingerprint}}; a missing or damaged record is empty (it only
    saves work, so the worst case is a stage run once more)."""
    try:
        rec = json.loads(_options_record_path(directory).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def remember_options(directory: Path, plan: StagePlan) -> None:
    """Record the options this stage just ran with, tied to the manifest it wrote."""
    folder = _options_record_path(directory).parent
    if not folder.is_dir():   # DIR vanished while the stage ran: StagedOutputs would make it anew
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(folder))
    rec = read_options_record(directory)
    rec[plan.stage] = {"args": list(plan.args), "manifest": mf.fingerprint(mf.manifest_path(directory, plan.stage))}
    with StagedOutputs() as out:
        out.write_json(_options_record_path(directory), rec)


def is_current(directory: Path, plan: StagePlan) -> bool:
    """True when rerunning the stage would not change anything: its manifest shows its outputs and
    inputs unchanged, and it ran with options of the same values. Options are known for runs made by
    this tool (its record names the manifest they produced); a stage run some other way counts as
    current only when the options asked for it are its defaults."""
    if mf.out_of_date(directory, plan.stage):
        return False
    last = read_options_record(directory).get(plan.stage)
    ran_here = isinstance(last, dict) and mf.same_fingerprint(last.get("manifest"),
                                                               mf.manifest_path(directory, plan.stage))
    args = last.get("args") if ran_here else []
    valid = isinstance(args, list) and all(isinstance(a, str) for a in args)   # else a damaged record
    return valid and same_options(plan.stage, args, plan.args)


# ---------------------------------------------------------------------------------------------
# running

def error_line(log_text: str) -> str:
    """The line that says why a stage failed: its last `error:` line (the project's one-line user
    errors), else the last non-empty line (a traceback's exception)."""
    lines = [line.strip() for line in log_text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


_STOPPING = threading.Event()   # set when the cohort is interrupted: no further stage starts


def interrupt_stages() -> None:
    _STOPPING.set()
    interrupt_children()


def _remove_new(paths: Sequence[Path]) -> None:
    """Remove files and (empty) folders this run made, in the order given; what cannot go stays."""
    for p in paths:
        with contextlib.suppress(OSError):
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink()


def start_log(path: Path, cmd: Sequence[str]) -> None:
    """Create the stage's log, headed by its command. A start that fails (a full disk) removes the
    log and logs/ folder it made, so that the section keeps no new empty ones."""
    new = [p for p in (path, path.parent) if not p.exists()]   # the log before its folder
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("$ " + " ".join(cmd) + "\n")
    except OSError:
        _remove_new(new)
        raise


def cannot_write(directory: Path, e: OSError, *, was: tuple | None) -> str:
    """The error line for a stage log or options record the cohort could not write, its fix fitting
    the cause: the section gone (`was`: its identity when the cohort came to it), a full disk, or a
    folder that refuses writing."""
    now = folder_identity(directory)
    if now is None or now != was:
        return (f"error: {directory}: the section directory no longer exists (deleted, moved or unmounted "
                f"while the cohort ran); put it back in its place and rerun the cohort")
    where = e.filename or Path(directory) / LOG_DIR
    if is_disk_full(e):
        return (f"error: {where}: the disk is full (No space left on device); free some space on it and rerun "
                f"the cohort (current stages are skipped)")
    return (f"error: {where}: {e.strerror or e}; the cohort keeps each stage's log in "
            f"{Path(directory) / LOG_DIR}: make that a writable folder")


def run_stage(directory: Path, plan: StagePlan, *, command: Callable = stage_command, env: Mapping | None = None):
    """Run one stage on one section, its output in its log file; (exit code, error line or "").
    A section another process works on is refused before its log is opened (that log is the other
    run's)."""
    busy = DirectoryLock.holder_message(directory)
    if busy:
        return 2, f"error: {busy}"
    path = stage_log(directory, plan)
    cmd = command(plan, directory)
    start_log(path, cmd)
    with open(path, "a", encoding="utf-8") as f:
        # in the cohort's own working directory, so relative paths in --stage-args mean what they say
        try:
            rc = run_child(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        except KeyboardInterrupt:
            _STOPPING.set()
            raise
    return rc, (error_line(path.read_text(encoding="utf-8", errors="replace")) if rc else "")


def run_section(directory: Path, plans: Sequence[StagePlan], *, rerun: bool = False,
                command: Callable = stage_command, env: Mapping | None = None) -> SectionResult:
    """Run the stages of `plans` in order on one section, skipping current ones (unless `rerun`),
    stopping at the first that fails. Each stage is checked just before its turn, so a stage after
    one that ran is rerun exactly when its inputs changed."""
    t0 = time.monotonic()
    result = SectionResult(str(directory), "skipped")
    was = folder_identity(directory)
    for plan in plans:
        if _STOPPING.is_set():   # interrupted: start nothing more
            break
        if not rerun and is_current(directory, plan):
            log.info("%s: %s is current, skipped", directory, plan.script)
            continue
        log.info("%s: running %s", directory, plan.script)
        try:
            rc, error = run_stage(directory, plan, command=command, env=env)
            if rc == 0:
                remember_options(directory, plan)
        except OSError as e:  # the log or the record cannot be written (a read-only or full DIR, DIR gone)
            rc, error = 2, cannot_write(directory, e, was=was)
        if rc and _STOPPING.is_set():   # stopped by the interruption, which the cohort reports once
            result.status, result.failed_stage, result.exit_code = "failed", plan.stage, rc
            break
        if rc:
            where = stage_log(directory, plan)
            log.warning("%s: %s failed (exit %d): %s%s", directory, plan.script, rc, error,
                        f" (log: {where})" if where.is_file() else "")   # none when its start failed
            result.status, result.failed_stage, result.exit_code, result.error = "failed", plan.stage, rc, error
            break
        result.stages_run.append(plan.stage)
        result.status = "ok"
    result.seconds = round(time.monotonic() - t0, 1)
    return result


def run_cohort(sections: Sequence[Path], plans: Sequence[StagePlan], *, jobs: int = 1, rerun: bool = False,
               command: Callable = stage_command, env: Mapping | None = None,
               section_args: Mapping[Path, Mapping[str, tuple]] | None = None) -> list[SectionResult]:
    """Every section through the stages, `jobs` sections at a time; results in the order given.
    section_args: {section: {stage: options}} added to that stage's options for that section alone
    (its own --library-id)."""
    def one(directory):
        extra = (section_args or {}).get(directory, {})
        own = [replace(p, args=p.args + tuple(extra.get(p.stage, ()))) for p in plans]
        return run_section(directory, own, rerun=rerun, command=command, env=env)
    _STOPPING.clear()
    if jobs <= 1:
        return [one(d) for d in sections]
    pool = ThreadPoolExecutor(jobs)  # the stages are processes: threads only wait on them
    try:
        return list(pool.map(one, sections))
    except KeyboardInterrupt:
        interrupt_stages()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after Ctrl-C, start no further section


# ---------------------------------------------------------------------------------------------
# reporting

def summary_path(path: Path, *, rank: int, world: int) -> Path:
    """Where this process writes its summary: PATH itself, or PATH's stem + .rank<r> under torchrun."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def summary_dict(results: Sequence[SectionResult], plans: Sequence[StagePlan], *, rank: int, world: int,
                 seconds: float) -> dict:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    return {"rank": rank, "world_size": world, "seconds": round(seconds, 1), "counts": counts,
            "stages": [{"stage": p.stage, "args": list(p.args)} for p in plans],
            "sections": [asdict(r) for r in results]}


def is_summary(path: Path) -> bool:
    """Whether the file is a summary this command wrote (one it may replace)."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"counts", "sections", "stages"} <= set(summary)


def write_summary(path: Path, summary: dict) -> Path:
    with StagedOutputs() as out:  # a complete file or the previous one, never half of one
        out.write_json(path, summary)
    return path


def format_table(results: Sequence[SectionResult]) -> str:
    """The summary as a plain-text table: section, status, stages run, seconds, error."""
    rows = [("section", "status", "stages run", "seconds", "error")]
    rows += [(r.section, r.status, ",".join(r.stages_run) or "-", f"{r.seconds:.1f}",
              f"{r.failed_stage} (exit {r.exit_code}): {r.error}" if r.status == "failed" else "")
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)
