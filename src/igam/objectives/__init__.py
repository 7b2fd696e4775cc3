"""Training objectives, one file each; `create_objective(cfg, ...)` picks one by cfg.method."""

from igam.objectives.base import OBJECTIVES, Metrics, Objective, create_objective, register_objective

__all__ = ["OBJECTIVES", "Metrics", "Objective", "create_objective", "register_objective"]

# Built-in objectives register themselves on import; optional ones are skipped if absent.
import importlib as _importlib

for _mod in ("pgd_at", "igam"):
    try:
        _importlib.import_module(f"igam.objectives.{_mod}")
    except ModuleNotFoundError as _e:  # a module not written yet in this checkout
        if _e.name != f"igam.objectives.{_mod}":
            raise
