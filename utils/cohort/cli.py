"""python -m utils.cohort: the five stages over many sections (README, "Cohorts")."""
import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from ..core.cli import POSITIVE_INT, Parser, output_file, setup_logging, text_file
from ..core.errors import InputError
from ..core.manifest import STAGES
from . import runner
from .sections import collect_sections, library_ids, rank_share

DEFAULT_SUMMARY = Path("cohort-summary.json")

DESCRIPTION = """\
Run the TriHRGE pipeline over many section directories: the five stages, in order, on each
section, each stage as its own process exactly as you would run it
(`python SCRIPT --directory DIR [options]`).

A stage is skipped when its artifacts are current: its manifest (DIR/manifests/<stage>.json) shows
its inputs and outputs unchanged, and it last ran with options of the same values as those given
here for it, as its own parser reads them (their order, --opt=value and spelled-out defaults do not
matter; a stage run by hand counts as current only when the options given for it are its
defaults). A stage after one that ran is rerun when that changed its inputs. A section stops at its first failing stage and the others
go on; the end prints one line per section and writes the same summary as JSON."""

EPILOG = """\
examples:
  python -m utils.cohort 'data/slides/*' --stage-args HISTEX="--epochs 300 --n-states 3"
  python -m utils.cohort --from-file sections.txt --jobs 2 --summary runs/cohort.json
  torchrun --nproc-per-node 4 -m utils.cohort 'data/*'     # the sections spread over 4 processes

stage logs: each stage's output (stdout and stderr) goes to DIR/logs/cohort-<script>.log,
e.g. DIR/logs/cohort-HISTEX.log, replaced by the next run of that stage; DIR/logs/cohort-options.json
records the options each stage last ran with.

exit codes: 0 every section ok or skipped; 1 at least one section failed (see the table, the
summary and the stage's log); 2 bad arguments (one `error:` line), nothing run.

torchrun / several processes: with RANK and WORLD_SIZE set (torchrun sets them), rank r takes
sections r, r+N, r+2N, ... and writes its own summary, PATH with `.rank<r>` before the suffix
(cohort-summary.rank0.json, ...); the stages of a rank with LOCAL_RANK see only that GPU. torchrun
sets OMP_NUM_THREADS=1 for several processes per node unless it is set: export it first (cores per
process) so that the stages use more than one thread."""


def stage_key(text: str) -> str:
    """The STAGES key for a stage name or script, case-insensitive, .py optional (HISTEX, get_hr)."""
    want = text.strip().lower().removesuffix(".py")
    for key, (script, _) in STAGES.items():
        if want in (key.lower(), script.lower().removesuffix(".py")):
            return key
    raise InputError(f"{text!r}: not a stage; choose one of {', '.join(STAGES)}")


def parse_stage_args(items: Sequence[str]) -> dict:
    """{stage: (options, ...)} from --stage-args STAGE=ARGS values (ARGS split as the shell would)."""
    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"--stage-args {item!r}: give STAGE=OPTIONS, e.g. --stage-args HISTEX=\"--epochs 300\"")
        key = stage_key(name)
        if key in out:
            raise InputError(f"--stage-args: {key} given twice; put all options of a stage in one --stage-args")
        try:
            out[key] = tuple(shlex.split(text))
        except ValueError as e:   # the options are not echoed: they may hold a token
            raise InputError(f"--stage-args {key}: cannot split the options ({e}); check the quotes") from None
        if any(len(a.split("=")[0]) >= 5 and "--login".startswith(a.split("=")[0]) for a in out[key]):
            raise InputError(f"--stage-args {key}: leave out --login (the cohort writes the options into DIR/logs "
                             f"and the summary); export HF_TOKEN instead, which the stages read")
    return out


def check_stage_options(plans, *, n_sections: int) -> None:
    """Each stage's options read by the stage's own parser before anything runs: a bad value is one
    error now, not one failure per section later. They may not name a directory (in any spelling
    argparse takes, e.g. --dir=X), nor one --out for several sections (each would overwrite it)."""
    for plan in plans:
        if not plan.args:
            continue
        try:
            ns = runner.read_stage_options(plan.stage, plan.args)
        except InputError as e:
            raise InputError(f"--stage-args {plan.stage}: {e}") from None
        except SystemExit:   # --help, --version
            raise InputError(f"--stage-args {plan.stage}: only options that run the stage; for its help, run "
                             f"python {plan.script} --help") from None
        if str(ns.directory) != runner.SECTION:
            raise InputError(f"--stage-args {plan.stage}: leave out --directory ({ns.directory}); the cohort passes "
                             f"each section's own")
        if getattr(ns, "out", None) is not None and n_sections > 1:
            raise InputError(f"--stage-args {plan.stage}: --out {ns.out} would take the outputs of all {n_sections} "
                             f"sections in turn; leave it out (each section writes under its own DIR/results)")
        if getattr(ns, "library_id", None) is not None and n_sections > 1:
            raise InputError(f"--stage-args {plan.stage}: --library-id {ns.library_id} would give all {n_sections} "
                             f"sections one name; leave it out (each is named by its folder, and sections whose "
                             f"folders share a name by the folders above, e.g. p1-visium)")


def build_plans(stages: str | None, stage_args: dict) -> list:
    """The StagePlans in pipeline order: every stage, or those of --stages."""
    keys = list(STAGES) if stages is None else [stage_key(s) for s in stages.split(",") if s.strip()]
    if not keys:
        raise InputError(f"--stages {stages!r}: names no stage; give a comma-separated list of {', '.join(STAGES)}")
    ignored = [k for k in stage_args if k not in keys]
    if ignored:
        raise InputError(f"--stage-args {ignored[0]}: that stage is not among --stages {stages}")
    return [runner.StagePlan(k, stage_args.get(k, ())) for k in STAGES if k in keys]


def build_parser() -> Parser:
    p = Parser(prog="python -m utils.cohort", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)  # defaults are in the texts
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help="section directories (each in the raw layout, see README 'Inputs'), or glob patterns in "
                        "quotes (e.g. 'data/*', expanded here: a pattern keeps the directories it matches and one "
                        "that matches none is an error)")
    p.add_argument("--from-file", type=text_file, metavar="FILE",
                   help="a text file with one section directory (or glob pattern) a line; blank lines and lines "
                        "starting with # are skipped, relative paths are taken from the file's folder")
    p.add_argument("--stage-args", action="append", default=[], metavar="STAGE=OPTIONS",
                   help="extra options for one stage on every section, e.g. --stage-args HISTEX=\"--epochs 300 "
                        "--n-states 3\" or --stage-args get_HR=\"--n-genes 500\"; repeat for other stages. STAGE: "
                        f"{', '.join(STAGES)} (case-insensitive, .py optional)")
    p.add_argument("--stages", metavar="LIST",
                   help="comma-separated stages to run (in pipeline order whatever the order given), e.g. "
                        "image_calibration,get_HR,Histology_Extractor,masking_non_tissue to prepare the sections "
                        "without training (default: all five)")
    p.add_argument("--rerun", action="store_true",
                   help="run every stage even when its artifacts are current")
    p.add_argument("--jobs", "-j", type=POSITIVE_INT, default=1,
                   help="sections processed at the same time; with N > 1 each stage gets OMP_NUM_THREADS = "
                        "the CPUs this process may use / N, unless OMP_NUM_THREADS is set (default: 1)")
    p.add_argument("--summary", type=output_file, default=DEFAULT_SUMMARY, metavar="PATH",
                   help="where the JSON summary goes (one entry per section: status, stages run, seconds, the "
                        f"failing stage, its exit code and error line); its path is printed at the end (default: "
                        f"{DEFAULT_SUMMARY} in the current directory)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress lines (stage started / skipped), only failures and the final table")
    return p


def check_summary_path(out: Path) -> None:
    """A summary replaces a previous summary, never another file (e.g. a section's cnts.tsv)."""
    if out.is_dir():
        raise InputError(f"--summary {out}: is a directory; give a file name, e.g. {out / DEFAULT_SUMMARY}")
    if out.exists() and not runner.is_summary(out):
        raise InputError(f"--summary {out}: exists and is not a cohort summary; give another path (it would be "
                         f"replaced)")


def own_names(sections) -> dict:
    """{section: {"HISTEX": ("--library-id", name)}} for the sections whose folder names collide
    (over the whole cohort, so that every rank names them alike)."""
    return {d: {"HISTEX": ("--library-id", name)} for d, name in library_ids(sections).items()}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.quiet)
        plans = build_plans(args.stages, parse_stage_args(args.stage_args))
        sections = collect_sections(args.sections, from_file=args.from_file)
        check_stage_options(plans, n_sections=len(sections))
    except InputError:
        if os.environ.get("RANK", "0") != "0":   # under torchrun every rank reads the same command: rank 0 says it
            raise SystemExit(2) from None
        raise
    mine, rank, world = rank_share(sections)
    out = runner.summary_path(args.summary, rank=rank, world=world)
    check_summary_path(out)
    t0 = time.monotonic()
    try:
        results = runner.run_cohort(mine, plans, jobs=args.jobs, rerun=args.rerun, command=runner.stage_command,
                                    env=runner.stage_environment(jobs=args.jobs), section_args=own_names(sections))
    except KeyboardInterrupt:
        print("interrupted: the stages that were running stopped and keep their previous artifacts, the ones that "
              "had finished keep their new ones; rerun the same command to go on (current stages are skipped)",
              file=sys.stderr)
        return 130
    summary = runner.summary_dict(results, plans, rank=rank, world=world, seconds=time.monotonic() - t0)
    print(runner.format_table(results))
    c = summary["counts"]
    print(f"\n{len(results)} section(s){f' (rank {rank} of {world})' if world > 1 else ''}: {c['ok']} ok, "
          f"{c['skipped']} skipped, {c['failed']} failed; summary: {runner.write_summary(out, summary)}")
    sys.stdout.flush()
    return 1 if c["failed"] else 0
