"""IGAM (paper 4.2, Algorithm 1) and its control as objectives of the one training loop.

    igam   CE + lambda_adv L_adv + lambda_diff L_diff against a fine-tuned robust teacher (eq. 14)
    igr    the control with J_t = 0: CE + lambda_diff ||J_s||^2 (input-gradient regularisation; a teacher,
           if given, only sets the scale of lambda_diff=auto so the two are comparable)

Before `igam_start` the objective is plain cross-entropy (the official code trains 87.5% of its steps
that way). The method itself, and the discriminator's training, live in igam.method.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.data import resolve_augment
from igam.errors import IgamError, suggest
from igam.method.discriminator import GradientDiscriminator
from igam.method.matching import InputGradientMatching
from igam.method.teacher_cache import teacher_cache_blockers
from igam.objectives.base import Metrics, Objective, Passes, count, register_keys, register_objective
from igam.registry import PRESETS, Key, add_check
from igam.teachers import frozen_teacher
from igam.units import at_least, check_start, in_range, non_negative, parse_fraction, start_step
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


def build_matching(cfg: Any, spec: Any, device: torch.device, use_teacher: bool = True,
                   lambda_adv: float | None = None, include_ce: bool = True) -> InputGradientMatching:
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
    lambda_adv = cfg.lambda_adv if lambda_adv is None else lambda_adv
    if use_teacher and lambda_adv != 0:
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
        lambda_adv=lambda_adv if use_teacher else 0.0,
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
        diff_loss=cfg.diff_loss,
        include_ce=include_ce,
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


FD_STEP_MIN = 1e-6  # below this the finite-difference step is lost in float32 rounding


def _lambda_diff(value: str, key: str) -> None:
    if str(value).strip() != "auto" and parse_fraction(value, key) < 0:
        raise IgamError(f"{key}={value} must not be negative (a negative weight would reward gradients "
                        "unlike the teacher's); give a number >= 0 or auto.")


def _pixel_scale(value: float, key: str) -> None:
    if value == 0:
        raise IgamError("pixel_scale=0 divides every input gradient by 0, so every IGAM step would be "
                        "skipped; use 1 (inputs in [0, 1]) or 255 (the official code's 0-255 pixels).")
    non_negative(value, key)


def _fd_step(value: float, key: str) -> None:
    if value < FD_STEP_MIN:
        raise IgamError(f"fd_step={value:g} is below {FD_STEP_MIN:g}: the finite-difference step vanishes in "
                        "float32, so every finite-difference IGAM step would be skipped (0/0). Use e.g. "
                        "fd_step=1e-2 (the default) or 1e-3.")
    if value > 1:
        raise IgamError(f"fd_step={value:g} is more than 1: the step is relative to ||x|| / ||v||, so the "
                        "difference would probe images far from x. Choose a value in [1e-06, 1] (typical: "
                        "1e-2 central, 1e-3 forward).")


def _preset(value: str, key: str) -> None:
    if value and value not in PRESETS:
        raise IgamError(f"preset={value!r} is not allowed.{suggest(value, list(PRESETS))} Choose "
                        f"{' or '.join(PRESETS)} (or leave it empty).")


# the input-gradient matching keys: IGAM's, igr's, and the gradient teacher term's (objectives/terms.py)
MATCHING_KEYS = (
    Key("lambda_diff", "auto", "weight of L_diff (eq. 13: ||J_s - J_t||^2, or 1 - cos(J_s, J_t) with "
        "diff_loss=cos); 'auto' scales it to lambda_diff_auto / E||J_t||^2 on the first batch (cos: "
        "lambda_diff_auto itself)", "igam", check=_lambda_diff),
    Key("lambda_diff_auto", 2.3, "target of lambda_diff=auto: lambda_diff * E||J_t||^2", "igam",
        check=non_negative),
    Key("diff_loss", "l2", "L_diff per example: l2 (||J_s - J_t||^2, paper eq. 13) | cos (1 - cos(J_s, J_t), "
        "the direction only: perceptually aligned gradients, Ganz et al. 2023)", "igam", ("l2", "cos")),
    Key("gradient_target", "ce", "differentiate the cross-entropy (paper eq. 8) or the true-class "
        "probability p_y (official code)", "igam", ("ce", "true-prob")),
    Key("pixel_scale", 1.0, "gradients taken w.r.t. x * pixel_scale (official code: 255)", "igam",
        check=_pixel_scale),
    Key("diff_reduction", "mean", "L_diff over the batch: mean (paper) | sum (official)", "igam",
        ("mean", "sum")),
    Key("grad_matching", "exact", "student gradient of the matching terms: exact (double backprop) | "
        "finite-difference (Hessian-vector product from first-order passes)", "igam",
        ("exact", "finite-difference")),
    Key("fd_step", 1e-2, "finite-difference step h relative to ||x|| / ||v||", "igam", check=_fd_step),
    Key("fd_scheme", "central", "finite-difference scheme: central (two extra passes, error O(h^2)) | "
        "forward (one extra pass reusing the pass at x, error O(h); use fd_step=1e-3)", "igam",
        ("central", "forward")),
    Key("amp_input_grad", False, "run the IGAM input-gradient path under amp too (exact mode; default: it "
        "stays float32)", "igam"),
    Key("double_backward", "lean", "exact mode's double backward through the student's convolutions and "
        "train-mode BatchNorm: lean (the same derivatives from leaner kernels; docs/IGAM.md) | torch "
        "(PyTorch's own formulas); equal up to float rounding", "igam", ("lean", "torch")),
    Key("teacher_cache", "auto", "compute the teacher's input gradient (or features) of each training image "
        "once and reuse it: auto (on exactly when exact: augment none, noise 0, teacher_bn eval, no random "
        "adapter) | on (refused where it would be wrong) | off", "igam", ("auto", "on", "off")),
)
DISCRIMINATOR_KEYS = (
    Key("preset", "", "paper | official: sets the gradient target, scaling, discriminator input and schedule "
        "of IGAM (see docs/IGAM.md)", "igam", check=_preset),
    Key("lambda_adv", 1.0, "weight of the adversarial discriminator loss L_adv (eq. 14)", "igam",
        check=non_negative),
    Key("disc_input_norm", "none", "gradient normalisation before the discriminator: none | zero-mean-l2 "
        "(official)", "igam", ("none", "zero-mean-l2")),
    Key("adv_loss", "saturating", "student's adversarial loss: saturating (minimax, eq. 14; the default, "
        "measured better in docs/RESULTS.md) | non-saturating (GAN trick)", "igam",
        ("saturating", "non-saturating")),
    Key("disc_layers", 4, "discriminator conv layers (Appendix A: 4 or 5)", "igam",
        check=in_range(1, 8, "each layer halves the gradient map and doubles the channels")),
    Key("disc_channels", 8, "discriminator channels of the first layer, doubled per layer (8 or 16)", "igam",
        check=in_range(1, 1024, "channels of the discriminator's first layer")),
    Key("disc_every", 5, "discriminator update every k student steps", "igam", check=at_least(1)),
    Key("disc_lr", 0.0, "discriminator learning rate (0: the student's lr and schedule)", "igam",
        check=non_negative),
    Key("disc_optimizer", "sgd", "sgd | adam", "igam", ("sgd", "adam")),
    Key("igam_start", "0", "when the IGAM terms switch on: a step (1000), an epoch (5ep) or a fraction of "
        "training (0.875 = official); plain cross-entropy before", "igam", check=check_start),
)
register_keys(*MATCHING_KEYS)

# IGAM presets (docs/IGAM.md): what each sets unless the key is given explicitly.
PRESETS.update({
    # the paper's equations 8-14: CE input gradients on [0,1] pixels, per-example mean L_diff, raw gradients
    # to the discriminator, minimax L_adv, eval-mode teacher, IGAM from the first step
    "paper": {"gradient_target": "ce", "pixel_scale": 1.0, "diff_reduction": "mean",
              "disc_input_norm": "none", "adv_loss": "saturating", "teacher_bn": "eval", "igam_start": "0"},
    # the released TF1 code: true-class-probability gradients on 0-255 pixels, batch-summed L_diff,
    # zero-mean unit-L2 maps to the discriminator, minimax L_adv at weight lambda_adv/2, train-mode
    # BatchNorm in the teacher, IGAM only for the last 12.5% of training, +-2 px crops
    "official": {"gradient_target": "true-prob", "pixel_scale": 255.0, "diff_reduction": "sum",
                 "disc_input_norm": "zero-mean-l2", "adv_loss": "saturating", "teacher_bn": "train",
                 "igam_start": "0.875", "crop_padding": 2},
})


@add_check
def _discriminator_size(cfg: Any) -> None:
    last = cfg.disc_channels * 2 ** (cfg.disc_layers - 1)
    if last > 8192:
        raise IgamError(f"disc_channels={cfg.disc_channels} doubled over disc_layers={cfg.disc_layers} gives "
                        f"{last} channels in the last layer (at most 8192); lower one of them (Appendix A: 5 "
                        "layers of 16 channels).")


@add_check
def _amp_input_grad(cfg: Any) -> None:
    if cfg.amp_input_grad and cfg.amp != "bf16":
        raise IgamError("amp_input_grad=true runs the input-gradient path under amp=bf16; set amp=bf16 (fp16 "
                        "would need loss scaling inside the input gradient) or drop amp_input_grad.")


def check_matching(cfg: Any) -> None:
    """The matching keys that do not fit together (for igam, igr and the gradient teacher term).

    Raises:
        IgamError: lambda_diff=auto with gradient_target=true-prob.
    """
    if cfg.lambda_diff == "auto" and cfg.gradient_target == "true-prob" and cfg.diff_loss == "l2":
        raise IgamError(
            "lambda_diff=auto does not work with gradient_target=true-prob (set by preset=official): "
            "true-class-probability gradients vanish on confidently classified images, so a weight fixed "
            "on the first batch blows up later (measured: the student collapsed to chance, docs/RESULTS.md). "
            "Give lambda_diff a number, e.g. Appendix A's lambda_diff=100 for MNIST -> CIFAR-10, "
            "or use gradient_target=ce.")


def _check_igr(cfg: Any) -> None:
    check_matching(cfg)
    if cfg.diff_loss == "cos":
        raise IgamError("diff_loss=cos matches the direction of J_s to J_t; igr has J_t = 0, which has no "
                        "direction (1 - cos(J_s, 0) is constant). Use diff_loss=l2 with igr, or method=igam "
                        "for the cosine term.")


def igam_cost(base: float):
    """A step's cost relative to standard training, with plain CE before igam_start."""

    def cost(cfg: Any) -> float:
        start = cfg.igam_start.strip()
        frac = float(start) if re.fullmatch(r"0?\.\d+", start) else 0.0
        return frac + (1 - frac) * base

    return cost


MATCHING = tuple(k.name for k in MATCHING_KEYS)
SUMMARY = ("lambda_adv", "lambda_diff", "lambda_diff_auto", "diff_loss", "preset", "grad_matching",
           "igam_start")


@register_objective("igam", help="IGAM (paper eqs. 7-14): CE + lambda_adv L_adv + lambda_diff L_diff from a "
                    "fine-tuned teacher (diff_loss=cos: the gradient direction only)",
                    reads=("teacher", "igam"), summary=SUMMARY, cost=igam_cost(3.5), check=check_matching,
                    keys=DISCRIMINATOR_KEYS)
def make_igam(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> IGAMObjective:
    if cfg.grad_matching == "exact":
        check_double_backward(model, spec.shape, device)
    return IGAMObjective("igam", build_matching(cfg, spec, device, use_teacher=True), cfg.igam_start)


@register_objective("igr", help="input-gradient regularisation, IGAM's J_t = 0 control: CE + lambda_diff "
                    "||J_s||^2 (smooth students: activation=gelu)",
                    reads=("teacher", *MATCHING, "igam_start"), summary=SUMMARY, cost=igam_cost(3.0),
                    check=_check_igr)
def make_igr(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> IGAMObjective:
    if cfg.grad_matching == "exact":
        check_double_backward(model, spec.shape, device)
    return IGAMObjective("igr", build_matching(cfg, spec, device, use_teacher=False), cfg.igam_start)
