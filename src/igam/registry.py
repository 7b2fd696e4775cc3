"""Names that plug-ins can add to: the training objectives (`method=`) registered so far.

A low-level home, so that configuration can check a method name without importing the objectives
(which sit above it): igam.objectives registers its built-ins here on import, plug-ins with
igam.objectives.register_objective. config.METHODS lists the built-ins for help texts and early checks.
"""

from __future__ import annotations

from typing import Any

OBJECTIVES: dict[str, Any] = {}  # method name -> factory(cfg, model, spec, device) -> Objective
MODEL_BUILDERS: dict[str, Any] = {}  # method name -> build_model(cfg, spec) -> nn.Module (optional)
MODEL_NAMES: dict[str, Any] = {}  # method name -> model_name(cfg, planned) -> str: what build_model builds
