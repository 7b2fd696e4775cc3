"""What a training step optimises. The one training loop (igam.train) calls, per batch:

    loss, metrics, aux = objective.loss(model, x, y, step)   # scalar whose .backward() gives every gradient
                                                             # (+ index=... when objective.needs_index)
    ... loop: zero_grad, loss.backward(), clip, optimizer.step() ...
    metrics |= objective.after_step(model, x, y, step, aux)  # e.g. a discriminator update every k steps

`aux` is whatever the step hands on to its own after_step (IGAM: the step's detached gradient maps); the
loop never looks inside. An objective is an nn.Module so its own networks (a discriminator, a learned
adapter) are saved and resumed with the run; `extra_state()` / `load_extra_state()` carry its optimisers.

An objective also declares what the loop must provide instead of the loop testing method names:
`needs_double_backward` (the student's loss differentiates an input gradient: no torch.compile of the
student), `needs_fp32` (finite differences: TF32 off on CUDA), `backprops_twice` (the pass at x is
backpropagated twice: compiled backwards must keep their buffers), `optimizer_settings(cfg)` (which
optimiser and base lr), `needs_index` (the loop passes `index=`, the (B,) int64 training-set positions of
the batch's images on the CPU, to `loss`: e.g. IGAM's teacher-gradient cache is keyed by it; objectives
that leave it False keep the four-argument `loss`), and, through `register_objective(name,
build_model=...)`, the network it trains.

Two more declarations shape the loop and its records: `replays` (each minibatch is trained on that many
steps in a row: free adversarial training) and `passes(step)`, the forward and backward passes one step
costs per training image, by network (student, teacher, discriminator) and kind (forward, backward,
double_backward), which `count_passes` sums over a run into the machine-independent cost every run
records (meta.json, metrics.json: `passes_per_image`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError, suggest
from igam.registry import MODEL_BUILDERS, MODEL_NAMES, OBJECTIVES

Metrics = dict[str, torch.Tensor]
Passes = dict[str, dict[str, float]]  # network -> kind -> passes per training image

NETWORKS = ("student", "teacher", "discriminator")
PASS_KINDS = ("forward", "backward", "double_backward")


def count(forward: float = 0, backward: float = 0, double_backward: float = 0) -> dict[str, float]:
    """One network's passes per training image in a step: forward, (first-order) backward, and backward
    through a graph that holds a backward (double backprop), each counted as a pass over the image."""
    return {"forward": forward, "backward": backward, "double_backward": double_backward}


class Objective(nn.Module):
    """Base class: plain cross-entropy (standard training)."""

    name = "standard"
    needs_double_backward = False
    needs_fp32 = False
    backprops_twice = False
    replays = 1  # steps each minibatch is trained on in a row (free-at: m)
    needs_index = False

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics, Any]:
        """(scalar loss, scalar metrics, aux for after_step) for a batch x (B, C, H, W) float in [0, 1],
        y (B,) int64, at training step `step` (0-based). `index` (B,) int64 on the CPU: which training
        images (positions in the training set) the batch holds; the loop passes it only to an objective
        whose `needs_index` is True, and it is None wherever the images have no training-set position."""
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return ce, {"ce": ce.detach(), "acc": (logits.argmax(1) == y).float().mean()}, None

    def passes(self, step: int) -> Passes:
        """Forward/backward passes per training image that step `step` costs, by network (NETWORKS) and
        kind (PASS_KINDS); networks left out cost nothing. Standard training: one forward and one backward
        of the student."""
        return {"student": count(1, 1)}

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        """Called once before the loop with the run's length (for schedules such as igam_start) and this
        process's rank (for per-rank random streams)."""

    def optimizer_settings(self, cfg: Any) -> tuple[str, float]:
        """(optimizer name 'sgd' | 'adam', base learning rate) the loop trains the model with."""
        return cfg.optimizer, cfg.lr

    def eval_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Extra held-out metrics at each evaluation (eval mode), e.g. cos(J_s, J_t)."""
        return {}

    def after_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, aux: Any) -> Metrics:
        """Called after the student's update with the aux its loss returned."""
        return {}

    def on_lr(self, lr_factor: float) -> None:
        """Called with the schedule's current factor (objectives with their own optimisers follow it)."""

    def accelerate(self, compile_fn: Callable[..., nn.Module] | None = None,
                   memory_format: torch.memory_format | None = None,
                   example: torch.Tensor | None = None) -> None:
        """compile / channels_last for the objective's own networks (igam.speed); none by default."""

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under torchrun: route the objective's own trained networks through wrap (a DDP wrapper)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


Factory = Callable[..., Objective]
ModelBuilder = Callable[..., nn.Module]


ModelNamer = Callable[..., str]


def register_objective(name: str, build_model: ModelBuilder | None = None,
                       model_name: ModelNamer | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register factory(cfg, model, spec, device) -> Objective as method `name`, and optionally
    build_model(cfg, spec) -> nn.Module, the network that method trains (default: the student cfg.model),
    with model_name(cfg, planned) -> str, that network's architecture name as meta.json will record it,
    told without building it ('' when it cannot be told; `planned` maps run directories not made yet to
    their model names)."""
    def deco(fn: Factory) -> Factory:
        if name in OBJECTIVES:
            raise ValueError(f"objective '{name}' is already registered")
        OBJECTIVES[name] = fn
        if build_model is not None:
            MODEL_BUILDERS[name] = build_model
        if model_name is not None:
            MODEL_NAMES[name] = model_name
        return fn

    return deco


def count_passes(objective: Objective, total_steps: int, steps_per_epoch: int) -> Passes:
    """Passes per training image over a run of `total_steps` steps: sum_s objective.passes(s) /
    steps_per_epoch (an epoch of steps trains on every training image once, replays included, under
    torchrun too), for every network and kind (zeros included), rounded to 4 decimals. A function of the
    settings alone: the same on every machine, and on a resumed run."""
    out = {net: dict.fromkeys(PASS_KINDS, 0.0) for net in NETWORKS}
    memo: dict[str, tuple[tuple[str, str, float], ...]] = {}
    for s in range(total_steps):
        p = objective.passes(s)
        key = repr(p)
        if key not in memo:
            memo[key] = tuple((net, kind, float(v)) for net, kinds in p.items() for kind, v in kinds.items())
        for net, kind, v in memo[key]:
            if net not in out or kind not in out[net]:
                raise ValueError(f"{type(objective).__name__}.passes names {net}/{kind}; networks are "
                                 f"{NETWORKS}, kinds {PASS_KINDS}")
            out[net][kind] += v
    return {net: {k: round(v / max(1, steps_per_epoch), 4) for k, v in kinds.items()}
            for net, kinds in out.items()}


def check_method(method: str) -> None:
    """Raises IgamError unless `method` names a registered objective."""
    if method not in OBJECTIVES:
        raise IgamError(f"method={method!r} is not a training objective.{suggest(method, OBJECTIVES)} "
                        f"Choose one of: {', '.join(sorted(OBJECTIVES))}.")


register_objective("standard")(lambda cfg, model, spec, device: Objective())
