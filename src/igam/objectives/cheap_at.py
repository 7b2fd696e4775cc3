"""Cheap adversarial training: one input gradient per step instead of PGD's k (docs/METHODS.md).

    fast-at  FGSM from a uniform random start, step alpha = 1.25 eps, projected to the eps-ball
             (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020)
    n-fgsm   FGSM of step eps from x + U(-k eps, k eps), k = 2, NOT projected to the eps-ball
             (de Jorge et al., "Make some noise", NeurIPS 2022)
    free-at  every minibatch trained on m times in a row; one backward per replay gives the weights'
             gradient and the perturbation's, which is carried over between replays and minibatches
             (Shafahi et al., "Adversarial training for free!", NeurIPS 2019)

They share `AttackTraining` with pgd-at and trades (objectives/pgd_at.py): the eps ramp
(eps_warmup_epochs), the BatchNorm mode of the attack (attack_bn; free-at has no separate attack pass) and
the random stream per (seed, step, rank) that makes a resumed run bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks.base import generator_for
from igam.errors import IgamError
from igam.objectives.base import Metrics, Passes, count, register_objective
from igam.objectives.pgd_at import PGDAT, AttackTraining, adversarial_reads, with_teacher_term
from igam.objectives.terms import term_cost
from igam.registry import Key
from igam.units import check_eps, in_range, non_negative
from igam.utils import bn_mode, unwrap


class FastAT(PGDAT):
    """Fast adversarial training (Wong et al. 2020): delta_0 ~ U(-eps, eps)^d (clipped to the image box),
    delta = clip_[-eps, eps](delta_0 + alpha sign grad_x CE(f(x + delta_0), y)), alpha = 1.25 eps, then
    one step of min_theta CE(f(x + delta), y). PGD-1 with a random start, so the attack is igam's PGD."""

    name = "fast-at"

    def __init__(self, eps: float, alpha: float, attack_bn: str = "eval", seed: int = 0,
                 eps_warmup_epochs: float = 0.0):
        super().__init__(eps, alpha, 1, True, attack_bn, seed, eps_warmup_epochs)


class NFGSM(AttackTraining):
    """N-FGSM (de Jorge et al. 2022): x_0 = clip_[0,1](x + eta), eta ~ U(-k eps, k eps)^d, then
    x' = clip_[0,1](x_0 + alpha sign grad_x CE(f(x_0), y)), alpha = eps: no projection to the eps-ball,
    so ||x' - x||_inf can reach (k + 1) eps (the larger noise, not the projection, is what avoids
    catastrophic overfitting). One step of min_theta CE(f(x'), y)."""

    name = "n-fgsm"

    def __init__(self, eps: float, noise: float = 2.0, attack_bn: str = "eval", seed: int = 0,
                 eps_warmup_epochs: float = 0.0):
        super().__init__(eps, eps, attack_bn, seed, eps_warmup_epochs)
        if noise < 0:
            raise IgamError(f"nfgsm_noise={noise} must not be negative (de Jorge et al. use 2: noise "
                            "U(-2 eps, 2 eps)).")
        self.noise = float(noise)

    def own_passes(self, step: int) -> Passes:
        """One forward and backward for the FGSM gradient, one of each to train."""
        return {"student": count(2, 2)}

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """The N-FGSM points (on the unwrapped model, in attack_bn mode; no parameter gradients)."""
        eps, alpha = self.budget(step)
        net = unwrap(model)
        gen = generator_for(self.step_seed(step), x.device)
        eta = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
        x0 = (x + self.noise * eps * eta).clamp_(0.0, 1.0).requires_grad_(True)
        with bn_mode(net, self.attack_bn), torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(net(x0), y, reduction="sum"), x0)
        return (x0.detach() + alpha * grad.sign()).clamp_(0.0, 1.0)


class FreeAT(AttackTraining):
    """Free adversarial training (Shafahi et al. 2019, Algorithm 1). The loop trains on every minibatch
    `replays` = m steps in a row (`Objective.replays`); each step is one forward and one backward of
    CE(f(clip_[0,1](x + delta)), y), whose gradient updates the weights (the loop's optimiser step) and,
    in `after_step`, the perturbation: delta <- clip_[-eps, eps](delta + eps sign grad_delta). delta
    starts at 0 and is carried over between replays and to the next minibatch, and saved with checkpoints.

    `epochs` counts gradient computations as the paper's N_ep does: a run of epochs=E takes E x (batches
    per epoch) steps, i.e. E / m passes over the data, the cost of E epochs of standard training; the
    learning-rate schedule, evaluations and checkpoints run in those epochs."""

    name = "free-at"

    def __init__(self, eps: float, replays: int = 4, seed: int = 0, eps_warmup_epochs: float = 0.0):
        super().__init__(eps, eps, "train", seed, eps_warmup_epochs)
        if replays < 1:
            raise IgamError(f"free_replays={replays} must be at least 1 (Shafahi et al. use m = 8 on CIFAR, "
                            "4 on ImageNet; 1 is standard training with a carried perturbation).")
        self.replays = int(replays)
        self.delta: torch.Tensor | None = None  # the carried perturbation (B, C, H, W)

    def own_passes(self, step: int) -> Passes:
        """One forward and one backward per step: the backward gives the perturbation's gradient too."""
        return {"student": count(1, 1)}

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """The points this step trains on: x plus the carried perturbation, clipped to [0, 1] (detached)."""
        delta = self.delta if self.delta is not None and self.delta.shape == x.shape else torch.zeros_like(x)
        return (x + delta.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0).detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics, torch.Tensor]:
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        delta = self.delta.to(device=x.device, dtype=x.dtype).requires_grad_(True)
        x_adv = (x + delta).clamp(0.0, 1.0)
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y)
        metrics = {"ce": ce.detach(), "adv_acc": (logits.argmax(1) == y).float().mean(),
                   **self.ramp_metrics(step, x.device)}
        return *self.add_term(ce, metrics, model, x, y, step, index, x_train=x_adv, logits=logits), delta

    def after_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, aux: Any) -> Metrics:
        """The perturbation's ascent step from the gradient the loop's backward left on it (entries whose
        gradient is not finite, e.g. an fp16 overflow the loss scaler skips, are left where they are)."""
        if aux is not None and aux.grad is not None:
            eps = self.budget(step)[0]
            g = aux.grad
            direction = torch.where(torch.isfinite(g), g.sign(), torch.zeros_like(g))
            self.delta = (aux.detach() + eps * direction).clamp_(-eps, eps)
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {"free_delta": self.delta.detach().cpu()} if self.delta is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        delta = state.get("free_delta")
        self.delta = delta.clone() if delta is not None else None


def _eps(cfg: Any, method: str) -> float:
    eps = check_eps(cfg.eps, "eps")
    if eps <= 0:
        raise IgamError(f"method={method} needs eps > 0 (e.g. eps=8/255 on CIFAR, eps=0.3 on MNIST).")
    return eps


def _free_notes(cfg: Any) -> list[str]:
    """free-at counts epochs in gradient steps: a run shorter than free_replays epochs misses images."""
    if cfg.epochs >= cfg.free_replays:
        return []
    return [f"free-at counts epochs in gradient steps and replays each batch free_replays={cfg.free_replays} "
            f"times, so epochs={cfg.epochs:g} passes over only {100 * cfg.epochs / cfg.free_replays:.0f}% of "
            f"the training images; give epochs >= {cfg.free_replays} to see each image at least once "
            "(Shafahi et al. train m times fewer passes for the same steps)."]


@register_objective(
    "fast-at", help="fast AT (Wong et al. 2020): FGSM from a random start, step fast_alpha (1.25 eps), "
    "projected",
    reads=adversarial_reads("attack_bn", "fast_alpha"), summary=("eps", "fast_alpha"), adversarial=True,
    cost=lambda cfg: 2.0 + term_cost(cfg),
    keys=(Key("fast_alpha", "0", "fast-at: FGSM step size (0: 1.25 eps, Wong et al.)", "attack",
              check=check_eps),))
def make_fast_at(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> FastAT:
    eps = _eps(cfg, "fast-at")
    alpha = check_eps(cfg.fast_alpha, "fast_alpha") if str(cfg.fast_alpha).strip() not in ("", "0") \
        else 1.25 * eps
    if alpha <= 0:
        raise IgamError(f"fast_alpha={cfg.fast_alpha} must be positive (Wong et al.: 1.25 eps, which 0 "
                        "selects).")
    return with_teacher_term(FastAT(eps, alpha, cfg.attack_bn, int(cfg.seed), float(cfg.eps_warmup_epochs)),
                             cfg, model, spec, device)


@register_objective(
    "n-fgsm", help="N-FGSM (de Jorge et al. 2022): FGSM of step eps from x + U(-k eps, k eps), "
    "k = nfgsm_noise, no projection", reads=adversarial_reads("attack_bn", "nfgsm_noise"),
    summary=("eps", "nfgsm_noise"),
    adversarial=True, cost=lambda cfg: 2.0 + term_cost(cfg),
    keys=(Key("nfgsm_noise", 2.0, "n-fgsm: noise U(-k eps, k eps) before the FGSM step of eps; this is k "
              "(de Jorge et al.: 2)", "attack", check=non_negative),))
def make_n_fgsm(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> NFGSM:
    return with_teacher_term(NFGSM(_eps(cfg, "n-fgsm"), float(cfg.nfgsm_noise), cfg.attack_bn, int(cfg.seed),
                                   float(cfg.eps_warmup_epochs)), cfg, model, spec, device)


@register_objective(
    "free-at", help="free AT (Shafahi et al. 2019): each batch free_replays times, the perturbation carried "
    "over; epochs count gradient steps (epochs / free_replays passes over the data)",
    reads=adversarial_reads("free_replays"), summary=("eps", "free_replays"), adversarial=True,
    cost=lambda cfg: 1.0 + term_cost(cfg), notes=_free_notes,
    keys=(Key("free_replays", 4, "free-at: steps on each minibatch in a row, m (Shafahi et al.: 8 CIFAR, 4 "
              "ImageNet); epochs still count gradient steps", "attack",
              check=in_range(1, 1000, "Shafahi et al. use 4-10")),))
def make_free_at(cfg: Any, model: nn.Module, spec: Any, device: torch.device) -> FreeAT:
    return with_teacher_term(FreeAT(_eps(cfg, "free-at"), int(cfg.free_replays), int(cfg.seed),
                                    float(cfg.eps_warmup_epochs)), cfg, model, spec, device)


__all__ = ["FastAT", "FreeAT", "NFGSM"]
