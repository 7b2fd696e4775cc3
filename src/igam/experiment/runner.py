"""`igam run`: the plan, training the stages that are not done, evaluating the rows, writing results."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

from igam.attacks.presets import column_name
from igam.errors import IgamError, suggest
from igam.experiment.cluster import ClusterOptions, check_executor, parse_jobs, usable_cores, visible_gpus
from igam.experiment.costs import estimate_eval_seconds, estimate_seconds, hms
from igam.experiment.executors import InlineExecutor, LocalExecutor, SlurmExecutor
from igam.experiment.frontier import frontier_markdown, frontier_results, plot_frontiers
from igam.experiment.results import collect_results, plot_tradeoff, results_markdown
from igam.experiment.scheduler import StagesFailed, build_tasks, format_schedule, run_tasks, summary
from igam.experiment.spec import (
    Experiment,
    Stage,
    load_experiment,
    references,
    resolve_stage,
    stage_status,
)
from igam.experiment.stages import evaluate_stage, pending_attacks, pending_checks, row_stages
from igam.experiment.status import Board
from igam.files import atomic_write_text, copy_file, write_json
from igam.objectives import trained_model_name
from igam.report import write_report
from igam.runs import Run


def plan(exp: Experiment) -> list[tuple[Stage, str, float, float]]:
    """(stage, status, estimated CPU seconds, estimated GPU seconds) for every stage."""
    out = []
    for s in exp.stages:
        cfg = resolve_stage(exp, s)
        out.append((s, stage_status(exp, s), estimate_seconds(cfg), estimate_seconds(cfg, gpu=True)))
    return out


def format_plan(exp: Experiment, only: list[str] | None = None) -> str:
    """The plan as a Markdown table with the estimated training and evaluation time left; stages outside
    `only` (when given, as `--only`) are listed as skipped and not counted."""
    lines = [
        f"experiment {exp.name} -> {exp.out_dir}",
        "",
        "| stage | method | model | dataset | epochs | status | est. 2-core CPU | est. 1 GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpu = gpu = 0.0
    rows = plan(exp)
    stale = {st.name for st, status, _, _ in rows if status == "stale"}  # retrained, so evaluated afresh
    rows = [(st, status if not only or st.name in only else "skipped (--only)", sec, gsec)
            for st, status, sec, gsec in rows]
    for st, status, sec, gsec in rows:
        cfg = resolve_stage(exp, st)
        if status in ("todo", "partial", "stale"):
            cpu, gpu = cpu + sec, gpu + gsec
        lines.append(
            f"| {st.name} | {cfg.method} | {trained_model_name(cfg) or cfg.model} | "
            f"{cfg.dataset} | {cfg.epochs:g} | {status} | {hms(sec)} | {hms(gsec)} |"
        )
    lines += [
        "",
        f"stages left: {sum(s in ('todo', 'partial', 'stale') for _, s, _, _ in rows)}; estimated training "
        f"time: {hms(cpu)} "
        f"on a 2-core CPU, {hms(gpu)} on one A100-class GPU (rough, plus evaluation; measured figures in "
        "docs/PERFORMANCE.md)",
    ]
    ecpu = egpu = 0.0
    for ev in exp.evaluation:
        stages = [st for st in row_stages(exp, ev) if not only or st.name in only]
        n = int(ev.get("n", 1000))
        pending = []
        for st in stages:
            todo = list(ev["attacks"]) if st.name in stale else pending_attacks(exp, st, ev)
            if todo:
                cfg = resolve_stage(exp, st)
                ecpu += estimate_eval_seconds(cfg, todo, n)
                egpu += estimate_eval_seconds(cfg, todo, n, gpu=True)
            if todo or pending_checks(exp, st, ev):
                pending.append(st.name)
        lines.append(
            f"evaluation: {', '.join(ev['attacks'])} on {n} test images, still to do for {len(pending)} of "
            f"{len(stages)} stages" + (f" ({', '.join(pending)})" if ev.get("rows") and pending else "")
        )
    if exp.evaluation:
        lines.append(f"estimated evaluation time left: {hms(ecpu)} on a 2-core CPU, {hms(egpu)} on one GPU "
                     "(rougher still: AutoAttack's time depends on how robust each model turns out)")
    return "\n".join(lines)


def check_only(exp: Experiment, only: list[str]) -> list[str]:
    """The stage names of `--only a,b`, stripped, checked against the experiment before anything runs.

    Raises:
        IgamError: no name at all, or a name that is not a stage (the closest one suggested).
    """
    names = [n.strip() for n in only if n.strip()]
    if not names:
        raise IgamError("--only names no stage; give stage names separated by commas, e.g. --only "
                        "teacher,teacher_ft (`igam run FILE --dry-run` lists the stages).")
    stages = {st.name: st for st in exp.stages}
    for n in names:
        if n not in stages:
            raise IgamError(f"--only: '{n}' is not a stage of {exp.name}.{suggest(n, stages)} `igam run "
                            "FILE --dry-run` lists the stages.")
    return names


def only_needs(exp: Experiment, names: list[str]) -> str:
    """'' when the stages `names` (of `--only`) can run; otherwise what one of them needs: an earlier stage
    it refers to (e.g. its teacher), directly or through another, that is neither done nor among them."""
    stages = {st.name: st for st in exp.stages}
    missing: dict[str, str] = {}  # a stage not done and not selected -> the selected stage that needs it
    todo = list(names)
    while todo:  # what the selected stages need, and what that needs in turn
        n = todo.pop()
        for ref in references(stages[n]):
            if ref not in names and ref not in missing and stage_status(exp, stages[ref]) != "done":
                missing[ref] = missing.get(n, n)
                todo.append(ref)
    if missing:
        ref, n = next(iter(missing.items()))
        need = [st.name for st in exp.stages if st.name in missing or st.name in names]
        return (f"--only: stage '{n}' needs stage '{ref}', which is neither done nor in --only. Add what it "
                f"needs (--only {','.join(need)}) or run that first.")
    return ""


# ---------------------------------------------------------------------------------------------
def run_experiment(
    path: str | Path,
    *,
    dry_run: bool = False,
    out_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    only: list[str] | None = None,
    miniature: bool = False,
    results_only: bool = False,
    jobs: int | str | None = 1,
    executor: str = "local",
    cluster: ClusterOptions | None = None,
    live: bool = False,
    log=print,
) -> Path:
    """Run every stage that is not done, evaluate the rows, write results.md/json and the report
    (results_only: only rebuild those from the evaluations already made).

    `jobs`: how many tasks (a stage's training, a stage's evaluation) run at once: 1 (default) in this
    process one after another; N or 'auto' (one per GPU, else 1) in local slots; with `executor='slurm'`
    each task is a SLURM job (`jobs` then caps how many are queued or running at once; None or 'auto': no
    cap), with `cluster` (the command line's settings) over the file's `cluster:` block. `live`: redraw a
    status table in place (a terminal). A stage that fails does not stop the stages that do not need it.

    Raises:
        IgamError: for bad input, before anything runs.
        StagesFailed: after the results are written, when stages failed or could not run (the message is
            the summary: which, why, and their logs).
    """
    executor = check_executor(executor)
    slots = parse_jobs(jobs, executor)
    exp = load_experiment(path, out_dir, overrides, miniature)
    needs = ""
    if only is not None:
        only = check_only(exp, only)
        needs = only_needs(exp, only)
        if needs and not dry_run and not results_only:
            raise IgamError(needs)
    if results_only:
        if not any((exp.out_dir / st.name / Run.META).exists() for st in exp.stages):
            raise IgamError(f"--results-only: no stage of {exp.name} has run in {exp.out_dir} yet, so "
                            f"there are no results to rebuild. Run `igam run {exp.source}` (with the same "
                            "--out-dir) first.")
        write_results(exp, log=log)
        return exp.out_dir
    runner = _executor(exp, executor, slots, cluster, log)
    log(format_plan(exp, only))
    if dry_run:
        if not isinstance(runner, InlineExecutor):
            note = "; plus the time jobs wait in the queue" if executor == "slurm" else (
                "" if runner.gpu else "; each stage counted as long as it takes alone on the machine, the "
                "best case: stages that share a CPU's cores each take longer")
            log(format_schedule(build_tasks(exp, only, gpu=runner.gpu), slots, runner.describe(), note))
        if needs:  # an estimate of chosen stages is still useful; that the run would stop is said loudly
            log(f"igam run: WARNING: without --dry-run this plan would stop before training: {needs}")
        return exp.out_dir
    if isinstance(runner, SlurmExecutor):
        runner.check()
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    copy_file(Path(exp.source), exp.out_dir / "experiment.yaml")
    tasks = build_tasks(exp, only, gpu=runner.gpu, log=log)
    reused = [st.name for st in exp.stages if (not only or st.name in only)
              and not any(t.name == st.name for t in tasks)]
    if tasks and not isinstance(runner, InlineExecutor):
        log(f"igam run: {len(tasks)} tasks on {runner.describe()}"
            + (f", {slots} at once" if slots else "") + "; each job's log is in its stage's jobs/ folder")
    board = Board(log, live=live and not isinstance(runner, InlineExecutor), slots=slots)
    with _sigterm_as_interrupt(not isinstance(runner, InlineExecutor)):
        run_tasks(exp, tasks, runner, board, log=log)
    board.close()
    write_results(exp, log=log)
    text, failed, blocked = summary(exp, tasks, reused)
    if tasks:
        log(text)
    if failed or blocked:
        raise StagesFailed(f"{failed} stage{'s' * (failed != 1)} failed and {blocked} could not run (see the "
                           "summary above); rerun the same command to retry them: finished stages and "
                           "evaluations are reused, interrupted ones resume from their last checkpoint.")
    return exp.out_dir


@contextlib.contextmanager
def _sigterm_as_interrupt(on: bool):
    """While `on`: SIGTERM to this process (`kill PID`) stops like Ctrl-C, so that the local slots are stopped
    and the SLURM jobs cancelled, not left running."""
    if not on or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _executor(exp: Experiment, executor: str, slots: int | None, cluster: ClusterOptions | None, log):
    """The executor of `--executor` / `--jobs` (igam.experiment.executors)."""
    if executor == "slurm":
        return SlurmExecutor(slots, exp.cluster.merged(cluster or ClusterOptions()))
    if slots == 1:
        return InlineExecutor(log)
    gpus = visible_gpus()
    return LocalExecutor(slots or 1, max(1, usable_cores() // (slots or 1)), gpus)


def evaluate_experiment(exp: Experiment, log=print, only: list[str] | None = None) -> dict[str, Any]:
    """Evaluate each row stage (of `only`, when given as `--only`) under each evaluation block (results
    already in eval.json are reused); results.md/json cover every stage evaluated so far."""
    for st in exp.stages:
        if not only or st.name in only:
            evaluate_stage(exp, st, log=log)
    return write_results(exp, log=log)


def write_results(exp: Experiment, log=print) -> dict[str, Any]:
    """results.json, results.md, tradeoff.png, the frontier pictures and report.html from the runs' eval.json
    files as they are."""
    results = collect_results(exp, log)
    try:
        frontier, frontier_md = frontier_results(exp, results), frontier_markdown(exp, results, column_name)
    except Exception as e:  # noqa: BLE001  (the ranking must never lose the results either)
        frontier, frontier_md = {}, ""
        log(f"igam run: frontier tables skipped ({type(e).__name__}: {e})")
    write_json(exp.out_dir / "results.json", {**results, "frontier": frontier})
    atomic_write_text(exp.out_dir / "results.md", results_markdown(exp, results, column_name) + frontier_md)
    try:
        plot_tradeoff(exp, results, exp.out_dir / "tradeoff.png")
    except Exception as e:  # a plot must never lose the results
        log(f"igam run: trade-off plot skipped ({e})")
    try:
        plot_frontiers(exp, results, exp.out_dir)
    except Exception as e:  # noqa: BLE001
        log(f"igam run: frontier plots skipped ({type(e).__name__}: {e})")
    try:
        write_report(exp.out_dir)
    except Exception as e:  # noqa: BLE001
        log(f"igam run: report skipped ({type(e).__name__}: {e})")
    log(f"igam run: results in {exp.out_dir / 'results.md'}")
    return results
