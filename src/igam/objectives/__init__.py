"""Training objectives, one file each, registered by method name; the loop (igam.train) builds the model
and the objective a config names through `build_model` and `create_objective`.

    standard   cross-entropy (base.py)
    finetune   a robust teacher's new logit layer on the target task (finetune.py; paper eq. 6)
    pgd-at     PGD adversarial training; trades: TRADES (pgd_at.py)
    fast-at, n-fgsm, free-at   cheap adversarial training, one input gradient per step (cheap_at.py)
    igam, igr  IGAM and its J_t = 0 control (igam.py; paper eqs. 7-14)
    kd-noise   distillation from the fine-tuned teacher on Gaussian-noised inputs (kd_noise.py)

Each declares its cost in passes per training image (`Objective.passes`), summed by `count_passes`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from igam.models import create_model
from igam.objectives import cheap_at as _cheap_at  # noqa: F401  (registers fast-at, n-fgsm, free-at)
from igam.objectives import finetune as _finetune  # noqa: F401  (registers finetune)
from igam.objectives import igam as _igam  # noqa: F401  (registers igam, igr)
from igam.objectives import kd_noise as _kd_noise  # noqa: F401  (registers kd-noise)
from igam.objectives import pgd_at as _pgd_at  # noqa: F401  (registers pgd-at, trades)
from igam.objectives.base import (
    MODEL_BUILDERS,
    MODEL_NAMES,
    OBJECTIVES,
    Metrics,
    Objective,
    Passes,
    check_method,
    count_passes,
    register_objective,
)
from igam.runs import init_model_from

__all__ = ["OBJECTIVES", "Metrics", "Objective", "Passes", "build_model", "builds_own_model", "check_method",
           "count_passes", "create_objective", "register_objective", "trained_model_name"]


def create_objective(cfg, model: nn.Module, spec, device: torch.device) -> Objective:
    """The objective cfg.method names, on `device` (each factory takes (cfg, model, spec, device)).

    Raises:
        IgamError: for a method that is not registered.
    """
    check_method(cfg.method)
    return OBJECTIVES[cfg.method](cfg, model, spec, device).to(device)


def build_model(cfg, spec) -> nn.Module:
    """The network cfg.method trains: its registered builder (finetune: the frozen teacher with a new head
    behind an adapter), else the student cfg.model from the zoo / timm / torchvision (initialised from
    cfg.init_from when given).

    Raises:
        IgamError: for an unknown method or model, or an init_from run that does not fit.
    """
    check_method(cfg.method)
    if cfg.method in MODEL_BUILDERS:
        return MODEL_BUILDERS[cfg.method](cfg, spec)
    model = create_model(cfg.model, num_classes=spec.num_classes, in_chans=spec.shape[0],
                         input_size=spec.shape[1:], activation=cfg.activation, width=cfg.width,
                         normalize=cfg.normalize, mean=spec.mean, std=spec.std)
    if cfg.init_from:
        init_model_from(model, cfg.init_from)
    return model


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
    return cfg.model
