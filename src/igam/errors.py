"""One error type for problems a user can fix: the CLI prints its message without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class IgamError(Exception):
    """A problem with the user's input, named with its fix. The CLI prints it as one paragraph."""


class WriteError(IgamError):
    """A file could not be written (a full disk, a read-only folder, permissions): `path` names it and
    `reason` says why. Whoever catches it adds what was kept and what to do next."""

    def __init__(self, message: str, path: object = None, reason: str = ""):
        super().__init__(message)
        self.path = path
        self.reason = reason


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' for the closest choice, or '' when nothing is close (or `name` is a choice
    itself: suggesting what was written helps nobody)."""
    choices = [str(c) for c in choices]
    if str(name) in choices:
        return ""
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> IgamError:
    choices = sorted(choices)
    return IgamError(f"Unknown {kind} '{name}'.{suggest(name, choices)} Valid {kind}s: {', '.join(choices)}.")


class NonFiniteOutputs(IgamError):
    """A model gave NaN/Inf logits: a diverged model, never to be scored as a prediction."""


class NonFiniteValue(IgamError):
    """A number a user gave (command line, config file, experiment file) is NaN, Inf or beyond a float's
    range (1e999, YAML's .inf / .nan)."""
