"""python -m utils.cohort: skipping current stages, failures reported without stopping the others,
exit codes, glob and list-file expansion, torchrun rank shares; and manifest.out_of_date.

Most tests replace the stage scripts by a small `python -c` stage (FAKE_STAGE) that writes one
output and a real manifest, so they take seconds; one runs the real five stages on tiny data."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, assert_user_error, hex_lattice, write_raw_dir

from utils.cohort import cli, runner
from utils.cohort.sections import collect_sections, rank_share
from utils.core import manifest as mf
from utils.core.errors import InputError

# argv: DIR STAGE [options]; fails (exit 3, an `error:` line) when DIR/fail-STAGE exists; deletes DIR
# (and makes DIR/manifests anew, as a real stage may, when the file says "remake") when DIR/vanish-STAGE does
FAKE_STAGE = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + """
import json
import shutil
from pathlib import Path
from utils.core.manifest import build_manifest, manifest_path
d, stage, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
with open(d / "runs.txt", "a") as f:
    f.write(stage + "\\n")
if (d / ("vanish-" + stage)).exists():
    remake = (d / ("vanish-" + stage)).read_text() == "remake"
    shutil.rmtree(d)
    if remake:
        (d / "manifests").mkdir(parents=True)
    sys.exit(0)
if (d / ("fail-" + stage)).exists():
    print("working...", file=sys.stderr)
    print(f"error: {d}: fake failure of {stage}", file=sys.stderr)
    sys.exit(3)
out = d / (stage + ".out")
out.write_text((d / "input.txt").read_text() + " ".join(args))
manifest_path(d, stage).parent.mkdir(exist_ok=True)
manifest_path(d, stage).write_text(json.dumps(build_manifest(d, stage, {}, [d / "input.txt"], [(out, out)])))
"""
ALL = list(mf.STAGES)


@pytest.fixture
def fake_stages(monkeypatch):
    monkeypatch.setattr(runner, "stage_command",
                        lambda plan, d: [sys.executable, "-c", FAKE_STAGE, str(d), plan.stage, *plan.args])


def make_sections(root, *names):
    out = []
    for n in names:
        (root / n).mkdir(parents=True)
        (root / n / "input.txt").write_text(f"data of {n}\n")
        out.append(root / n)
    return out


def runs(d):
    p = d / "runs.txt"
    return p.read_text().split() if p.exists() else []


def cohort(tmp_path, *argv):
    """cli.main in this process; (exit code, summary dict)."""
    summary = tmp_path / "summary.json"
    rc = cli.main([*map(str, argv), "--summary", str(summary), "-q"])
    return rc, json.loads(summary.read_text())


def statuses(summary):
    return [s["status"] for s in summary["sections"]]


def test_out_of_date_reports_what_a_rerun_would_fix(tmp_path):
    d = make_sections(tmp_path, "s")[0]
    assert "has not run" in mf.out_of_date(d, "get_HR")[0]
    out = d / "get_HR.out"
    out.write_text("x")
    mf.manifest_path(d, "get_HR").parent.mkdir()
    mf.manifest_path(d, "get_HR").write_text(json.dumps(mf.build_manifest(d, "get_HR", {}, [d / "input.txt"],
                                                                          [(out, out)])))
    assert mf.out_of_date(d, "get_HR") == []
    (d / "input.txt").write_text("new data\n")
    assert "input.txt changed" in mf.out_of_date(d, "get_HR")[0]
    (d / "input.txt").write_text(f"data of {d.name}\n")   # same content again: current (content hash)
    assert mf.out_of_date(d, "get_HR") == []
    out.unlink()
    assert "get_HR.out" in mf.out_of_date(d, "get_HR")[0]
    mf.manifest_path(d, "get_HR").write_text("{not json")
    assert "damaged manifest" in mf.out_of_date(d, "get_HR")[0]


def test_current_sections_are_skipped_and_changed_ones_rerun(tmp_path, fake_stages):
    s1, s2 = make_sections(tmp_path / "data", "s1", "s2")
    rc, summary = cohort(tmp_path, s1, s2)
    assert rc == 0 and statuses(summary) == ["ok", "ok"]
    assert runs(s1) == runs(s2) == ALL and summary["sections"][0]["stages_run"] == ALL
    assert (s1 / "logs" / "cohort-HISTEX.log").read_text().startswith("$ ")

    rc, summary = cohort(tmp_path, s1, s2)   # nothing changed: nothing runs
    assert rc == 0 and statuses(summary) == ["skipped", "skipped"] and runs(s1) == ALL

    (s1 / "input.txt").write_text("new data\n")   # every fake stage reads it
    rc, summary = cohort(tmp_path, s1, s2)
    assert statuses(summary) == ["ok", "skipped"] and runs(s1) == ALL * 2

    # other options for one stage: that stage reruns, once
    rc, summary = cohort(tmp_path, s1, s2, "--stage-args", "histex=--epochs 3")
    assert statuses(summary) == ["ok", "ok"] and runs(s2) == ALL + ["HISTEX"]
    assert summary["stages"][-1] == {"stage": "HISTEX", "args": ["--epochs", "3"]}
    rc, summary = cohort(tmp_path, s1, s2, "--stage-args", "HISTEX.py=--epochs 3")
    assert statuses(summary) == ["skipped", "skipped"]

    rc, summary = cohort(tmp_path, s2, "--rerun", "--stages", "get_HR,image_calibration")
    assert summary["sections"][0]["stages_run"] == ["image_calibration", "get_HR"]


def test_options_are_compared_by_their_values_not_their_text(tmp_path, fake_stages):
    """Reordered options, --opt=value, an abbreviation or a spelled-out default run HISTEX as before:
    it is skipped; a value that changes reruns it. Read by HISTEX.py's own parser, defaults filled in."""
    s1, = make_sections(tmp_path / "data", "s1")

    def histex(options):
        rc, summary = cohort(tmp_path, s1, "--stages", "HISTEX", "--stage-args", f"HISTEX={options}")
        assert rc == 0
        return statuses(summary)[0]

    assert histex("--epochs 3 --n-states 2") == "ok"
    for same in ("--n-states 2 --epochs 3", "--epochs=3 --n-states=2", "--epochs 3 --n-states 2 --seed 0",
                 "--epoch 3 --n-states 2"):
        assert histex(same) == "skipped", same
    assert runs(s1) == ["HISTEX"]
    assert histex("--epochs 3 --n-states 2 --seed 1") == "ok" and histex("--n-states 2") == "ok"
    assert histex("") == "ok" and histex("--seed 0") == "skipped"    # the defaults, spelled out or not
    assert runs(s1) == ["HISTEX"] * 4

    record = s1 / "logs" / runner.OPTIONS_RECORD    # an option the script no longer takes: run once more
    rec = json.loads(record.read_text())
    rec["HISTEX"]["args"] = ["--no-such-option"]
    record.write_text(json.dumps(rec))
    assert histex("--seed 0") == "ok" and histex("") == "skipped"


def test_a_failed_section_is_reported_and_the_others_finish(tmp_path, fake_stages, capsys):
    s1, s2, s3 = make_sections(tmp_path / "data", "s1", "s2", "s3")
    (s2 / "fail-get_HR").touch()
    rc, summary = cohort(tmp_path, s1, s2, s3, "--jobs", "2")
    assert rc == 1
    assert statuses(summary) == ["ok", "failed", "ok"] and runs(s3) == ALL
    bad = summary["sections"][1]
    assert bad["failed_stage"] == "get_HR" and bad["exit_code"] == 3 and bad["stages_run"] == ["image_calibration"]
    assert bad["error"] == f"error: {s2}: fake failure of get_HR"
    assert runs(s2) == ["image_calibration", "get_HR"]          # stopped at its failing stage
    table = capsys.readouterr().out
    assert "failed" in table and "get_HR (exit 3): error:" in table and "1 failed" in table

    (s2 / "fail-get_HR").unlink()   # fixed: only the failed section's remaining stages run
    rc, summary = cohort(tmp_path, s1, s2, s3)
    assert rc == 0 and statuses(summary) == ["skipped", "ok", "skipped"]
    assert summary["sections"][1]["stages_run"] == ALL[1:]


def test_bad_arguments_are_one_error_line_with_exit_2(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for argv, fragment in ([[str(tmp_path / "nothing-*")], "matches no directory"],
                           [[str(tmp_path / "a-file")], "not a directory"],
                           [[str(tmp_path), "--stage-args", "HISTEX"], "STAGE=OPTIONS"],
                           [[str(tmp_path), "--stages", "train"], "not a stage"],
                           [[], "no section directories"]):
        r = subprocess.run([sys.executable, "-m", "utils.cohort", *argv], cwd=REPO, capture_output=True, text=True)
        assert_user_error(r, fragment)
    assert not (REPO / cli.DEFAULT_SUMMARY).exists()


def test_globs_list_files_and_duplicates(tmp_path, monkeypatch):
    a, b, c = make_sections(tmp_path / "data", "a", "b", "c")
    (tmp_path / "data" / "notes.txt").write_text("not a section")
    monkeypatch.chdir(tmp_path)
    assert collect_sections(["data/*"]) == [a, b, c]
    listing = tmp_path / "data" / "list.txt"
    listing.write_text("# two sections\n\nc\n" + str(a) + "\r\n./[ab]\n")   # relative to the file's folder
    got = collect_sections([str(b)], from_file=listing)
    assert got == [b, c, a]
    with pytest.raises(InputError, match="matches no directory"):
        collect_sections(["data/*.txt"])


def test_ranks_take_every_nth_section(tmp_path, fake_stages, monkeypatch):
    sections = [f"s{i}" for i in range(7)]
    torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert rank_share(sections, environ={"RANK": "1", "WORLD_SIZE": "3", **torchrun}) == (["s1", "s4"], 1, 3)
    assert rank_share(sections, environ={}) == (sections, 0, 1)
    for env in ({"RANK": "3", "WORLD_SIZE": "3"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(InputError):
            rank_share(sections, environ={**env, **torchrun})
    with pytest.raises(InputError, match="WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT are not"):
        rank_share(sections, environ={"RANK": "0", "WORLD_SIZE": "2"})   # a stray variable: half the work
    dirs = make_sections(tmp_path / "data", "s0", "s1", "s2")
    for k, v in torchrun.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = cli.main([str(d) for d in dirs] + ["--summary", str(tmp_path / "sum.json"), "-q"])
    part = json.loads((tmp_path / "sum.rank1.json").read_text())
    assert rc == 0 and part["rank"] == 1 and part["world_size"] == 2
    assert [s["section"] for s in part["sections"]] == [str(dirs[1])] and runs(dirs[0]) == []


def test_stage_environment_hides_the_launcher_and_shares_the_cpus():
    env = runner.stage_environment(jobs=1, environ={"RANK": "2", "WORLD_SIZE": "4", "MASTER_PORT": "29500",
                                                    "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                                    "CUDA_VISIBLE_DEVICES": "4,5", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "5"}
    assert "OMP_NUM_THREADS" in runner.stage_environment(jobs=2, environ={})
    assert runner.stage_environment(jobs=2, environ={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def test_error_line_prefers_the_last_error_line():
    assert runner.error_line("a\nerror: first\nerror: second\nprogress\n") == "error: second"
    assert runner.error_line("Traceback...\n  File x\nValueError: boom\n") == "ValueError: boom"
    assert runner.error_line("") == "(no output)"


def test_real_stages_on_a_tiny_section(tmp_path):
    """The five real scripts (interpolation model: no training) on a 30-spot section with a
    textured pink image, then a second run that finds everything current."""
    xy = hex_lattice(6, 5, 250.0, origin=(150.0, 150.0))
    h, w = int(xy[:, 1].max() + 300), int(xy[:, 0].max() + 300)
    noise = np.random.default_rng(0).integers(-40, 40, (h, w, 1))
    image = np.clip(np.array([200, 140, 190]) + noise, 0, 255).astype(np.uint8)
    d = write_raw_dir(tmp_path / "d", xy, image=image)
    args = ["--stage-args", "get_HR=--n-genes 10", "--stage-args", "HISTEX=--model interp"]
    rc, summary = cohort(tmp_path, d, *args)
    assert rc == 0, summary
    assert summary["sections"][0]["stages_run"] == ALL
    assert (d / "results" / "interp" / "super-res.h5ad").is_file()
    rc, summary = cohort(tmp_path, d, *args)
    assert rc == 0 and statuses(summary) == ["skipped"]


def test_a_literal_path_with_glob_characters_is_taken_as_written(tmp_path):
    odd, plain = make_sections(tmp_path, "sec[a]", "seca")
    assert collect_sections([str(odd)]) == [odd]
    assert collect_sections([str(tmp_path / "sec[ab]")]) == [plain]     # not a directory: a pattern
    (tmp_path / "L[1]").mkdir()
    inner, = make_sections(tmp_path / "L[1]", "x")
    make_sections(tmp_path / "L1", "y")
    listing = tmp_path / "L[1]" / "list.txt"
    listing.write_text("*\n")    # relative to the list's folder, whose name is not a pattern
    assert collect_sections([], from_file=listing) == [inner]
    listing.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="list.txt: lists no section"):
        collect_sections([], from_file=listing)


@pytest.mark.parametrize("stage_args, fragment", [
    ("HISTEX=--dir /elsewhere", "leave out --directory (/elsewhere)"),
    ("HISTEX=--dir=/elsewhere", "leave out --directory"),
    ("HISTEX=-d/elsewhere", "leave out --directory"),
    ("HISTEX=--epochs 0", "--stage-args HISTEX: argument --epochs"),
    ("HISTEX=--out {tmp}/shared", "--out"),
    ("HISTEX=--library-id one", "--library-id one would give all 2 sections one name"),
    ("Histology_Extractor=--login hf_secret", "export HF_TOKEN"),
    ("get_HR=--help", "python get_HR.py --help")])
def test_stage_options_are_checked_before_anything_runs(tmp_path, fake_stages, capsys, stage_args, fragment):
    s1, s2 = make_sections(tmp_path / "data", "s1", "s2")
    with pytest.raises(InputError, match=re.escape(fragment)) as e:
        cli.main([str(s1), str(s2), "--stage-args", stage_args.format(tmp=tmp_path),
                  "--summary", str(tmp_path / "sum.json")])
    assert "hf_secret" not in str(e.value) + capsys.readouterr().out
    assert runs(s1) == [] and not (s1 / "logs").exists() and not (tmp_path / "sum.json").exists()


def test_sections_whose_folders_share_a_name_get_their_own_library_ids(tmp_path, fake_stages):
    """p1/visium and p2/visium would both be 'visium' in uns['spatial'] (anndata.concat then drops
    their images): the cohort gives them HISTEX --library-id from the folder above; others keep theirs."""
    from utils.cohort.sections import library_ids
    a, b, c = make_sections(tmp_path / "data", "p1/visium", "p2/visium", "p3/other")
    assert library_ids([a, b, c]) == {a: "p1-visium", b: "p2-visium"}
    deep = make_sections(tmp_path / "x", "a/s/visium", "b/s/visium")
    assert list(library_ids(deep).values()) == ["a-s-visium", "b-s-visium"]
    rc, summary = cohort(tmp_path, a, b, c)
    assert rc == 0
    assert (a / "HISTEX.out").read_text().endswith("--library-id p1-visium")
    assert (b / "HISTEX.out").read_text().endswith("--library-id p2-visium")
    assert "--library-id" not in (c / "HISTEX.out").read_text() + (a / "get_HR.out").read_text()
    rc, summary = cohort(tmp_path, a, b, c)   # the per-section options are remembered: all current
    assert statuses(summary) == ["skipped"] * 3


def test_stages_list_and_summary_path_are_checked(tmp_path, fake_stages):
    s1, = make_sections(tmp_path / "data", "s1")
    with pytest.raises(InputError, match="names no stage"):
        cli.main([str(s1), "--stages", ","])
    counts = s1 / "cnts.tsv"
    counts.write_text("spot\tG1\n")
    with pytest.raises(InputError, match="is not a cohort summary"):
        cli.main([str(s1), "--summary", str(counts)])
    assert counts.read_text() == "spot\tG1\n" and runs(s1) == []
    rc, _ = cohort(tmp_path, s1)
    rc, _ = cohort(tmp_path, s1)    # its own summary is replaced
    assert rc == 0


def test_a_section_in_use_is_refused_without_touching_its_log(tmp_path, fake_stages):
    from utils.core.stage import DirectoryLock
    s1, = make_sections(tmp_path / "data", "s1")
    (s1 / "logs").mkdir()
    log = s1 / "logs" / "cohort-image_calibration.log"
    log.write_text("$ the run that holds the lock\n")
    lock = DirectoryLock(s1, "image_calibration").acquire()
    try:
        rc, summary = cohort(tmp_path, s1)
    finally:
        lock.release()
    assert rc == 1 and "in use by image_calibration" in summary["sections"][0]["error"]
    assert log.read_text() == "$ the run that holds the lock\n" and runs(s1) == []


# a stage that waits to be stopped: as the real ones, it ends with the cohort (end_with_launcher)
SLOW_STAGE = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + """
import time
from pathlib import Path
from utils.core.workers import end_with_launcher
d, stage = Path(sys.argv[1]), sys.argv[2]
(d / ("spawned-" + stage)).touch()
try:
    time.sleep(float(sys.argv[3]))   # the real stages import torch first
    end_with_launcher()
    (d / ("started-" + stage)).touch()
    time.sleep(120)
except KeyboardInterrupt:
    (d / ("interrupted-" + stage)).touch()
    sys.exit(130)
"""
SLOW_COHORT = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + """
from utils.cohort import cli, runner
runner.stage_command = lambda plan, d: [sys.executable, "-c", sys.argv[1], str(d), plan.stage, sys.argv[2]]
sys.exit(cli.main(sys.argv[3:]))
"""


def _wait_for(paths, seconds=60):
    t0 = time.monotonic()
    while not all(p.exists() for p in paths):
        assert time.monotonic() - t0 < seconds, f"waited {seconds} s for {paths}"
        time.sleep(0.1)


@pytest.mark.parametrize("jobs, sig, case", [(1, signal.SIGINT, ""), (2, signal.SIGINT, ""), (1, signal.SIGKILL, ""),
                                             (1, signal.SIGKILL, "early"), (1, signal.SIGKILL, "sigint-ignored")])
def test_stopping_the_cohort_stops_its_stages(tmp_path, jobs, sig, case):
    """SIGINT to the cohort alone (not its process group): each running stage gets one SIGINT, no
    further stage starts, exit 130 with one line. SIGKILL: the stages still stop (they are not left
    running as orphans that write into DIR later), also when the cohort dies while a stage still
    imports, and when the cohort was started with SIGINT ignored (`cmd &` in a script)."""
    sections = make_sections(tmp_path / "data", "s1", "s2")
    # SIGINT's disposition is inherited: set it either way, or a suite started in the background by a
    # script (which ignores SIGINT) would run every case as "sigint-ignored"
    disposition = signal.SIG_IGN if case == "sigint-ignored" else signal.SIG_DFL
    set_sigint = lambda: signal.signal(signal.SIGINT, disposition)  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COHORT, SLOW_STAGE, "2" if case == "early" else "0",
                             *map(str, sections), "-j", str(jobs), "--summary", str(tmp_path / "sum.json"), "-q"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, preexec_fn=set_sigint)
    marker = "spawned" if case == "early" else "started"
    _wait_for([d / f"{marker}-image_calibration" for d in sections[:jobs]])
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    _wait_for([d / "interrupted-image_calibration" for d in sections[:jobs]])
    assert not list(tmp_path.glob("data/*/started-get_HR"))
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().startswith("interrupted:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("remake", [False, True])
def test_a_section_deleted_while_the_cohort_runs_fails_alone(tmp_path, fake_stages, remake):
    """DIR deleted while its stage runs (and, as a real stage may, DIR/manifests made anew by it): that
    section fails with `no longer exists`, the cohort recreates nothing there, the others go on."""
    s1, s2 = make_sections(tmp_path / "data", "s1", "s2")
    (s1 / "vanish-get_HR").write_text("remake" if remake else "")
    rc, summary = cohort(tmp_path, s1, s2)
    assert rc == 1 and statuses(summary) == ["failed", "ok"] and runs(s2) == ALL
    bad = summary["sections"][0]
    assert bad["failed_stage"] == "get_HR" and bad["stages_run"] == ["image_calibration"]
    assert bad["error"].startswith(f"error: {s1}: the section directory no longer exists") and "put it back" in bad["error"]
    if remake:
        assert [p.name for p in s1.iterdir()] == ["manifests"]
    else:
        assert not s1.exists()


def test_a_section_gone_before_its_turn_is_reported_as_gone(tmp_path):
    result = runner.run_section(tmp_path / "gone", [runner.StagePlan("get_HR")])
    assert result.status == "failed" and result.exit_code == 2
    assert "the section directory no longer exists" in result.error and not (tmp_path / "gone").exists()


def test_a_full_disk_says_so_and_leaves_no_new_logs_folder(tmp_path, fake_stages, monkeypatch):
    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(runner, "open", full_disk, raising=False)   # the stage's log cannot be created
    s1, = make_sections(tmp_path / "data", "s1")
    rc, summary = cohort(tmp_path, s1)
    error = summary["sections"][0]["error"]
    assert rc == 1 and "cohort-image_calibration.log: the disk is full" in error and "free some space" in error
    assert "writable" not in error and runs(s1) == [] and not (s1 / "logs").exists()
    (s1 / "logs").mkdir()     # a logs/ folder of its own is kept
    rc, summary = cohort(tmp_path, s1)
    assert rc == 1 and list((s1 / "logs").iterdir()) == []
