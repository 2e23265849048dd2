"""python -m utils.cohort: skipping current stages, failures reported without stopping the others,
exit codes, glob and list-file expansion, torchrun rank shares; and manifest.out_of_date.

Most tests replace the stage scripts by a small `python -c` stage (FAKE_STAGE) that writes one
output and a real manifest, so they take seconds; one runs the real five stages on tiny data."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, assert_user_error, hex_lattice, write_raw_dir

from utils.cohort import cli, runner
from utils.cohort.sections import collect_sections, rank_share
from utils.core import manifest as mf
from utils.core.errors import InputError

# argv: DIR STAGE [options]; fails (exit 3, an `error:` line) when DIR/fail-STAGE exists
FAKE_STAGE = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + """
import json
from pathlib import Path
from utils.core.manifest import build_manifest, manifest_path
d, stage, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
with open(d / "runs.txt", "a") as f:
    f.write(stage + "\\n")
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
    assert rank_share(sections, environ={"RANK": "1", "WORLD_SIZE": "3"}) == (["s1", "s4"], 1, 3)
    assert rank_share(sections, environ={}) == (sections, 0, 1)
    for env in ({"RANK": "3", "WORLD_SIZE": "3"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(InputError):
            rank_share(sections, environ=env)
    dirs = make_sections(tmp_path / "data", "s0", "s1", "s2")
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
