"""kd-noise: distillation from the fine-tuned teacher on Gaussian-noised inputs (docs/METHODS.md).

Srinivas & Fleuret ("Knowledge transfer with Jacobian matching", ICML 2018) show that matching the
student's input Jacobian to the teacher's is, to first order in the noise, the same as distilling the
teacher's outputs on inputs with added Gaussian noise. It is therefore the cheap, first-order baseline of
IGAM's L_diff term (eq. 13): no double backward, one teacher forward, no discriminator.

    n ~ N(0, sigma^2 I)                                   (a fresh draw per step, seeded per step and rank)
    p_t = softmax(f_t(x + n) / T),  p_s = softmax(f_s(x + n) / T)
    loss = CE(f_s(x), y) + kd_weight * T^2 * KL(p_t || p_s)   (KL averaged over the batch)

f_t is the fine-tuned teacher f_t(Ax + b) that IGAM uses (igam.teachers.frozen_teacher), frozen; the T^2
keeps the distillation gradient's scale independent of T (Hinton et al. 2015). x + n is not clipped to
[0, 1] (the noise model of the equivalence).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks.base import generator_for
from igam.errors import IgamError
from igam.objectives.base import Metrics, Objective, Passes, count, register_objective
from igam.registry import Key
from igam.teachers import frozen_teacher
from igam.units import non_negative, positive
from igam.utils import mix_seed


class KDNoise(Objective):
    """CE(f_s(x), y) + weight * T^2 * KL(softmax(f_t(x+n)/T) || softmax(f_s(x+n)/T)), n ~ N(0, sigma^2)."""

    name = "kd-noise"

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, sigma: float = 0.1, weight: float = 1.0,
                 seed: int = 0):
        super().__init__()
        if temperature <= 0:
            raise IgamError(f"kd_temperature={temperature} must be positive (Hinton et al. use 2-20; 1 is "
                            "the plain softmax).")
        if sigma < 0 or weight < 0:
            raise IgamError(f"kd_sigma={sigma} and kd_weight={weight} must not be negative.")
        self._teacher = (teacher,)  # a plain attribute: the frozen teacher is not saved with the objective
        self.temperature, self.sigma, self.weight = float(temperature), float(sigma), float(weight)
        self.seed = seed
        self.rank = 0

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        self.rank = rank

    def step_seed(self, step: int) -> int:
        """The seed of this step's noise (per seed, step and rank: a resumed run draws the same)."""
        return mix_seed(self.seed, step, stride=8191, offset=17, rank=self.rank)

    def own_passes(self, step: int) -> Passes:
        """The student at x and at x + n (two forwards, two backwards), the teacher at x + n (a forward)."""
        return {"student": count(2, 2), "teacher": count(1, 0)}

    def noisy(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """x + n, n ~ N(0, sigma^2), drawn from this step's seed."""
        gen = generator_for(self.step_seed(step), x.device)
        return x + self.sigma * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int) -> tuple[torch.Tensor, Metrics, None]:
        x_n = self.noisy(x, step)
        t = self.temperature
        with torch.no_grad():
            log_pt = F.log_softmax(self.teacher(x_n).float() / t, 1)
        logits = model(x)
        logits_n = model(x_n)
        ce = F.cross_entropy(logits, y)
        kl = F.kl_div(F.log_softmax(logits_n.float() / t, 1), log_pt, reduction="batchmean", log_target=True)
        return ce + self.weight * t * t * kl, {
            "ce": ce.detach(), "kd_kl": kl.detach(), "acc": (logits.argmax(1) == y).float().mean(),
            "noisy_acc": (logits_n.argmax(1) == y).float().mean(),
            "teacher_noisy_acc": (log_pt.argmax(1) == y).float().mean()}, None


@register_objective(
    "kd-noise", help="distillation from the fine-tuned teacher on x + N(0, kd_sigma^2) at kd_temperature "
    "(Srinivas & Fleuret 2018: Jacobian matching's first-order equivalent)",
    reads=("teacher", "kd_temperature", "kd_sigma", "kd_weight"),
    summary=("kd_temperature", "kd_sigma", "kd_weight"),
    cost=2.5,
    keys=(Key("kd_temperature", 4.0, "kd-noise: softmax temperature T (the KL is scaled by T^2)", "distill",
              check=positive),
          Key("kd_sigma", 0.1, "kd-noise: standard deviation of the Gaussian input noise, pixels in [0, 1]",
              "distill", check=non_negative),
          Key("kd_weight", 1.0, "kd-noise: weight of T^2 KL(teacher || student) on noisy inputs", "distill",
              check=non_negative)))
def make_kd_noise(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> KDNoise:
    """The kd-noise objective: cfg.teacher (a fine-tuned teacher run, as IGAM's), kd_temperature,
    kd_sigma, kd_weight.

    Raises:
        IgamError: no teacher, or one that is not fine-tuned on this task.
    """
    if not cfg.teacher:
        raise IgamError("method=kd-noise needs teacher=RUN_DIR: a robust teacher fine-tuned on this dataset "
                        "(`igam finetune teacher=ROBUST_RUN dataset=...`), as method=igam does.")
    teacher = frozen_teacher(cfg.teacher, spec.shape, spec.num_classes, cfg.teacher_bn,
                               class_names=spec.class_names, dataset=spec.dataset).to(device)
    return KDNoise(teacher, float(cfg.kd_temperature), float(cfg.kd_sigma), float(cfg.kd_weight),
                   int(cfg.seed))
