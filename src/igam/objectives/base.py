"""What a training step optimises. The one training loop (igam.train) calls, per batch:

    loss, metrics = objective.loss(model, x, y, step)   # scalar whose .backward() gives every gradient
    ... loop: zero_grad, loss.backward(), clip, optimizer.step() ...
    metrics |= objective.after_step(model, x, y, step)  # e.g. a discriminator update every k steps

An objective is an nn.Module so its own networks (a discriminator, a learned adapter) are saved and
resumed with the run; `extra_state()` / `load_extra_state()` carry its optimisers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import unknown

Metrics = dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class: plain cross-entropy (standard training)."""

    name = "standard"

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, Metrics]:
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return ce, {"ce": ce.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def begin(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before the loop with the run's length (for schedules such as igam_start)."""

    def eval_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Extra held-out metrics at each evaluation (eval mode), e.g. cos(J_s, J_t)."""
        return {}

    def after_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> Metrics:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def on_lr(self, lr_factor: float) -> None:
        """Called with the schedule's current factor (objectives with their own optimisers follow it)."""


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str):
    def deco(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective '{name}' is already registered")
        OBJECTIVES[name] = fn
        return fn

    return deco


def create_objective(cfg, model: nn.Module, spec, device: torch.device) -> Objective:
    """Build the objective named by cfg.method (each factory takes (cfg, model, spec, device))."""
    import igam.objectives  # noqa: F401  (registers the built-in objectives)

    if cfg.method not in OBJECTIVES:
        raise unknown("method", cfg.method, OBJECTIVES)
    return OBJECTIVES[cfg.method](cfg, model, spec, device).to(device)


register_objective("standard")(lambda cfg, model, spec, device: Objective())
register_objective("finetune")(lambda cfg, model, spec, device: Objective())
