"""IGAM (paper 4.2, Algorithm 1) and its control as objectives of the one training loop.

    igam   CE + lambda_adv L_adv + lambda_diff L_diff against a fine-tuned robust teacher (eq. 14)
    igr    the control with J_t = 0: CE + lambda_diff ||J_s||^2 (input-gradient regularisation; a teacher,
           if given, only sets the scale of lambda_diff=auto so the two are comparable)

Before `igam_start` the objective is plain cross-entropy (the official code trains 87.5% of its steps
that way). The method itself, and the discriminator's training, live in igam.method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.data import resolve_augment
from igam.errors import IgamError
from igam.method.discriminator import GradientDiscriminator
from igam.method.matching import InputGradientMatching
from igam.method.teacher_cache import teacher_cache_blockers
from igam.objectives.base import Metrics, Objective, Passes, count, register_objective
from igam.teachers import frozen_teacher
from igam.units import parse_fraction, start_step
from igam.utils import bn_mode


class IGAMObjective(Objective):
    """InputGradientMatching on and after the step `igam_start` names; plain cross-entropy before."""

    def __init__(self, name: str, matching: InputGradientMatching, igam_start: str = "0"):
        super().__init__()
        self.name, self.matching, self.igam_start = name, matching, igam_start
        self.start, self.steps_per_epoch = 0, 0
        self.teacher_sets_scale = not matching._lambda_known  # lambda_diff=auto: J_t on the first batch

    @property
    def needs_double_backward(self) -> bool:  # type: ignore[override]
        return self.matching.mode == "exact"

    @property
    def needs_fp32(self) -> bool:  # type: ignore[override]
        return self.matching.mode == "finite-difference"

    @property
    def backprops_twice(self) -> bool:  # type: ignore[override]
        return self.matching.mode == "finite-difference"

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        """The teacher-gradient cache is keyed by the batch's training-set positions."""
        return self.matching.teacher_cache is not None

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        self.start = start_step(self.igam_start, total_steps, steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch

    def passes(self, step: int) -> Passes:
        """Plain CE before igam_start (student forward + backward). Then, per image: the teacher's input
        gradient (forward + backward; igr: only on its first step, for lambda_diff=auto); the student's
        pass at x and its input gradient (forward + backward), and, exact: the step's backward through
        J_s (a double backward); finite-difference: the perturbed passes instead (central: two forwards
        and backwards; forward: one), plus one more backward of the pass at x for the true-prob target;
        the discriminator on J_s and J_t (two maps per image: forward + backward to J_s), again for its
        own update every disc_every steps. With the teacher-gradient cache, the teacher's passes count in
        the first epoch of IGAM steps only (the few later batches holding images that epoch left out,
        which recompute the teacher, are not counted)."""
        if step < self.start:
            return super().passes(step)
        m = self.matching
        if m.mode == "exact":
            student = count(1, 1, 1)
        else:
            extra = 2 if m.fd_scheme == "central" else 1
            student = count(1 + extra, 1 + extra + (m.gradient_target != "ce"))
        out = {"student": student}
        cached = m.teacher_cache is not None and step >= self.start + self.steps_per_epoch
        if m.teacher is not None and not cached and (m.use_teacher
                                                     or (step == self.start and self.teacher_sets_scale)):
            out["teacher"] = count(1, 1)
        if m.adversary is not None:
            d = 2 + 2 * m.adversary.due(step - self.start)
            out["discriminator"] = count(d, d)
        return out

    def loss(self, model, x, y, step, index=None) -> tuple[torch.Tensor, Metrics, Any]:
        if step < self.start:
            return super().loss(model, x, y, step)
        terms = self.matching(model, x, y, index)
        maps = {"js": terms.pop("js"), "jt": terms.pop("jt")}
        return terms.pop("loss"), terms, maps

    def after_step(self, model, x, y, step, aux) -> Metrics:
        adversary = self.matching.adversary
        if aux is not None and adversary is not None and adversary.due(step - self.start):
            return self.matching.discriminator_step(aux)
        return {}

    def on_lr(self, lr_factor: float) -> None:
        if self.matching.adversary is not None:
            self.matching.adversary.on_lr(lr_factor)

    def accelerate(self, **kw: Any) -> None:
        """compile / channels_last for the teacher and the discriminator (igam.speed)."""
        self.matching.accelerate(**kw)

    def wrap_for_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under torchrun: the discriminator's update goes through its own DDP wrapper."""
        self.matching.wrap_discriminator(wrap)

    def eval_metrics(self, model, x, y) -> dict[str, float]:
        return self.matching.held_out_metrics(model, x, y)

    def extra_state(self) -> dict[str, Any]:
        return self.matching.adversary.state_dict() if self.matching.adversary is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.matching.adversary is not None:
            self.matching.adversary.load_state_dict(state)


def teacher_cache_decision(cfg: Any, spec: Any, teacher: nn.Module | None) -> tuple[bool, list[str]]:
    """(cache the teacher's gradients?, the reasons it would be wrong) for cfg.teacher_cache auto | on | off.

    The cache is exact when the student's inputs are the same every epoch (augment none after `auto` is
    resolved for the data's shape, noise 0) and the teacher is deterministic per example (eval-mode
    BatchNorm, no random adapter: igam.method.teacher_cache.teacher_cache_blockers). auto is on exactly
    then (and off without a teacher: nothing to cache); off is off.

    Raises:
        IgamError: teacher_cache=on where it would be wrong, naming every reason.
    """
    if cfg.teacher_cache == "off" or teacher is None:
        return False, []
    reasons = []
    augment = resolve_augment(cfg.augment, tuple(spec.shape))
    if augment != "none":
        reasons.append(f"augment={augment}" + (" (auto for this data)" if cfg.augment == "auto" else "")
                       + " gives the student new inputs every epoch")
    if parse_fraction(cfg.noise, "noise") > 0:
        reasons.append(f"noise={cfg.noise} adds fresh noise to the inputs every epoch")
    reasons += teacher_cache_blockers(teacher)
    if cfg.teacher_cache == "on" and reasons:
        raise IgamError("teacher_cache=on would reuse teacher gradients that are wrong: " + "; ".join(reasons)
                        + ". Use teacher_cache=auto (on exactly when it is exact) or off, or drop those "
                        "settings (augment=none noise=0 teacher_bn=eval, a deterministic adapter).")
    return not reasons, reasons


def build_matching(cfg: Any, spec: Any, device: torch.device,
                   use_teacher: bool = True) -> InputGradientMatching:
    """The InputGradientMatching module a config describes: the frozen fine-tuned teacher, the adapter's
    view for the discriminator, the discriminator with its optimiser, the lambdas and the matching mode.

    Raises:
        IgamError: method=igam without a teacher, or a teacher that does not fit the target task.
    """
    teacher = None
    if cfg.teacher:
        teacher = frozen_teacher(cfg.teacher, spec.shape, spec.num_classes, cfg.teacher_bn,
                                   class_names=spec.class_names, dataset=spec.dataset).to(device)
    elif use_teacher:
        raise IgamError(
            "method=igam needs teacher=RUN_DIR: a robust teacher fine-tuned on this dataset "
            "(`igam finetune teacher=ROBUST_RUN dataset=...`)."
        )
    disc, disc_opt = None, None
    view = teacher.adapter.disc_view if teacher is not None else None
    if use_teacher and cfg.lambda_adv != 0:
        view_shape = tuple(view(torch.zeros(1, *spec.shape, device=device)).shape[1:])
        disc = GradientDiscriminator(view_shape, cfg.disc_layers, cfg.disc_channels, cfg.disc_input_norm)
        disc = disc.to(device)
        lr = cfg.disc_lr or cfg.lr
        disc_opt = (torch.optim.Adam(disc.parameters(), lr=lr) if cfg.disc_optimizer == "adam"
                    else torch.optim.SGD(disc.parameters(), lr=lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay))
    lam = cfg.lambda_diff if cfg.lambda_diff == "auto" else parse_fraction(cfg.lambda_diff, "lambda_diff")
    m = InputGradientMatching(
        teacher,
        disc,
        lambda_adv=cfg.lambda_adv if use_teacher else 0.0,
        lambda_diff=lam,
        lambda_diff_auto=cfg.lambda_diff_auto,
        use_teacher=use_teacher,
        gradient_target=cfg.gradient_target,
        scale=cfg.pixel_scale,
        diff_reduction=cfg.diff_reduction,
        adv_loss=cfg.adv_loss,
        adv_scale=0.5 if cfg.preset == "official" else 1.0,  # official: L_adv as its mean over 2B
        disc_view=view,
        disc_optimizer=disc_opt,
        disc_every=cfg.disc_every,
        disc_follow_lr=cfg.disc_optimizer == "sgd",
        mode=cfg.grad_matching,
        fd_step=cfg.fd_step,
        fd_scheme=cfg.fd_scheme,
        amp_input_grad=cfg.amp_input_grad,
        teacher_cache=teacher_cache_decision(cfg, spec, teacher)[0],
        double_backward=cfg.double_backward,
    )
    return m.to(device)


def check_double_backward(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> None:
    """Exact mode differentiates the student's input gradient (a double backward through every layer):
    try it once on two mid-grey images (eval mode: no random draws, no BatchNorm statistics moved; the
    parameters' .grad is left as it was), so that a layer without a double-backward formula (e.g.
    hardsigmoid in MobileNetV3) is named before training starts.

    Raises:
        IgamError: naming PyTorch's missing derivative and the fix (grad_matching=finite-difference).
    """
    saved = [(p, p.grad) for p in model.parameters()]
    x = torch.full((2, *shape), 0.5, device=device, requires_grad=True)
    try:
        with bn_mode(model, "eval"), torch.enable_grad():
            out = model(x)
            loss = F.cross_entropy(out.float(), torch.zeros(2, dtype=torch.long, device=device))
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            g.pow(2).sum().backward()
    except RuntimeError as e:
        if "not implemented" not in str(e):
            raise
        what = str(e).strip().splitlines()[0][:200]
        raise IgamError(f"grad_matching=exact needs the double backward of every layer of the student, and "
                        f"PyTorch has none for one of this model's layers ({what}). Use "
                        "grad_matching=finite-difference (first-order passes only), or another "
                        "student.") from None
    finally:
        for p, grad in saved:
            p.grad = grad


@register_objective("igam")
def make_igam(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> IGAMObjective:
    if cfg.grad_matching == "exact":
        check_double_backward(model, spec.shape, device)
    return IGAMObjective("igam", build_matching(cfg, spec, device, use_teacher=True), cfg.igam_start)


@register_objective("igr")
def make_igr(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> IGAMObjective:
    if cfg.grad_matching == "exact":
        check_double_backward(model, spec.shape, device)
    return IGAMObjective("igr", build_matching(cfg, spec, device, use_teacher=False), cfg.igam_start)
