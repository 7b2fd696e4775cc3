"""Numbers users type: fractions such as 8/255, L-inf radii in [0, 1] pixel units (and how a radius is
written back: `eps_text`), and training-time points such as 1000 (a step), 5ep (an epoch) or 0.875 (a
fraction of training).

Parsed once, where configuration is read; everything downstream receives floats and ints.
"""

from __future__ import annotations

import math
import re

from igam.errors import IgamError, NonFiniteValue


def parse_fraction(value: str | float | int, key: str = "value") -> float:
    """'8/255' -> 0.0313..., '0.3' -> 0.3, 2 -> 2.0.

    Raises:
        IgamError: for text that is not a number or a ratio, a bool, or a non-finite result (NaN, Inf,
            or a number too large for a float such as 1e999 or YAML's .inf), wherever it comes from.
    """
    if isinstance(value, bool):
        raise IgamError(f"{key}={value!r} is not a number.")
    try:
        if isinstance(value, int | float):
            out = float(value)
        else:
            s = str(value).strip()
            m = re.fullmatch(r"([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)", s)
            out = float(m.group(1)) / float(m.group(2)) if m else float(s)
    except OverflowError:
        out = math.inf
    except (ValueError, ZeroDivisionError):
        raise IgamError(f"{key}={value!r} is not a number; write e.g. 0.3 or 8/255.") from None
    if not math.isfinite(out):
        raise NonFiniteValue(non_finite(key, value))
    return out


def non_finite(key: str, value: object) -> str:
    """The one message for a non-finite number (NaN, Inf, 1e999, YAML's .inf / .nan) given for `key`."""
    shown = value if isinstance(value, str) else repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return (f"{key}={shown} is not a finite number (NaN, Inf and values beyond a float's range, such as "
            f"1e999 or YAML's .inf / .nan, are refused); give {key} a finite value.")


def check_eps(value: str | float, key: str = "eps") -> float:
    """An L-inf radius in [0, 1] pixel units (inputs live in [0, 1]); catches 8 meaning 8/255.

    Raises:
        IgamError: when the value is not a number, is negative or is larger than 1.
    """
    eps = parse_fraction(value, key)
    if eps < 0:
        raise IgamError(f"{key}={value} is negative; radii are >= 0.")
    if eps > 1:
        raise IgamError(f"{key}={value} is larger than 1, but inputs live in [0, 1]. If you meant "
                        f"{value}/255 on the 0-255 scale, write {key}={value}/255.")
    return eps


def eps_text(eps: float) -> str:
    """How a radius is written in keys and tables: its short decimal when that is exact (0.5, 0.2), else
    k/255 when it is one (64/255), else 4 significant digits."""
    short, k = f"{eps:.4g}", eps * 255
    if float(short) == eps:
        return short
    return f"{round(k)}/255" if 0 < eps < 1 and abs(k - round(k)) < 1e-6 else short


def check_start(text: str | float | int, key: str = "igam_start") -> str:
    """Validate a training-time point (see `start_step`) without knowing the run's length; returns it."""
    start_step(text, 1000, 100, key)
    return str(text).strip()


def start_step(text: str | float | int, total: int, steps_per_epoch: int, key: str = "igam_start") -> int:
    """The step a training-time point names: '1000' -> step 1000; '5ep' -> epoch 5 (5 x steps_per_epoch);
    '0.875' -> 87.5% of `total` steps (the official IGAM schedule).

    Raises:
        IgamError: for text that is none of the three forms.
    """
    s = str(text).strip().lower()
    if (m := re.fullmatch(r"([0-9.]+)\s*ep(och)?s?", s)) is not None:
        try:
            return round(float(m.group(1)) * steps_per_epoch)
        except ValueError:
            pass
    else:
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if math.isfinite(v) and v >= 0:
            return round(v * total) if 0 < v < 1 else int(v)
    raise IgamError(f"{key}={text!r}: write a step (1000), an epoch (5ep) or a fraction (0.875).")


def non_negative(value: float | int, key: str) -> None:
    """A configuration key's check: value >= 0.

    Raises:
        IgamError: naming the key and its value.
    """
    if value < 0:
        raise IgamError(f"{key}={value} must not be negative.")


def at_least(low: float, why: str = ""):
    """A configuration key's check: value >= low (`why` says what the key counts)."""

    def check(value: float | int, key: str) -> None:
        if value < low:
            raise IgamError(f"{key}={value} must be at least {low:g}{f' ({why})' if why else ''}.")

    return check


def in_range(low: float, high: float, why: str = ""):
    """A configuration key's check: low <= value <= high (`why` says why the bound is there)."""

    def check(value: float | int, key: str) -> None:
        if not low <= value <= high:
            what = f"is more than {high:g}" if value > high else f"must be at least {low:g}"
            raise IgamError(f"{key}={value} {what}{f' ({why})' if why else ''}. Choose a value in "
                            f"[{low:g}, {high:g}].")

    return check


def fraction_check(value: str, key: str) -> None:
    """A configuration key's check: a number or fraction such as 8/255 (parse_fraction), not negative."""
    if parse_fraction(value, key) < 0:
        raise IgamError(f"{key}={value} must not be negative.")


def positive(value: float | int, key: str) -> None:
    """A configuration key's check: value > 0.

    Raises:
        IgamError: naming the key and its value.
    """
    if not value > 0:
        raise IgamError(f"{key}={value} must be positive.")
