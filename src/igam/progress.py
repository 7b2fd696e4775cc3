"""Progress bars on stderr (tqdm) for long work: every attack, every AutoAttack component and every check
sweep, with an ETA.

An attack's bar counts the model's forward passes (a forward hook on the model while it runs), against an
upper bound of the passes it can need (`Attack.passes_per_batch`), so a PGD-100x5 or AutoAttack's Square
that runs for minutes shows where it is and how long is left. Spans (`Progress.span`) give each batch and
each AutoAttack component its share of the bar: when a part ends early (every image already broken) the
bar jumps to the end of its share, so the ETA of what follows stays honest.

Bars are on unless switched off for a block (`enabled(False)`: `igam evaluate --no-progress`,
`progress=False` in the Python API). Off a terminal (a log file) a bar redraws at most every 30 s.

    with progress.enabled(False):
        ...                                        # no bars in here
    with progress.bar(total, "pgd20") as prog, progress.counting(model, prog):
        ...                                        # every forward of `model` ticks the bar
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch.nn as nn

__all__ = ["Progress", "bar", "counting", "current", "enabled", "is_on", "write"]

_ON: ContextVar[bool] = ContextVar("igam_progress_on", default=True)
_CURRENT: ContextVar[Progress | None] = ContextVar("igam_progress_current", default=None)


@contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Switch the bars on or off for the block (nested blocks restore the outer setting)."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def is_on() -> bool:
    """Whether bars are shown here (see `enabled`)."""
    return _ON.get()


def write(line: str) -> None:
    """Print a line on stderr without tearing an open bar (tqdm.write)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


class Progress:
    """One bar of `total` units (e.g. forward passes) with nested spans and a status text; a bar that is
    switched off (`enabled(False)`) is a no-op with the same methods."""

    def __init__(self, total: int, desc: str, unit: str = "pass", show: bool = True):
        self.total = max(0, int(total))
        self.n = 0
        self._limits = [self.total]
        self._status: dict[str, str] = {}
        self._bar: Any = None
        if show:
            from tqdm import tqdm

            tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True, mininterval=1.0 if tty else 30.0, smoothing=0.05)

    def tick(self, k: int = 1) -> None:
        """Count k units, never past the end of the innermost span."""
        room = self._limits[-1] - self.n
        step = min(int(k), room)
        if step > 0:
            self.n += step
            if self._bar is not None:
                self._bar.update(step)

    @contextmanager
    def span(self, k: int) -> Iterator[None]:
        """The next k units (at most what is left of the enclosing span): ticks inside stop at its end,
        and when the block ends early the bar jumps to it."""
        limit = min(self.n + max(0, int(k)), self._limits[-1])
        self._limits.append(limit)
        try:
            yield
        finally:
            self._limits.pop()
            self.tick(limit - self.n)

    def status(self, key: str, text: str | None) -> None:
        """Set (or with None remove) one part of the text after the bar, e.g. ('batch', '2/4')."""
        if text is None:
            self._status.pop(key, None)
        else:
            self._status[key] = text
        if self._bar is not None:
            self._bar.set_postfix_str(" · ".join(self._status.values()), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def bar(total: int, desc: str, unit: str = "pass") -> Iterator[Progress]:
    """A bar for the block, also reachable as `current()` from the code it calls (AutoAttack marks its
    components with it). Shown only while `is_on()`."""
    prog = Progress(total, desc, unit, show=is_on())
    token = _CURRENT.set(prog)
    try:
        yield prog
    finally:
        _CURRENT.reset(token)
        prog.close()


_IDLE = Progress(0, "", show=False)


def current() -> Progress:
    """The innermost open bar, or a no-op one when there is none."""
    return _CURRENT.get() or _IDLE


@contextmanager
def counting(model: Any, prog: Progress) -> Iterator[None]:
    """Every forward pass of `model` (an nn.Module; anything else is not counted) ticks `prog` by one, for
    the block. The hook changes no output and is removed afterwards."""
    if not isinstance(model, nn.Module) or prog._bar is None:
        yield
        return
    handle = model.register_forward_hook(lambda *_: prog.tick())
    try:
        yield
    finally:
        handle.remove()
