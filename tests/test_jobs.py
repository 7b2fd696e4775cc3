"""`igam run --jobs N` and `--executor slurm`: the schedule, the options, the status board, and end-to-end
runs of a tiny experiment in local slots and on a real single-node SLURM cluster (scripts/slurm-local; skipped
with the reason when no SLURM answers, except under IGAM_REQUIRE_SLURM=1, which .ci/run sets): the same
weights as a serial run, a failing stage reported while its siblings finish, a stage killed (SIGKILL,
scancel) or stopped (Ctrl-C) and then resumed by the rerun of the same command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SLOWER

from igam.cli import main
from igam.errors import IgamError
from igam.experiment import StagesFailed, run_experiment
from igam.experiment.cluster import ClusterOptions, check_cluster, parse_jobs, parse_sbatch, parse_time
from igam.experiment.scheduler import DONE, EVAL, RUNNING, TRAIN, Task, critical_path, simulate
from igam.experiment.spec import Stage
from igam.experiment.status import Board

ROOT = Path(__file__).resolve().parents[1]
ANIMALS = ROOT / "experiments" / "cpu" / "animals-to-vehicles.yaml"
SETTINGS = ('defaults: {dataset: "synthetic:16x16x3:4", model: small-cnn, width: 4, train_subset: 256, '
            "test_subset: 64, batch_size: 32, epochs: 1, progress: false, tensorboard: false, eval_n: 32, "
            "log_every: 4, checkpoint_every: 4}\n")
# a, b independent; c needs a; `bad` fails (its data file does not exist) and `after_bad` needs it
TINY = ("experiment: tiny\n" + SETTINGS + """stages:
  - {name: a, row: A, config: {method: standard, seed: 0}}
  - {name: b, config: {method: standard, seed: 1}}
  - {name: c, config: {method: standard, seed: 2, init_from: "{a}"}}
  - {name: bad, config: {method: standard, dataset: "npz:/nonexistent/igam-test.npz"}}
  - {name: after_bad, config: {method: standard, init_from: "{bad}"}}
evaluation:
  - {attacks: [clean], n: 32, rows: [a]}
""")
# one stage of 16 steps with checkpoints every 4: long enough to be stopped in the middle
LONG = ("experiment: long\n" + SETTINGS
        + "stages:\n  - {name: long, config: {method: standard, seed: 3, epochs: 2}}\n")
GOOD = ("a", "b", "c")


def sha(run: Path) -> str:
    return hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[Path, str]:
    """TINY and LONG run the default way (`--jobs 1`: in this process, one stage after another), one torch
    thread per stage: the reference weights, and what TINY's run said."""
    tmp = tmp_path_factory.mktemp("serial")
    logs: list[str] = []
    with pytest.raises(StagesFailed, match="1 stage failed and 1 could not run") as e:
        run_experiment(write(tmp, "tiny.yaml", TINY), out_dir=str(tmp / "tiny"), overrides={"threads": 1},
                       log=logs.append)
    run_experiment(write(tmp, "long.yaml", LONG), out_dir=str(tmp / "long"), overrides={"threads": 1},
                   log=lambda *a: None)
    return tmp, "\n".join(logs) + "\n" + str(e.value)


def igam_run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igam", "run", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def start_run(*args: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    out = cwd / f"head-{time.time_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "igam", "run", *args], stdout=out.open("w"),
                            stderr=subprocess.STDOUT, cwd=cwd, env=env, text=True)
    return proc, out


def wait_for(what, timeout: float = 240.0, proc: subprocess.Popen | None = None):
    """Poll `what()` until it returns something true (returned); fail after `timeout` or if `proc` ends."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = what()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the igam run process ended (status {proc.returncode}) before the condition held")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def job_record(stage: Path, not_in: set[str] = frozenset()) -> dict | None:
    """The record of the newest job of a stage (JOB_igam.json) whose job id is not in `not_in`."""
    for path in sorted((stage / "jobs").glob("*_igam.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("job") not in not_in:
            return rec
    return None


def checkpoint(stage: Path, step: int) -> bool:
    return (stage / "checkpoints" / f"ckpt-{step:09d}.json").exists()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


# ---------------------------------------------------------------------------------------------
# options
def test_cluster_options_are_parsed_the_way_sbatch_reads_them() -> None:
    assert [parse_time(t) for t in ("90", "5:30", "4:00:00", "1-12", "1-0:30", "2-00:00:01")] == \
        [90, 6, 240, 2160, 1470, 2881]
    for bad in ("", "4h", "-1", "0", "1:2:3:4", True):
        with pytest.raises(IgamError, match="time"):
            parse_time(bad)
    assert parse_sbatch(["account=proj", "cpus_per_task=8", "exclusive", "mem = 16G"]) == {
        "account": "proj", "cpus-per-task": "8", "exclusive": True, "mem": "16G"}
    for bad, why in (("Bad Key=1", "not an sbatch option"), ("partition=x", "--partition"),
                     ("time=5", "--time"), ("output=f", "set by igam"), ("mem=", "no value")):
        with pytest.raises(IgamError, match=why):
            parse_sbatch([bad])
    opts = check_cluster({"partition": "gpu", "time": "8:00:00", "gpus_per_job": 1,
                          "sbatch": {"account": "proj"}}, "f.yaml")
    assert opts == ClusterOptions("gpu", 480, 1, {"account": "proj"})
    cli = ClusterOptions(partition="debug", sbatch={"qos": "high"})
    assert opts.merged(cli) == ClusterOptions("debug", 480, 1, {"account": "proj", "qos": "high"})
    with pytest.raises(IgamError, match="Did you mean 'partition'"):
        check_cluster({"partitoin": "gpu"}, "f.yaml")
    assert parse_jobs(None) == 1 and parse_jobs("3") == 3 and parse_jobs(None, "slurm") is None
    assert parse_jobs("auto", "slurm") is None and parse_jobs("auto") >= 1
    for bad in ("0", "two", "-2"):
        with pytest.raises(IgamError, match="--jobs"):
            parse_jobs(bad)


@pytest.mark.parametrize("args, needle", [
    (["--jobs", "0"], "--jobs='0' must be a number"),
    (["--executor", "pbs"], "choose local"),
    (["--partition", "gpu"], "add --executor slurm"),
    (["--executor", "slurm", "--time", "4h"], "not a SLURM time limit"),
    (["--executor", "slurm", "--sbatch", "partition=gpu"], "use --partition"),
    (["--executor", "slurm", "--gpus-per-job", "one"], "whole number of GPUs"),
])
def test_bad_run_options_are_one_clear_error_before_anything_runs(tmp_path, capsys, args, needle) -> None:
    path = write(tmp_path, "tiny.yaml", TINY)
    assert main(["run", str(path), "--out-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_bad_cluster_block_is_refused_by_the_dry_run(tmp_path, capsys) -> None:
    path = write(tmp_path, "tiny.yaml", TINY + "cluster: {partition: gpu, tme: '1:00:00'}\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "unknown key 'tme' in cluster. Did you mean 'time'?" in capsys.readouterr().err


def test_slurm_needs_sbatch_but_its_dry_run_does_not(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no squeue
    path = write(tmp_path, "tiny.yaml", TINY + "cluster: {partition: gpu, time: 30}\n")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out-dir", str(out), "--executor", "slurm", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "SLURM jobs: partition gpu, time limit 30 min" in text
    assert "all ready stages at once (no --jobs cap)" in text
    assert "plus the time jobs wait in the queue" in text
    assert main(["run", str(path), "--out-dir", str(out), "--executor", "slurm"]) == 2
    assert "no SLURM here (sbatch and squeue are not on PATH)" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the schedule
def _task(name: str, est: float, index: int, kind: str = TRAIN, deps: tuple[Task, ...] = ()) -> Task:
    t = Task(Stage(name, {}), kind, index, est, deps=list(deps))
    for d in deps:
        d.dependents.append(t)
    return t


def test_the_schedule_runs_the_longest_chain_first_and_adds_up() -> None:
    """teacher (10 s) -> ft (4 s) -> two students (6 s each); an independent student (5 s); evaluations (1 s).
    With two slots the chain teacher -> ft -> students must start first; the wall times follow from the
    estimates by hand."""
    alone = _task("alone", 5, 0)
    teacher = _task("teacher", 10, 1)
    ft = _task("ft", 4, 2, deps=(teacher,))
    s1, s2 = _task("s1", 6, 3, deps=(ft,)), _task("s2", 6, 4, deps=(ft,))
    e1 = _task("s1", 1, 3, EVAL, deps=(s1,))
    tasks = [alone, teacher, ft, s1, s2, e1]
    path = critical_path(tasks)
    assert path[teacher] == 10 + 4 + 6 + 1 and path[alone] == 5 and path[s2] == 6
    wall, plan = simulate(tasks, 2)
    start = {(t.name, t.kind): s for t, _, s, _ in plan}
    assert start[("teacher", TRAIN)] == 0 and start[("alone", TRAIN)] == 0
    # teacher 0-10 | alone 0-5; ft 10-14; s1, s2 14-20; e1 20-21
    assert wall == 21 and start[("s1", EVAL)] == 20
    assert simulate(tasks, 1)[0] == sum(t.estimate for t in tasks)
    assert simulate(tasks, None)[0] == 21  # the chain itself
    # a task already running for 3 s of its 10 leaves 7
    for t in tasks:
        t.deps = [d for d in t.deps]
    assert simulate([teacher, ft, s1, s2, e1], None, running={teacher: 7.0})[0] == 7 + 4 + 6 + 1


def test_dry_run_with_jobs_prints_each_slot_and_the_wall_time(tmp_path, capsys) -> None:
    assert main(["run", str(ANIMALS), "--dry-run", "--jobs", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "local slots of" in out and "2 at once" in out
    slot1 = re.search(r"^  slot 1: (.*)$", out, re.M).group(1).split(", ")
    slot2 = re.search(r"^  slot 2: (.*)$", out, re.M).group(1).split(", ")
    stages = re.findall(r"^\| (\S+) \| \S+ \| \S+ \| \S+ \| \S+ \| todo \|", out, re.M)
    from igam.experiment.spec import load_experiment

    assert len(stages) == len(load_experiment(ANIMALS).stages)
    assert sorted(n for n in slot1 + slot2 if "(eval)" not in n) == sorted(stages)
    m = re.search(r"estimated wall time: (\d+)h(\d+)m \(one after another: (\d+)h(\d+)m\); each stage", out)
    wall, serial = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    assert serial / 2 <= wall < serial


# ---------------------------------------------------------------------------------------------
# what the user sees
def test_the_board_shows_the_running_stages_and_redraws_in_place() -> None:
    a, b = _task("a", 100, 0), _task("b", 50, 1)
    wait = _task("c", 30, 2, deps=(a,))
    now = time.time()
    a.state, a.where, a.started = RUNNING, "slot 1, pid 11", now - 40
    b.state = DONE
    board = Board(live=False)
    lines = board.table([a, b, wait], now)
    assert lines[0].split() == ["stage", "state", "where", "elapsed", "est.", "left"]
    assert lines[1].startswith("a (training)") and "slot 1, pid 11" in lines[1]
    assert "0m40s" in lines[1] and "1m00s" in lines[1]  # 100 s estimated, 40 s spent
    assert lines[-1].startswith("1/3 done, 1 running, 1 waiting; estimated time left 1m30s")  # 60 s + c's 30
    screen = io.StringIO()
    live = Board(live=True, stream=screen)
    live.tasks = [a, b, wait]
    live.last_draw = 0
    live.refresh([a, b, wait])
    live.event(b, "b (training): done in 0m10s (slot 2)")
    text = screen.getvalue()
    assert text.count("a (training)") == 2  # drawn, then cleared ("\x1b[3F\x1b[J") and drawn again
    assert "\x1b[3F\x1b[J" in text and "igam run: b (training): done in 0m10s" in text
    logged: list[str] = []
    Board(log=logged.append).event(b, "b (training): done")
    assert logged == ["igam run: b (training): done"]


# ---------------------------------------------------------------------------------------------
# end to end: in this process (the default), in local slots, on SLURM
def test_serial_run_reports_a_failing_stage_and_finishes_the_others(serial) -> None:
    tmp, text = serial
    out = tmp / "tiny"
    m = re.search(r"bad \(training\): FAILED after \S+ \(here\): (.*); log: (\S+)", text)
    assert m and "igam-test.npz" in m[1]
    log = Path(m[2])
    assert log.parent == out / "bad" / "jobs" and f"igam: error: {m[1]}" in log.read_text()
    assert "after_bad (training): not run: needs bad (training), which failed" in text
    assert "| after_bad | not run | - |" in text and "| a | done | done | here |" in text
    for name in GOOD:
        assert (out / name / "model.safetensors").exists()
    assert json.loads((out / "a" / "eval.json").read_text())["clean"]["n"] == 32
    assert (out / "results.md").exists()  # the results are written all the same
    # the rerun tries the failed stage (and what needs it) again and reuses the rest
    logs: list[str] = []
    with pytest.raises(StagesFailed):
        run_experiment(tmp / "tiny.yaml", out_dir=str(out), overrides={"threads": 1}, log=logs.append)
    assert sum("done, reused" in line for line in logs) == 3
    assert [line for line in logs if re.match(r"igam run: \S+ \(training\): ", line)] == [
        next(line for line in logs if line.startswith("igam run: bad (training): FAILED")),
        "igam run: after_bad (training): not run: needs bad (training), which failed"]


def test_a_stage_held_by_another_process_waits_and_is_then_taken_up(tmp_path) -> None:
    """Another process holds a stage's run folder (here: this test, for a few seconds): `igam run` says so,
    runs what it can meanwhile, and takes the stage up when the folder is free."""
    import threading

    from igam.runs import Run

    path = write(tmp_path, "two.yaml", "experiment: two\n" + SETTINGS + "stages:\n"
                 "  - {name: held, config: {method: standard, seed: 0}}\n"
                 "  - {name: free, config: {method: standard, seed: 1}}\n")
    lock = Run(tmp_path / "out" / "held").lock()
    threading.Timer(3.0, lock.release).start()
    logs: list[str] = []
    run_experiment(path, out_dir=str(tmp_path / "out"), log=logs.append)
    text = "\n".join(logs)
    assert f"held (training): waiting: its folder is in use by pid {os.getpid()}" in text
    assert text.index("free (training): done") < text.index("held: training")
    assert (tmp_path / "out" / "held" / "model.safetensors").exists()


def _check_tiny(r: subprocess.CompletedProcess, out: Path, serial: tuple[Path, str]) -> str:
    """What every executor must give on TINY: exit status 1, `bad` reported with its log, `after_bad` not
    run, the others done with the serial run's weights, no pickle left behind."""
    text = r.stdout + r.stderr
    assert r.returncode == 1, text
    assert "1 stage failed and 1 could not run" in r.stderr
    m = re.search(r"bad \(training\): FAILED after \S+ \(([^)]*)\): (.*); log: (\S+)", text)
    assert m and "igam-test.npz" in m[2], text
    log = Path(m[3])
    assert log.parent == out / "bad" / "jobs" and "igam: error:" in log.read_text()
    assert "after_bad (training): not run" in text
    for name in GOOD:
        assert sha(out / name) == sha(serial[0] / "tiny" / name), name
    assert (out / "a" / "eval.json").exists() and (out / "results.md").exists()
    assert not list(out.glob("*/jobs/*.pkl"))
    return text


def test_local_slots_give_the_serial_weights_and_isolate_a_failure(tmp_path, serial) -> None:
    path = write(tmp_path, "tiny.yaml", TINY)
    out = tmp_path / "out"
    r = igam_run(str(path), "--out-dir", str(out), "--jobs", "2", "threads=1", cwd=tmp_path)
    text = _check_tiny(r, out, serial)
    assert re.search(r"a \(training\): done in \S+ \(slot [12], pid \d+\)", text)
    record = job_record(out / "a")
    assert record["threads"] == 1 and record["outcome"] == "ok"


@pytest.mark.slow
def test_a_killed_slot_and_ctrl_c_leave_a_run_that_the_rerun_finishes(tmp_path, serial) -> None:
    """A local slot's process killed (SIGKILL) in the middle of a stage: reported with its log, exit 1. The
    rerun resumes from the stage's checkpoint; Ctrl-C (SIGINT to `igam run`) then stops the slot and says
    which; a third run finishes with the weights of an uninterrupted serial run."""
    path = write(tmp_path, "long.yaml", LONG)
    out, stage = tmp_path / "out", tmp_path / "out" / "long"
    args = (str(path), "--out-dir", str(out), "--jobs", "2", "threads=1")
    env = {**os.environ, "IGAM_TEST_KILL_AT": "step:6:hang"}  # stops at step 6, after the step-4 checkpoint
    proc, log = start_run(*args, cwd=tmp_path, env=env)
    rec = wait_for(lambda: checkpoint(stage, 4) and job_record(stage), proc=proc)
    os.kill(rec["pid"], signal.SIGKILL)
    assert proc.wait(timeout=120 * SLOWER) == 1
    text = log.read_text()
    assert "long (training): FAILED" in text and "its process ended without finishing (killed" in text
    assert f"log: {stage / 'jobs' / (rec['job'] + '_0_log.out')}" in text

    env["IGAM_TEST_KILL_AT"] = "step:10:hang"  # resumed at step 4: stops at step 14, after the step-12 one
    proc, log = start_run(*args, cwd=tmp_path, env=env)
    rec2 = wait_for(lambda: checkpoint(stage, 12) and job_record(stage, {rec["job"]}), proc=proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120 * SLOWER) == 130
    text = log.read_text()
    assert re.search(r"stopped 1 local slot: long \(training\) \[slot 1, pid \d+\]", text), text
    assert "rerun the same command" in text
    wait_for(lambda: not alive(rec2["pid"]), timeout=30 * SLOWER)
    assert "resumed" in (stage / "jobs" / f"{rec2['job']}_0_log.out").read_text()

    r = igam_run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha(stage) == sha(serial[0] / "long" / "long")


# ---------------------------------------------------------------------------------------------
def _slurm() -> str:
    """'' when a SLURM cluster answers (sinfo shows a partition up), else why not."""
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no SLURM here ({e}); scripts/slurm-local start sets up a single-node cluster (as root)"
    if r.returncode != 0 or "up" not in r.stdout:
        said = r.stderr.strip() or r.stdout.strip() or "no partition up"
        return (f"no SLURM cluster answers (sinfo: {said}); scripts/slurm-local start sets up a single-node "
                "cluster (as root)")
    return ""


@pytest.fixture(scope="module")
def slurm() -> None:
    why = _slurm()
    if why:
        if os.environ.get("IGAM_REQUIRE_SLURM") == "1":
            pytest.fail(f"IGAM_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)


def test_slurm_jobs_give_the_serial_weights_and_isolate_a_failure(tmp_path, serial, slurm) -> None:
    path = write(tmp_path, "tiny.yaml", TINY)
    out = tmp_path / "out"
    r = igam_run(str(path), "--out-dir", str(out), "--executor", "slurm", "threads=1", cwd=tmp_path)
    text = _check_tiny(r, out, serial)
    assert re.search(r"a \(training\): done in \S+ \(job \d+ on \S+\)", text), text
    scripts = "".join(p.read_text() for p in (out / "a" / "jobs").glob("*_submission.sh"))
    assert "#SBATCH --job-name=igam-train-a" in scripts and "#SBATCH --job-name=igam-eval-a" in scripts
    assert "--time" not in scripts  # no --time given: the partition's limit, not submitit's 5 minutes


@pytest.mark.slow
def test_scancel_and_ctrl_c_on_slurm_leave_a_run_that_the_rerun_finishes(tmp_path, serial, slurm) -> None:
    """A stage's job cancelled with scancel in the middle: reported (cancelled, with its log), exit 1; the
    rerun resumes from the checkpoint; Ctrl-C on `igam run` then cancels its job and names it; a third run
    finishes with the weights of an uninterrupted serial run."""
    path = write(tmp_path, "long.yaml", LONG)
    out, stage = tmp_path / "out", tmp_path / "out" / "long"
    args = (str(path), "--out-dir", str(out), "--executor", "slurm", "threads=1")
    env = {**os.environ, "IGAM_TEST_KILL_AT": "step:6:hang"}
    proc, log = start_run(*args, cwd=tmp_path, env=env)
    rec = wait_for(lambda: checkpoint(stage, 4) and job_record(stage), proc=proc)
    subprocess.run(["scancel", rec["job"]], check=True, timeout=60)
    assert proc.wait(timeout=180) == 1
    text = log.read_text()
    assert f"SLURM job {rec['job']} was cancelled (scancel)" in text, text
    assert f"log: {stage / 'jobs' / (rec['job'] + '_0_log.out')}" in text

    env["IGAM_TEST_KILL_AT"] = "step:10:hang"
    proc, log = start_run(*args, cwd=tmp_path, env=env)
    rec2 = wait_for(lambda: checkpoint(stage, 12) and job_record(stage, {rec["job"]}), proc=proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120 * SLOWER) == 130
    text = log.read_text()
    assert f"cancelled SLURM jobs {rec2['job']} (long (training))" in text, text

    def gone() -> bool:
        q = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T", "-j", rec2["job"]], capture_output=True,
                           text=True, timeout=60)
        return q.stdout.strip() in ("", "CANCELLED", "COMPLETED", "FAILED")
    wait_for(gone, timeout=60)

    r = igam_run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha(stage) == sha(serial[0] / "long" / "long")
    last = job_record(stage, {rec["job"], rec2["job"]})
    assert "resumed" in (stage / "jobs" / f"{last['job']}_0_log.out").read_text()
