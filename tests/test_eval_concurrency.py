"""Issue 24, class 3: `igam evaluate` merges its records into RUN/eval.json as the file is at write time,
under the run's eval lock (RUN/.eval.lock), so two evaluations of one run never drop each other's records:
the `--checks` case of the issue (its long sweeps used to end with a rewrite from a copy read before them),
two real processes at once, and many writers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import copy_run

import igam
import igam.evaluate as ev
from igam.files import read_json
from igam.records import update_eval_json
from igam.runs import Run


def _records(run: Path) -> set[str]:
    return {k for k in read_json(run / Run.EVAL) if k != "masking_checks"}


def test_a_record_written_during_the_checks_sweeps_is_kept(tiny_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case, made deterministic: while `evaluate --attacks clean --checks` runs its sweeps,
    another evaluation writes `fgsm`; the checks' final write must keep it."""
    run = copy_run(tiny_run, tmp_path)
    real = ev.check_attacks
    other: list[dict] = []

    def meanwhile(*a, **k):
        if not other:  # the other process, between the first read of eval.json and the checks' final write
            other.append(ev.evaluate_run(run, ["fgsm"], n=16))
        return real(*a, **k)

    monkeypatch.setattr(ev, "check_attacks", meanwhile)
    res = ev.evaluate_run(run, ["clean"], n=16, checks=True, check_n=16, check_queries=20)
    assert other and "fgsm" in other[0]
    on_disk = read_json(run / Run.EVAL)
    assert _records(run) == {"clean", "fgsm"}
    assert on_disk["fgsm"]["accuracy"] == other[0]["fgsm"]["accuracy"]
    names = {o["name"] for o in on_disk["masking_checks"]["observations"]}
    assert "fgsm" in names and "check:fgsm" in names, "the verdicts are judged from the file as written"
    assert res["masking_checks"] == on_disk["masking_checks"]


def test_many_writers_at_once_lose_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    run = Run(run_dir)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(5):
                update_eval_json(run, lambda m, i=i, j=j: {**m, f"w{i}-{j}": {"accuracy": 0.5}})
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(read_json(run_dir / Run.EVAL)) == {f"w{i}-{j}" for i in range(8) for j in range(5)}


def test_a_writer_waits_for_the_lock_and_says_for_whom(tmp_path: Path) -> None:
    from igam.files import DirLock

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    held = DirLock(run_dir / Run.EVAL_LOCK)
    held.acquire("eval.json")
    said: list[str] = []
    t = threading.Timer(0.3, held.release)
    t.start()
    update_eval_json(Run(run_dir), lambda m: {**m, "x": {}}, log=said.append)
    t.join()
    assert read_json(run_dir / Run.EVAL) == {"x": {}}
    assert len(said) == 1 and f"pid {os.getpid()}" in said[0] and "eval.json" in said[0]


def test_two_evaluate_processes_at_once_keep_both_records(tiny_run: Path, tmp_path: Path) -> None:
    """Two real `igam evaluate` processes on one run, one with --checks (the issue's report): both
    records end in eval.json, whatever the interleaving."""
    run = copy_run(tiny_run, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(igam.__file__).parents[1])}  # the package under test
    cmds = [[sys.executable, "-m", "igam", "evaluate", str(run), "--attacks", "clean", "--n", "16",
             "--checks", "--check-n", "16", "--check-queries", "50"],
            [sys.executable, "-m", "igam", "evaluate", str(run), "--attacks", "fgsm,pgd5", "--n", "16"]]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
    assert _records(run) == {"clean", "fgsm", "pgd5"}
    names = {o["name"] for o in read_json(run / Run.EVAL)["masking_checks"]["observations"]}
    assert "check:fgsm" in names, "the --checks sweeps are kept by whichever process judged last"
