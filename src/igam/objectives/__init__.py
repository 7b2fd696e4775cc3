"""Training objectives, one file per method (or family), registered by name; the loop (igam.train) builds
the model and the objective a config names through `build_model` and `create_objective`.

Every module in this package is imported here, so a method is one file: drop `objectives/NAME.py` with
`@register_objective("NAME", help=..., keys=..., ...)` and it is a method everywhere (`igam train --help`,
configuration, runs, `igam run`, results tables). Methods outside the package register through the
entry-point group `igam.objectives` (a module imported when igam is). docs/ARCHITECTURE.md walks through
one. The built-ins:

    standard   cross-entropy (base.py)
    finetune   a robust teacher's network on the target task: its new logit layer (paper eq. 6) or more
               layers (finetune.py)
    pgd-at, trades   PGD adversarial training, TRADES (pgd_at.py)
    fast-at, n-fgsm, free-at   cheap adversarial training, one input gradient per step (cheap_at.py)
    igam, igr  IGAM and its J_t = 0 control (igam.py; paper eqs. 7-14)
    kd-noise   distillation from the fine-tuned teacher on Gaussian-noised inputs (kd_noise.py)
    rrm        robust representation matching (rrm.py)
    ard, rslad adversarially robust distillation (distill.py)

Teacher terms (terms.py: feature, input-gradient and distillation terms) compose with the adversarial
methods by configuration (`teacher_term=`). Each objective declares its cost in passes per training image
(`Objective.passes`), summed by `count_passes`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from importlib.metadata import entry_points

import torch
import torch.nn as nn

from igam.errors import IgamError
from igam.models import create_model
from igam.objectives.base import (
    Metrics,
    Objective,
    Passes,
    check_method,
    count_passes,
    register_keys,
    register_objective,
)
from igam.objectives.finetune import finetune_model_name, teacher_network
from igam.registry import MODEL_BUILDERS, MODEL_NAMES, OBJECTIVES
from igam.runs import init_model_from


def _import_methods() -> None:
    """Import every module of this package (each registers its methods), then the plug-ins' modules."""
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}")
    for ep in entry_points(group="igam.objectives"):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not take igam down with it
            raise IgamError(f"The igam plug-in '{ep.name}' ({ep.value}) failed to import: {e}") from e


_import_methods()

__all__ = ["OBJECTIVES", "Metrics", "Objective", "Passes", "build_model", "builds_own_model", "check_method",
           "count_passes", "create_objective", "register_keys", "register_objective", "start_of",
           "trained_model_name"]


def create_objective(cfg, model: nn.Module, spec, device: torch.device) -> Objective:
    """The objective cfg.method names, on `device` (each factory takes (cfg, model, spec, device)).

    Raises:
        IgamError: for a method that is not registered.
    """
    check_method(cfg.method)
    return OBJECTIVES[cfg.method](cfg, model, spec, device).to(device)


def build_model(cfg, spec) -> nn.Module:
    """The network cfg.method trains: its registered builder (finetune: the frozen teacher with a new head
    behind an adapter); with model=teacher the teacher's network behind cfg.adapter with a new head, every
    layer learning from the teacher's weights (objectives/finetune.py, teacher_network); else the student
    cfg.model from the zoo / timm / torchvision (initialised from cfg.init_from when given).

    Raises:
        IgamError: for an unknown method or model, or an init_from run that does not fit.
    """
    check_method(cfg.method)
    if cfg.method in MODEL_BUILDERS:
        return MODEL_BUILDERS[cfg.method](cfg, spec)
    if cfg.model == "teacher":  # a robust start: the teacher's network, every layer learning
        return teacher_network(cfg, spec)
    model = create_model(cfg.model, num_classes=spec.num_classes, in_chans=spec.shape[0],
                         input_size=spec.shape[1:], activation=cfg.activation, width=cfg.width,
                         normalize=cfg.normalize, mean=spec.mean, std=spec.std)
    if cfg.init_from:
        init_model_from(model, cfg.init_from)
    return model


def start_of(cfg) -> dict[str, object] | None:
    """What a run's weights start from when not a fresh initialisation (model=teacher: the teacher's
    network; init_from: an earlier run), for meta.json: the source and the passes counted for it, zero (the
    premise: the robust model, or the run started from, exists already)."""
    sources = {"teacher_weights": cfg.teacher if cfg.model == "teacher" else "", "init_from": cfg.init_from}
    sources = {k: v for k, v in sources.items() if v}
    if not sources:
        return None
    return {**sources, "passes_counted": 0, "note": "the passes of the run(s) the weights start from are not "
            "counted in passes_per_image (a robust model one already has costs nothing to reuse)"}


def builds_own_model(method: str) -> bool:
    """Whether `method` trains a network of its own making (finetune: the adapted teacher) rather than
    the student cfg.model; its config then records that network's name as `model`."""
    return method in MODEL_BUILDERS


def trained_model_name(cfg, planned: Mapping[str, str] | None = None) -> str:
    """The architecture cfg's run trains, as meta.json names it, told without building it: the method's
    own network's (finetune: `adapted:TEACHER_ARCHITECTURE`), else cfg.model. '' when a method with its
    own network cannot tell it from the config and files (`planned` maps run directories not made yet,
    an experiment's earlier stages, to their model names)."""
    if cfg.method in MODEL_NAMES:
        return MODEL_NAMES[cfg.method](cfg, planned or {})
    if cfg.model == "teacher":
        return finetune_model_name(cfg, planned or {})
    return cfg.model
