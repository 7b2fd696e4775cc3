"""Training objectives, one file each; `create_objective(cfg, ...)` picks one by cfg.method."""

from igam.objectives.base import OBJECTIVES, Metrics, Objective, create_objective, register_objective

__all__ = ["OBJECTIVES", "Metrics", "Objective", "create_objective", "register_objective"]

# Built-in objectives register themselves on import.
from igam.objectives import igam as _igam  # noqa: E402, F401
from igam.objectives import pgd_at as _pgd_at  # noqa: E402, F401
