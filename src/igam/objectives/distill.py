"""Robust distillation at adversarial-training price: the student trains on its own adversarial examples,
matched to a robust teacher's soft labels on the clean images (docs/METHODS.md).

    ard    Goldblum, Fowl, Feizi & Goldstein, "Adversarially robust distillation", AAAI 2020:
           x' = PGD-k on the student's CE (random start), then
           loss = ard_alpha T^2 KL(softmax(f_t(x)/T) || softmax(f_s(x')/T)) + (1 - ard_alpha) CE(f_s(x), y)
           (T = ard_temperature; the authors' code: alpha 1, T 30)
    rslad  Zi, Zhao, Ma & Jiang, "Revisiting adversarial robustness distillation: robust soft labels make
           student better", ICCV 2021: x' = PGD-k maximising KL(f_t(x) || f_s(x')) from x + 0.001 N(0, 1),
           then loss = rslad_alpha KL(f_t(x) || f_s(x')) + (1 - rslad_alpha) KL(f_t(x) || f_s(x))
           (soft labels only, temperature 1; the paper's alpha 5/6)

f_t is the fine-tuned teacher (its head trained on the target task), frozen, at the clean x; its logits are
cached per training image when the inputs do not change between epochs. KL is averaged over the batch
(the authors' code averages over batch x classes, i.e. divides by the number of classes as well, a constant
factor on the learning rate). `steps=1 step_size=1.25*eps` makes the attack FGSM-RS (fast AT's): the
distillation at fast AT's price.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks.base import generator_for, project
from igam.objectives.base import Metrics, Passes, count, register_objective
from igam.objectives.igam import teacher_cache_decision
from igam.objectives.pgd_at import PGDAT, attack_budget
from igam.objectives.terms import SoftLabels, fine_tuned_teacher, soft_label_kl
from igam.registry import Key
from igam.units import in_range, positive
from igam.utils import bn_mode, unwrap


class ARD(PGDAT):
    """Adversarially robust distillation: the PGD-k points of the student's own CE, distilled from the
    teacher's soft labels at the clean images (plus (1 - alpha) CE at x)."""

    name = "ard"

    def __init__(
        self,
        soft: SoftLabels,
        alpha: float,
        eps: float,
        step_size: float,
        steps: int,
        random_start: bool = True,
        attack_bn: str = "eval",
        seed: int = 0,
        eps_warmup_epochs: float = 0.0,
    ):
        super().__init__(eps, step_size, steps, random_start, attack_bn, seed, eps_warmup_epochs)
        self.soft, self.alpha = soft, float(alpha)

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        return self.soft.needs_index

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        super().begin(total_steps, steps_per_epoch, rank)
        self.soft.begin(total_steps, steps_per_epoch, rank)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Metrics, None]:
        x_adv = self.attack(model, x, y, step)
        logits_adv = model(x_adv)
        kl = soft_label_kl(logits_adv, self.soft.teacher_logits(x, y, index), self.soft.temperature)
        metrics = {
            "distill_kl": kl.detach(),
            "adv_acc": (logits_adv.argmax(1) == y).float().mean(),
            **self.ramp_metrics(step, x.device),
        }
        loss = self.alpha * kl
        if self.alpha < 1:
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            loss = loss + (1 - self.alpha) * ce
            metrics.update(ce=ce.detach(), acc=(logits.argmax(1) == y).float().mean())
        return loss, metrics, None

    def own_passes(self, step: int) -> Passes:
        """PGD-k on the student (k forwards and backwards), the loss at x' (one of each) and, with alpha < 1,
        at x (one more of each); the teacher's forward at x (first epoch only with the cache)."""
        n = self.steps + 1 + (self.alpha < 1)
        return {"student": count(n, n), **self.soft.passes(step)}


class RSLAD(PGDAT):
    """Robust soft label adversarial distillation: the PGD-k points that maximise the student's KL from the
    teacher's soft labels, and a loss of soft labels only."""

    name = "rslad"

    def __init__(
        self,
        soft: SoftLabels,
        alpha: float,
        eps: float,
        step_size: float,
        steps: int,
        attack_bn: str = "eval",
        seed: int = 0,
        eps_warmup_epochs: float = 0.0,
    ):
        super().__init__(eps, step_size, steps, True, attack_bn, seed, eps_warmup_epochs)
        self.soft, self.alpha = soft, float(alpha)

    @property
    def needs_index(self) -> bool:  # type: ignore[override]
        return self.soft.needs_index

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        super().begin(total_steps, steps_per_epoch, rank)
        self.soft.begin(total_steps, steps_per_epoch, rank)

    def kl_attack(
        self, model: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, step: int
    ) -> torch.Tensor:
        """x' maximising sum_i KL(f_t(x_i) || f_s(x'_i)) by PGD-k from x + 0.001 N(0, 1), projected to the
        eps-ball and [0, 1] (on the unwrapped student, attack_bn mode; no parameter gradients)."""
        net = unwrap(model)
        eps, step_size = self.budget(step)
        gen = generator_for(self.step_seed(step), x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        log_pt = F.log_softmax(teacher_logits, 1)
        x_adv = project(x + 0.001 * noise, x, eps)
        with bn_mode(net, self.attack_bn), torch.enable_grad():
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                kl = F.kl_div(F.log_softmax(net(x_adv).float(), 1), log_pt, reduction="sum", log_target=True)
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
        return x_adv.detach()

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Metrics, None]:
        t_logits = self.soft.teacher_logits(x, y, index)
        x_adv = self.kl_attack(model, x, t_logits, step)
        logits_adv, logits = model(x_adv), model(x)
        kl_adv = soft_label_kl(logits_adv, t_logits, 1.0)
        kl_nat = soft_label_kl(logits, t_logits, 1.0)
        loss = self.alpha * kl_adv + (1 - self.alpha) * kl_nat
        return (
            loss,
            {
                "distill_kl": kl_adv.detach(),
                "distill_kl_clean": kl_nat.detach(),
                "acc": (logits.argmax(1) == y).float().mean(),
                "adv_acc": (logits_adv.argmax(1) == y).float().mean(),
                **self.ramp_metrics(step, x.device),
            },
            None,
        )

    def own_passes(self, step: int) -> Passes:
        """The KL attack (k forwards and backwards), the loss at x' and at x (two of each); the teacher's
        forward at x (first epoch only with the cache)."""
        return {"student": count(self.steps + 2, self.steps + 2), **self.soft.passes(step)}


def _soft(cfg: Any, spec: Any, device: torch.device, temperature: float) -> SoftLabels:
    teacher = fine_tuned_teacher(cfg, spec, device)
    return SoftLabels(teacher, 1.0, temperature, teacher_cache_decision(cfg, spec, teacher)[0])


DISTILL_READS = ("teacher", "teacher_cache", "step_size", "steps", "attack_bn", "eps_warmup_epochs")


@register_objective(
    "ard",
    help="adversarially robust distillation (Goldblum et al. 2020): the student's PGD-`steps` points "
    "matched to the teacher's soft labels at ard_temperature (+ (1 - ard_alpha) CE)",
    reads=(*DISTILL_READS, "random_start", "ard_alpha", "ard_temperature"),
    summary=("eps", "steps", "ard_alpha", "ard_temperature"),
    adversarial=True,
    cost=lambda cfg: cfg.steps + 1.3 + (cfg.ard_alpha < 1),
    keys=(
        Key(
            "ard_alpha",
            1.0,
            "ard: weight of the distillation term; 1 - ard_alpha weighs CE at x (the authors' code: 1)",
            "distill",
            check=in_range(0, 1),
        ),
        Key(
            "ard_temperature",
            30.0,
            "ard: softmax temperature T of the soft labels (the authors' code: 30)",
            "distill",
            check=positive,
        ),
    ),
)
def make_ard(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> ARD:
    eps, step = attack_budget(cfg)
    return ARD(
        _soft(cfg, spec, device, cfg.ard_temperature),
        cfg.ard_alpha,
        eps,
        step,
        int(cfg.steps),
        bool(cfg.random_start),
        cfg.attack_bn,
        int(cfg.seed),
        float(cfg.eps_warmup_epochs),
    )


@register_objective(
    "rslad",
    help="robust soft label adversarial distillation (Zi et al. 2021): PGD-`steps` on the KL to the "
    "teacher's soft labels, loss rslad_alpha KL(x') + (1 - rslad_alpha) KL(x)",
    reads=(*DISTILL_READS, "rslad_alpha"),
    summary=("eps", "steps", "rslad_alpha"),
    adversarial=True,
    cost=lambda cfg: cfg.steps + 2.3,
    keys=(
        Key(
            "rslad_alpha",
            5 / 6,
            "rslad: weight of the KL at the adversarial points (the paper: 5/6)",
            "distill",
            check=in_range(0, 1),
        ),
    ),
)
def make_rslad(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> RSLAD:
    eps, step = attack_budget(cfg)
    return RSLAD(
        _soft(cfg, spec, device, 1.0),
        cfg.rslad_alpha,
        eps,
        step,
        int(cfg.steps),
        cfg.attack_bn,
        int(cfg.seed),
        float(cfg.eps_warmup_epochs),
    )
