"""What plug-ins register: training methods (`method=`) with everything the rest of igam needs to know
about them, and the configuration keys they bring.

A low-level home (layer 0), so that configuration, experiments and the CLI can ask about a method without
importing the objectives, which sit above them. A method is one file in `igam/objectives/` (imported
automatically) or in a plug-in package (entry-point group `igam.objectives`) that calls
`igam.objectives.register_objective(...)`; that call fills `METHODS` and, for keys the method brings,
`KEYS`. docs/ARCHITECTURE.md ("Adding a method") walks through one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHECKS",
    "KEYS",
    "METHODS",
    "MODEL_BUILDERS",
    "MODEL_NAMES",
    "OBJECTIVES",
    "PRESETS",
    "Key",
    "MethodInfo",
    "add_check",
    "add_keys",
    "add_method",
]


@dataclass(frozen=True)
class Key:
    """A configuration key brought by a method file: `name=value` on every verb, typed like `default`
    (bool, int, float, str or list), listed under `group` in `igam VERB --help`.

    `check(value, key)` (optional) refuses a bad value with an IgamError naming the key and the fix;
    `choices` restricts a string key to those values."""

    name: str
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any, str], None] | None = None

    @property
    def type(self) -> type:
        return type(self.default) if not isinstance(self.default, list | tuple) else list


@dataclass(frozen=True)
class MethodInfo:
    """What a registered method declares (see igam.objectives.register_objective for each field)."""

    name: str
    factory: Callable[..., Any]
    help: str = ""
    reads: tuple[str, ...] = ()
    summary: tuple[str, ...] = ()
    adversarial: bool = False
    cost: Callable[[Any], float] | float = 1.0
    check: Callable[[Any], None] | None = None
    build_model: Callable[..., Any] | None = None
    model_name: Callable[..., str] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def step_cost(self, cfg: Any) -> float:
        """Rough training time of a step relative to a standard step (for `igam run --dry-run`)."""
        return float(self.cost(cfg) if callable(self.cost) else self.cost)


METHODS: dict[str, MethodInfo] = {}  # method name -> what it declares
KEYS: dict[str, Key] = {}  # configuration keys brought by method files (the core keys live in igam.config)
CHECKS: list[Callable[[Any], None]] = []  # cross-key checks of a config, whatever its method
PRESETS: dict[str, dict[str, Any]] = {}  # preset=NAME -> the keys it sets unless given explicitly

# views kept for older callers: method name -> factory / model builder / model namer
OBJECTIVES: dict[str, Any] = {}
MODEL_BUILDERS: dict[str, Any] = {}
MODEL_NAMES: dict[str, Any] = {}


def add_method(info: MethodInfo) -> None:
    """Register `info` under info.name.

    Raises:
        ValueError: the name is taken (a method is registered once; there is no silent overwrite).
    """
    if info.name in METHODS:
        raise ValueError(f"method '{info.name}' is already registered")
    METHODS[info.name] = info
    OBJECTIVES[info.name] = info.factory
    if info.build_model is not None:
        MODEL_BUILDERS[info.name] = info.build_model
    if info.model_name is not None:
        MODEL_NAMES[info.name] = info.model_name


def add_keys(*keys: Key, core: Mapping[str, Any] = ()) -> None:
    """Register configuration keys. `core` holds the names igam.config already defines.

    Raises:
        ValueError: a name that is taken, or a default whose type a key cannot have.
    """
    for k in keys:
        if k.name in KEYS or k.name in core:
            raise ValueError(f"configuration key '{k.name}' is already defined")
        if not isinstance(k.default, bool | int | float | str | list):
            raise ValueError(
                f"configuration key '{k.name}': default {k.default!r} is not a bool, int, float, str or list"
            )
        KEYS[k.name] = k


def add_check(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a cross-key check run on every config (raises IgamError when the keys do not fit)."""
    CHECKS.append(fn)
    return fn
