"""IGAM (paper 4.2, Algorithm 1) and its controls as objectives of the one training loop.

    igam   CE + lambda_adv L_adv + lambda_diff L_diff against a fine-tuned robust teacher (eq. 14)
    igr    the control with J_t = 0: CE + lambda_diff ||J_s||^2 (input-gradient regularisation; a teacher,
           if given, only sets the scale of lambda_diff=auto so the two are comparable)

Before `igam_start` the objective is plain cross-entropy (the official code trains 87.5% of its steps
that way). The discriminator steps every `disc_every` student steps with its own optimiser.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from igam.config import Config, parse_fraction
from igam.discriminator import GradientDiscriminator
from igam.errors import IgamError
from igam.matching import InputGradientMatching
from igam.objectives.base import Metrics, Objective, register_objective


def parse_start(text: str, total: int, steps_per_epoch: int) -> int:
    """'1000' -> step 1000; '5ep' -> epoch 5; '0.875' -> 87.5% of training (official)."""
    s = str(text).strip().lower()
    if (m := re.fullmatch(r"([0-9.]+)\s*ep(och)?s?", s)) is not None:
        return round(float(m.group(1)) * steps_per_epoch)
    try:
        v = float(s)
    except ValueError:
        raise IgamError(
            f"igam_start={text!r}: write a step (1000), an epoch (5ep) or a fraction (0.875)."
        ) from None
    if 0 < v < 1:
        return round(v * total)
    return int(v)


class IGAMObjective(Objective):
    """InputGradientMatching plus the schedule (igam_start) and the discriminator's optimiser and cadence."""

    def __init__(self, cfg: Config, matching: InputGradientMatching):
        super().__init__()
        self.name = cfg.method
        self.matching = matching
        self.cfg = cfg
        self.start, self.disc_every = 0, cfg.disc_every
        d = matching.discriminator
        self.disc_opt = None
        if d is not None:
            lr = cfg.disc_lr or cfg.lr
            self.disc_opt = (
                torch.optim.Adam(d.parameters(), lr=lr)
                if cfg.disc_optimizer == "adam"
                else torch.optim.SGD(
                    d.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
                )
            )
            self.disc_base_lr = lr

    @property
    def discriminator(self) -> nn.Module | None:
        return self.matching.discriminator

    def begin(self, total_steps: int, steps_per_epoch: int) -> None:
        self.start = parse_start(self.cfg.igam_start, total_steps, steps_per_epoch)

    def loss(self, model, x, y, step) -> tuple[torch.Tensor, Metrics]:
        if step < self.start:
            return super().loss(model, x, y, step)
        terms = self.matching(model, x, y)
        return terms.pop("loss"), terms

    def after_step(self, model, x, y, step) -> Metrics:
        if step >= self.start and (step - self.start) % self.disc_every == 0 and self.disc_opt is not None:
            return self.matching.discriminator_step(self.disc_opt)
        return {}

    def on_lr(self, lr_factor: float) -> None:
        if self.disc_opt is not None and self.cfg.disc_optimizer == "sgd":
            for g in self.disc_opt.param_groups:
                g["lr"] = self.disc_base_lr * lr_factor

    def accelerate(self, **kw: Any) -> None:
        """compile / channels_last for the teacher and the discriminator (igam.train.speed_setup)."""
        self.matching.accelerate(**kw)

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under torchrun: the discriminator's update goes through its own DDP wrapper (igam.train)."""
        self.matching.wrap_discriminator(wrap)

    def eval_metrics(self, model, x, y) -> dict[str, float]:
        return self.matching.held_out_metrics(model, x, y)

    def extra_state(self) -> dict[str, Any]:
        return {"disc_opt": self.disc_opt.state_dict()} if self.disc_opt is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.disc_opt is not None and "disc_opt" in state:
            self.disc_opt.load_state_dict(state["disc_opt"])


def build_matching(
    cfg: Config, spec, device: torch.device, use_teacher: bool = True
) -> InputGradientMatching:
    """The InputGradientMatching module a config describes (teacher, adapter view, discriminator, lambdas)."""
    from igam.teacher import frozen_teacher

    teacher = None
    if cfg.teacher:
        teacher = frozen_teacher(cfg.teacher, spec.shape, spec.num_classes, cfg.teacher_bn).to(device)
    elif use_teacher:
        raise IgamError(
            "method=igam needs teacher=RUN_DIR: a robust teacher fine-tuned on this dataset "
            "(`igam finetune teacher=ROBUST_RUN dataset=...`)."
        )
    disc = None
    view = teacher.adapter.disc_view if teacher is not None else None
    if use_teacher and cfg.lambda_adv != 0:
        view_shape = tuple(view(torch.zeros(1, *spec.shape, device=device)).shape[1:])
        disc = GradientDiscriminator(view_shape, cfg.disc_layers, cfg.disc_channels, cfg.disc_input_norm)
    lam = cfg.lambda_diff if cfg.lambda_diff == "auto" else parse_fraction(cfg.lambda_diff, "lambda_diff")
    m = InputGradientMatching(
        teacher,
        disc,
        lambda_adv=cfg.lambda_adv if use_teacher else 0.0,
        lambda_diff=lam,
        lambda_diff_auto=cfg.lambda_diff_auto,
        gradient_target=cfg.gradient_target,
        scale=cfg.pixel_scale,
        diff_reduction=cfg.diff_reduction,
        adv_loss=cfg.adv_loss,
        adv_scale=0.5 if cfg.preset == "official" else 1.0,
        disc_view=view,
        mode=cfg.grad_matching,
        fd_step=cfg.fd_step,
        fd_scheme=cfg.fd_scheme,
        amp_input_grad=cfg.amp_input_grad,
    )
    m.use_teacher = use_teacher
    return m.to(device)


@register_objective("igam")
def make_igam(cfg: Config, model, spec, device) -> IGAMObjective:
    return IGAMObjective(cfg, build_matching(cfg, spec, device, use_teacher=True))


@register_objective("igr")
def make_igr(cfg: Config, model, spec, device) -> IGAMObjective:
    return IGAMObjective(cfg, build_matching(cfg, spec, device, use_teacher=False))
