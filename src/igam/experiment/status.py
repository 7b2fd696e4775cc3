"""What `igam run` shows while its tasks run: on a terminal, one status table of the experiment redrawn in
place (stage, state, where it runs, elapsed, estimated time left from the --dry-run cost model) with the
events printed above it; otherwise (a log file, a pipe, `--jobs 1`) one plain line per event and a short
progress line every few minutes."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from igam.experiment.costs import hms
from igam.experiment.scheduler import (
    ACTIVE,
    BLOCKED,
    BUSY,
    DONE,
    FAILED,
    FINAL,
    QUEUED,
    READY,
    RUNNING,
    WAITING,
    Task,
    simulate,
)

HEARTBEAT_S = 300.0  # plain mode: a progress line this often while tasks run


def time_left(tasks: list[Task], slots: int | None, now: float | None = None) -> float:
    """Estimated seconds until every task still to do has run (the cost model's estimates, less what the
    running tasks have already spent; a task past its estimate counts as about to end)."""
    now = now or time.time()
    open_tasks = [t for t in tasks if t.state not in FINAL]
    running = {t: max(0.0, t.estimate - t.elapsed(now)) for t in open_tasks if t.state == RUNNING}
    wall, _ = simulate(open_tasks, slots, running=running)
    return wall


def counts(tasks: list[Task]) -> str:
    n = {s: sum(t.state == s for t in tasks) for s in (DONE, RUNNING, QUEUED, BUSY, FAILED, BLOCKED)}
    waiting = sum(t.state in (WAITING, READY) for t in tasks)
    parts = [f"{n[DONE]}/{len(tasks)} done", f"{n[RUNNING]} running"]
    parts += [f"{n[QUEUED]} queued"] * bool(n[QUEUED]) + [f"{waiting} waiting"] * bool(waiting)
    parts += [f"{n[BUSY]} held by another process"] * bool(n[BUSY])
    parts += [f"{n[FAILED]} failed"] * bool(n[FAILED]) + [f"{n[BLOCKED]} not run"] * bool(n[BLOCKED])
    return ", ".join(parts)


class Board:
    """The live view of a run of tasks. `live`: redraw a table in place on `stream` (a terminal); else
    every event is a line through `log`."""

    def __init__(self, log=print, live: bool = False, slots: int | None = None, stream: TextIO | None = None):
        self.log, self.live, self.slots = log, live, slots
        self.stream = stream or sys.stdout
        self.drawn = 0  # lines of the table now on screen
        self.last_draw = self.last_beat = time.time()
        self.tasks: list[Task] = []

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def event(self, task: Task, text: str) -> None:
        """Something happened to a task (started, ended, failed, ...): one line above the table."""
        line = f"igam run: {text}"
        if self.live:
            self._clear()
            self.stream.write(line + "\n")
            self._draw()
        else:
            self.log(line)

    def table(self, tasks: list[Task], now: float, width: int = 200, height: int = 40) -> list[str]:
        """The status table's lines: the tasks queued, running or held elsewhere, then a line of counts with
        the estimated time left."""
        shown = [t for t in tasks if t.state in (*ACTIVE, BUSY)]
        rows = [("stage", "state", "where", "elapsed", "est. left")]
        for t in sorted(shown, key=lambda t: (t.started or now, t.index))[: max(1, height - 4)]:
            left = max(0.0, t.estimate - t.elapsed(now)) if t.state == RUNNING else t.estimate
            rows.append((t.label, t.state if t.state != BUSY else "held elsewhere", t.where or t.message,
                         hms(t.elapsed(now)) if t.state == RUNNING else "-",
                         hms(left) if t.state != BUSY else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if len(shown) > len(rows) - 1:
            lines.append(f"... and {len(shown) - len(rows) + 1} more")
        lines.append(f"{counts(tasks)}; estimated time left {hms(time_left(tasks, self.slots, now))} "
                     "(cost model)")
        return [ln[:width] for ln in lines]

    def _draw(self) -> None:
        if not self.tasks:
            return
        size = shutil.get_terminal_size((120, 40))
        lines = self.table(self.tasks, time.time(), size.columns - 1, size.lines - 2)
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn = len(lines)
        self.last_draw = time.time()

    def refresh(self, tasks: list[Task]) -> None:
        """Called every turn of the scheduler: redraw (at most once a second), or in plain mode a progress
        line every few minutes."""
        self.tasks = tasks
        now = time.time()
        if self.live and now - self.last_draw >= 1.0:
            self._clear()
            self._draw()
        elif not self.live and now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            left = hms(time_left(tasks, self.slots, now))
            self.log(f"igam run: {counts(tasks)}; estimated time left {left} (cost model)")

    def close(self) -> None:
        """Take the table off the screen (the summary follows)."""
        if self.live:
            self._clear()
            self.stream.flush()
