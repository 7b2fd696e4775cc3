"""The work of one stage of an experiment, the same wherever it runs (in `igam run`'s own process, in a local
slot, in a SLURM job): train it if it is not done, evaluate it under the file's evaluation blocks, and what
is still to do (read from its run folder, never remembered)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from igam.errors import IgamError
from igam.evaluate import evaluate_run
from igam.experiment.spec import Experiment, Stage, resolve_stage, stage_status
from igam.files import read_json_object
from igam.records import result_key
from igam.runs import Run
from igam.train import train
from igam.utils import resolve_device


def row_stages(exp: Experiment, ev: dict[str, Any]) -> list[Stage]:
    """The stages an evaluation block evaluates: its `rows`, else every stage with a row or a curve."""
    rows = ev.get("rows")
    return [s for s in exp.stages if (s.name in rows if rows else (s.row or s.curve))]


def pending_attacks(exp: Experiment, st: Stage, ev: dict[str, Any]) -> list[str]:
    """The attacks of an evaluation block that the stage's eval.json does not hold yet (same n and seed)."""
    path = exp.out_dir / st.name / Run.EVAL
    have = read_json_object(path) if path.exists() else {}
    n, seed = int(ev.get("n", 1000)), int(ev.get("seed", 0))
    return [a for a in ev["attacks"] if not (isinstance(have.get(result_key(a)), dict)
                                             and have[result_key(a)].get("n") == n
                                             and have[result_key(a)].get("seed") == seed)]


def pending_checks(exp: Experiment, st: Stage, ev: dict[str, Any]) -> bool:
    """Whether an evaluation block with `checks: true` has yet to run the masking checks on the stage (its
    eval.json holds no check sweeps yet)."""
    path = exp.out_dir / st.name / Run.EVAL
    have = read_json_object(path) if path.exists() else {}
    return bool(ev.get("checks")) and "check:fgsm" not in json.dumps(have.get("masking_checks", {}))


def evaluations_of(exp: Experiment, st: Stage) -> list[dict[str, Any]]:
    """The evaluation blocks that evaluate this stage."""
    return [ev for ev in exp.evaluation if st in row_stages(exp, ev)]


def evaluation_pending(exp: Experiment, st: Stage, stale: bool = False) -> bool:
    """Whether any evaluation block still has work on this stage (all of it when `stale`: it is retrained)."""
    return any(stale or pending_attacks(exp, st, ev) or pending_checks(exp, st, ev)
               for ev in evaluations_of(exp, st))


def move_stale(exp: Experiment, st: Stage, log=print) -> Path:
    """Move a stage's run whose configuration changed aside, to NAME.stale-TIME, holding its lock meanwhile
    (so that no other process is inside it); returns where it went.

    Raises:
        LockHeld: another live process holds the folder (it is training or evaluating there).
    """
    run_dir = exp.out_dir / st.name
    lock = Run(run_dir).lock(log=lambda *a: None)
    try:
        moved = run_dir.with_name(f"{st.name}.stale-{int(time.time())}")
        run_dir.rename(moved)
    finally:
        lock.release()  # (the lock file moved with the folder)
    log(f"igam run: {st.name}: its config changed; the old run is kept as {moved.name}")
    return moved


def train_stage(exp: Experiment, st: Stage, log=print, threads: int | None = None,
                progress: bool | None = None) -> str:
    """Train the stage unless it is done (an interrupted run is resumed from its last checkpoint); returns
    'reused' or 'trained'. `threads`: torch threads when the stage sets none itself; `progress`: replaces the
    stage's progress setting (False in a job, whose output goes to a log file).

    Raises:
        IgamError: anything that stops the training (LockHeld when another process holds the folder), or a
            stage whose finished run has another configuration (`move_stale` it first).
    """
    status = stage_status(exp, st)
    if status == "done":
        return "reused"
    if status == "stale":
        raise IgamError(f"Stage '{st.name}' was finished meanwhile with another configuration; rerun the "
                        "same `igam run` command (it moves that run aside and trains this one).")
    cfg = resolve_stage(exp, st).replace(resume=status == "partial")
    if threads and not cfg.threads:
        cfg = cfg.replace(threads=threads)
    if progress is not None:
        cfg = cfg.replace(progress=progress)
    log(f"igam run: {st.name}: training ({cfg.method}, {cfg.model}, {cfg.dataset})")
    train(cfg, log=log)
    return "trained"


def evaluate_stage(exp: Experiment, st: Stage, log=print) -> None:
    """Evaluate the stage under every evaluation block that names it (results already in its eval.json are
    reused), on the stage's device, holding its run folder's lock (two evaluations never write one eval.json
    at once, and none runs while another process trains the stage).

    Raises:
        IgamError: an attack that fails, a model with non-finite outputs; LockHeld when another process holds
            the folder.
    """
    run_dir = exp.out_dir / st.name
    blocks = evaluations_of(exp, st)
    if not blocks or not (run_dir / Run.WEIGHTS).exists():
        return
    lock = Run(run_dir).lock(log=log)
    try:
        # on the stage's device (device=cuda, or auto with a GPU), not on evaluate_run's default CPU
        device = str(resolve_device(resolve_stage(exp, st).device))
        for ev in blocks:
            n, seed = int(ev.get("n", 1000)), int(ev.get("seed", 0))
            todo, checks = pending_attacks(exp, st, ev), pending_checks(exp, st, ev)
            # 'pgd10@eps=4/255' is pgd10 at another radius: evaluate each radius as one call
            groups: dict[str | None, list[str]] = {}
            for a in todo or (["clean"] if checks else []):
                base, _, eps = a.partition("@eps=")
                groups.setdefault(eps or None, []).append(base)
            for eps, attacks in groups.items():
                evaluate_run(run_dir, attacks, n=n, seed=seed, eps=eps, batch_size=ev.get("batch_size", 500),
                             checks=checks and eps is None, check_n=int(ev.get("check_n", min(n, 500))),
                             device=device, log=log)
    finally:
        lock.release()
