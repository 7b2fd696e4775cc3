"""`igam run`'s scheduler: an experiment as a graph of tasks (train a stage, evaluate a stage), run as their
inputs become ready, up to as many at once as the executor has slots (igam.experiment.executors), with the
estimated wall time of that schedule for `--dry-run --jobs N`.

A stage's training needs the training of the stages it refers to ("{teacher}"); its evaluation needs its own
training only, so it runs as soon as that is done, in a slot like any training. A task that fails stops only
the tasks that need it; one whose run folder another process holds (another `igam run`, a job of an earlier
one) waits until that process lets go and is then reused or taken up. What is done is always read from the
run folders (a training is done when its meta.json says finished with the same configuration), never from
an exit code.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

from igam.errors import IgamError
from igam.experiment.costs import estimate_eval_seconds, estimate_seconds, hms
from igam.experiment.spec import Experiment, Stage, references, resolve_stage, stage_status
from igam.experiment.stages import (
    evaluate_stage,
    evaluation_pending,
    evaluations_of,
    move_stale,
    pending_attacks,
    train_stage,
)
from igam.files import LockHeld
from igam.runs import Run

TRAIN, EVAL = "train", "eval"
# task states: waiting for inputs, ready, busy (another process holds its run folder), queued (submitted,
# not started: SLURM's PENDING), running, done, failed, blocked (needs a task that failed), stopped (Ctrl-C)
WAITING, READY, BUSY, QUEUED, RUNNING = "waiting", "ready", "busy", "queued", "running"
DONE, FAILED, BLOCKED, STOPPED = "done", "failed", "blocked", "stopped"
ACTIVE = (QUEUED, RUNNING)
FINAL = (DONE, FAILED, BLOCKED, STOPPED)


@dataclass(eq=False)
class Task:
    """One unit of work: train or evaluate one stage. `estimate`: seconds, from the --dry-run cost model."""

    stage: Stage
    kind: str
    index: int
    estimate: float
    deps: list[Task] = field(default_factory=list)
    dependents: list[Task] = field(default_factory=list)
    state: str = WAITING
    where: str = ""
    started: float | None = None
    ended: float | None = None
    message: str = ""
    log_path: str = ""
    job: Any = None
    slot: int | None = None

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def label(self) -> str:
        return f"{self.stage.name} ({'training' if self.kind == TRAIN else 'evaluation'})"

    def elapsed(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or now or time.time()) - self.started


class StagesFailed(IgamError):
    """Some stages failed or could not run (`igam run` exits with status 1); the message says which."""


def eval_estimate(exp: Experiment, st: Stage, gpu: bool, everything: bool) -> float:
    """Estimated seconds of the stage's evaluation still to do (all of it when `everything`: it is
    (re)trained first)."""
    cfg = resolve_stage(exp, st)
    total = 0.0
    for ev in evaluations_of(exp, st):
        todo = list(ev["attacks"]) if everything else pending_attacks(exp, st, ev)
        if todo:
            total += estimate_eval_seconds(cfg, todo, int(ev.get("n", 1000)), gpu=gpu)
    return total


def build_tasks(exp: Experiment, only: list[str] | None = None, gpu: bool = False,
                log=None) -> list[Task]:
    """The tasks still to do for the stages of `only` (all when None), in file order, with their
    dependencies and cost-model estimates (`gpu`: one GPU per task, else a 2-core CPU). Stages that are done
    are reused (`log` says so) and appear only with their evaluation, when some is still to do."""
    tasks: list[Task] = []
    training: dict[str, Task] = {}
    for i, st in enumerate(exp.stages):
        if only and st.name not in only:
            continue
        status = stage_status(exp, st)
        if status == "done":
            if log is not None:
                log(f"igam run: {st.name}: done, reused")
        else:
            t = Task(st, TRAIN, i, estimate_seconds(resolve_stage(exp, st), gpu=gpu))
            t.deps = [training[r] for r in references(st) if r in training]
            training[st.name] = t
            tasks.append(t)
        retrain = status != "done"
        if evaluations_of(exp, st) and (retrain or evaluation_pending(exp, st)):
            e = Task(st, EVAL, i, eval_estimate(exp, st, gpu, everything=retrain))
            e.deps = [training[st.name]] if st.name in training else []
            tasks.append(e)
    for t in tasks:
        for d in t.deps:
            d.dependents.append(t)
    return tasks


def critical_path(tasks: list[Task]) -> dict[Task, float]:
    """For each task, the estimated seconds from its start to the end of the longest chain of tasks that need
    it (itself included): the classic priority of list scheduling (longest path first)."""
    memo: dict[Task, float] = {}

    def length(t: Task) -> float:
        if t not in memo:
            memo[t] = t.estimate + max((length(d) for d in t.dependents), default=0.0)
        return memo[t]

    for t in tasks:
        length(t)
    return memo


def priority(tasks: list[Task], slots: int | None):
    """The order in which ready tasks take free slots: trainings before evaluations (others wait for
    trainings, nothing waits for an evaluation), then, with several slots, the longest chain first, then file
    order (with one slot: file order, as `igam run` always did)."""
    path = critical_path(tasks) if slots != 1 else {}
    return lambda t: (t.kind == EVAL, -path.get(t, 0.0), t.index)


def simulate(tasks: list[Task], slots: int | None, durations: dict[Task, float] | None = None,
             running: dict[Task, float] | None = None) -> tuple[float, list[tuple[Task, int, float, float]]]:
    """The schedule `run_tasks` would follow if every task took its estimate (or `durations`): returns the
    wall time and (task, slot, start, end) per task. `slots` None: no cap. `running`: tasks already in a slot,
    with the seconds they have left. Tasks that are done (or failed) and tasks outside `tasks` count as
    finished."""
    durations = durations or {t: t.estimate for t in tasks}
    running = dict(running or {})
    todo = [t for t in tasks if t not in running and t.state not in FINAL]
    key = priority(tasks, slots)
    unfinished = set(todo) | set(running)
    done: set[Task] = set()
    free = list(range(slots)) if slots else []
    events: list[tuple[float, Task, int]] = []  # (end, task, slot)
    plan: list[tuple[Task, int, float, float]] = []
    n = 0
    for t, left in running.items():
        slot = free.pop(0) if slots and free else n
        n += 1
        events.append((left, t, slot))
        plan.append((t, slot, 0.0, left))
    now = 0.0
    while todo or events:
        ready = sorted((t for t in todo if all(d in done or d not in unfinished for d in t.deps)), key=key)
        for t in ready:
            if slots and not free:
                break
            slot = free.pop(0) if slots else n
            n += 1
            end = now + durations.get(t, t.estimate)
            events.append((end, t, slot))
            plan.append((t, slot, now, end))
            todo.remove(t)
        if not events:  # what is left waits for tasks outside this list: nothing more can start
            break
        events.sort(key=lambda e: e[0])
        now, t, slot = events.pop(0)
        done.add(t)
        if slots:
            free.append(slot)
            free.sort()
    return now, plan


def format_schedule(tasks: list[Task], slots: int | None, where: str, serial_note: str = "") -> str:
    """`--dry-run --jobs N`: which slot runs what, and the estimated wall time."""
    wall, plan = simulate(tasks, slots)
    serial = sum(t.estimate for t in tasks)
    cap = f"{slots} at once" if slots else "all ready stages at once (no --jobs cap)"
    lines = [f"schedule: {len(tasks)} tasks ({sum(t.kind == TRAIN for t in tasks)} trainings, "
             f"{sum(t.kind == EVAL for t in tasks)} evaluations), {cap}, {where}:"]
    if slots:
        for s in range(slots):
            mine = [f"{t.name}{'' if t.kind == TRAIN else ' (eval)'}" for t, sl, _, _ in plan if sl == s]
            lines.append(f"  slot {s + 1}: {', '.join(mine) or '-'}")
    lines.append(f"estimated wall time: {hms(wall)} (one after another: {hms(serial)}){serial_note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
class Executor(Protocol):
    """Where tasks run (igam.experiment.executors): slots, submitting, watching, cancelling."""

    slots: int | None
    poll_s: float

    def free_slot(self) -> int | None: ...
    def submit(self, exp: Experiment, task: Task, slot: int) -> None: ...
    def poll(self, tasks: list[Task]) -> dict[Task, str]: ...
    def finish(self, task: Task) -> dict[str, Any]: ...
    def cancel(self, tasks: list[Task]) -> list[str]: ...


def run_task(exp: Experiment, task: Task, log=print, threads: int | None = None,
             progress: bool | None = None) -> dict[str, Any]:
    """Do one task here, in this process: {'outcome': 'ok'} or {'outcome': 'failed' | 'busy', 'error': why}.
    A failure's message (a bug's traceback) goes to `log` too; Ctrl-C (KeyboardInterrupt) is not caught."""
    try:
        if task.kind == TRAIN:
            train_stage(exp, task.stage, log=log, threads=threads, progress=progress)
        else:
            evaluate_stage(exp, task.stage, log=log)
    except LockHeld as e:
        return {"outcome": "busy", "error": str(e), "holder": e.holder}
    except IgamError as e:
        log(f"igam: error: {e}")
        return {"outcome": "failed", "error": str(e)}
    except Exception as e:  # noqa: BLE001  (a bug in one stage must not stop the others; its traceback is kept)
        log(traceback.format_exc().rstrip())
        return {"outcome": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"outcome": "ok"}


def _block(task: Task, board) -> None:
    """Mark every task that needs `task` (directly or not) as not run."""
    for d in task.dependents:
        if d.state not in FINAL:
            d.state, d.message = BLOCKED, f"needs {task.label}, which failed"
            board.event(d, f"{d.label}: not run: {d.message}")
            _block(d, board)


def _start(exp: Experiment, task: Task, executor: Executor, board, log) -> bool:
    """Check the run folder from here, then hand the task to the executor; False when it cannot start now
    (another process holds the folder: the task is busy and is looked at again later)."""
    st = task.stage
    holder = Run(exp.out_dir / st.name).holder()
    if holder is None and task.kind == TRAIN:
        status = stage_status(exp, st)
        if status == "done":  # finished meanwhile by another process
            task.state, task.message = DONE, "finished by another process; reused"
            board.event(task, f"{task.label}: {task.message}")
            return True
        if status == "stale":
            try:
                move_stale(exp, st, log=lambda s: board.event(task, s))
            except LockHeld as e:
                holder = e.holder
    elif holder is None and not evaluation_pending(exp, st):
        task.state, task.message = DONE, "evaluated by another process; reused"
        board.event(task, f"{task.label}: {task.message}")
        return True
    if holder is not None:
        if task.state != BUSY:
            board.event(task, f"{task.label}: waiting: its folder is in use by {holder}")
        task.state, task.message = BUSY, f"in use by {holder}"
        return False
    slot = executor.free_slot()
    assert slot is not None
    task.slot, task.started, task.ended, task.message = slot, time.time(), None, ""
    executor.submit(exp, task, slot)
    return True


def _finish(exp: Experiment, task: Task, executor: Executor, board) -> None:
    """A task's job has ended: read what it did from the run folder (and the job's own record)."""
    out = executor.finish(task)
    task.ended = task.ended or time.time()
    if out.get("outcome") == "busy":
        holder = out.get("holder", "another process")
        task.state, task.message, task.started = BUSY, f"in use by {holder}", None
        board.event(task, f"{task.label}: waiting: its folder is in use by {out.get('holder')}")
        return
    ok = stage_status(exp, task.stage) == "done" if task.kind == TRAIN else out.get("outcome") == "ok"
    if ok:
        task.state = DONE
        board.event(task, f"{task.label}: done in {hms(task.elapsed())} ({task.where})")
        return
    task.state = FAILED
    task.message = out.get("error") or "it ended without finishing"
    log = f"; log: {task.log_path}" if task.log_path else ""
    board.event(task, f"{task.label}: FAILED after {hms(task.elapsed())} ({task.where}): {task.message}{log}")
    _block(task, board)


def run_tasks(exp: Experiment, tasks: list[Task], executor: Executor, board, log=print) -> None:
    """Run the tasks as their inputs become ready, at most `executor.slots` at once. Returns when every task
    is done, failed or blocked. Ctrl-C (KeyboardInterrupt) stops or cancels the running tasks, says which,
    and is raised again."""
    key = priority(tasks, executor.slots)
    last_busy_check = 0.0
    try:
        while True:
            now = time.time()
            for t in tasks:
                if t.state == WAITING and all(d.state == DONE for d in t.deps):
                    t.state = READY
            if now - last_busy_check >= executor.poll_s:  # folders held by other processes: free yet?
                last_busy_check = now
                for t in tasks:
                    if t.state == BUSY and Run(exp.out_dir / t.name).holder() is None:
                        t.state = READY
            for t in sorted((t for t in tasks if t.state == READY), key=key):
                if executor.free_slot() is None:
                    break
                _start(exp, t, executor, board, log)
            active = [t for t in tasks if t.state in ACTIVE]
            for t, state in executor.poll(active).items():
                if state == "ended":
                    _finish(exp, t, executor, board)
                elif state != t.state:
                    if state == RUNNING and t.state == QUEUED:
                        t.started = time.time()  # the queue wait is not the stage's time
                    t.state = state
                    board.event(t, f"{t.label}: {'running' if state == RUNNING else state} ({t.where})")
            if all(t.state in FINAL for t in tasks):
                return
            board.refresh(tasks)
            if not any(t.state == READY for t in tasks) or executor.free_slot() is None:
                time.sleep(min(executor.poll_s, 0.5))
    except KeyboardInterrupt:
        active = [t for t in tasks if t.state in ACTIVE]
        stopped = executor.cancel(active) if active else []
        for t in active:
            t.state, t.message = STOPPED, "stopped by Ctrl-C"
        board.close()
        if stopped:
            log("igam run: interrupted: " + "; ".join(stopped))
        raise


def summary(exp: Experiment, tasks: list[Task], reused: list[str]) -> tuple[str, int, int]:
    """The final summary table (one row per stage that had something to do), and how many stages failed and
    how many could not run."""
    by_stage: dict[str, dict[str, Task]] = {}
    for t in tasks:
        by_stage.setdefault(t.name, {})[t.kind] = t

    def cell(t: Task | None) -> str:
        if t is None:
            return "-"
        return {DONE: "done", FAILED: "FAILED", BLOCKED: "not run", STOPPED: "stopped", BUSY: "busy"}.get(
            t.state, t.state)

    lines = ["| stage | training | evaluation | where | time |", "|---|---|---|---|---|"]
    failed, blocked = [], []
    for st in exp.stages:
        kinds = by_stage.get(st.name)
        if not kinds:
            continue
        tr, ev = kinds.get(TRAIN), kinds.get(EVAL)
        where = ", ".join(dict.fromkeys(t.where for t in (tr, ev) if t is not None and t.where))
        spent = sum(t.elapsed() for t in (tr, ev) if t is not None and t.started is not None)
        lines.append(f"| {st.name} | {cell(tr) if tr else 'reused'} | {cell(ev)} | {where or '-'} | "
                     f"{hms(spent) if spent else '-'} |")
        states = {t.state for t in (tr, ev) if t is not None}
        if FAILED in states:
            failed.append(st.name)
        elif states & {BLOCKED, STOPPED, BUSY}:
            blocked.append(st.name)
    notes = [f"- {t.label}: {t.message}" + (f" (log: {t.log_path})" if t.log_path else "")
             for t in tasks if t.state == FAILED]
    head = (f"igam run: {len(by_stage)} stages had work: {len(by_stage) - len(failed) - len(blocked)} done, "
            f"{len(failed)} failed, {len(blocked)} not run" + (f"; {len(reused)} reused as they were"
                                                               if reused else ""))
    return "\n".join([head, *lines, *(["", "failed:", *notes] if notes else [])]), len(failed), len(blocked)
