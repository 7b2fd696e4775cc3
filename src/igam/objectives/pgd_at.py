"""Adversarial training objectives: PGD-AT (Madry et al., ICLR 2018) and TRADES (Zhang et al., ICML 2019),
and `AttackTraining`, the base they share with the cheap ones (objectives/cheap_at.py).

Both craft the attack on the unwrapped network (no DDP hooks, no parameter gradients: the attack takes
gradients w.r.t. the input only), with BatchNorm in cfg.attack_bn mode (eval: running statistics), and
then compute the training loss through the (maybe DDP-wrapped) model in train mode. Random starts come
from (cfg.seed, step, rank), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import abc

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks import PGD
from igam.attacks.base import generator_for, project
from igam.errors import IgamError
from igam.objectives.base import Metrics, Objective, Passes, count, register_objective
from igam.objectives.terms import build_term, term_cost, term_reads
from igam.registry import Key
from igam.units import check_eps, non_negative
from igam.utils import bn_mode, mix_seed, unwrap


class AttackTraining(Objective, metaclass=abc.ABCMeta):
    """The common part of adversarial-training objectives (pgd-at, trades, fast-at, n-fgsm, free-at): the
    L-inf budget eps with its optional linear ramp over eps_warmup_epochs, the BatchNorm mode of the
    attack, and a random stream per (seed, step, rank), so a resumed run draws exactly what an
    uninterrupted one would. Subclasses implement `attack(model, x, y, step)`; the default loss trains on
    its points (the outer minimisation of Madry et al.)."""

    name = "attack-training"

    def __init__(self, eps: float, step_size: float, attack_bn: str = "eval", seed: int = 0,
                 eps_warmup_epochs: float = 0.0):
        super().__init__()
        self.eps, self.step_size, self.attack_bn, self.seed = eps, step_size, attack_bn, seed
        self.eps_warmup_epochs, self.ramp_steps, self.rank = eps_warmup_epochs, 0, 0

    def begin(self, total_steps: int, steps_per_epoch: int, rank: int = 0) -> None:
        super().begin(total_steps, steps_per_epoch, rank)
        self.ramp_steps = int(round(self.eps_warmup_epochs * steps_per_epoch))
        self.rank = rank

    def step_seed(self, step: int) -> int:
        """The seed of this step's random draws (per seed, step and rank: a resumed run draws the same)."""
        return mix_seed(self.seed, step, stride=8191, offset=17, rank=self.rank)

    def budget(self, step: int) -> tuple[float, float]:
        """(eps, step size) at this step: a linear ramp from 0 over eps_warmup_epochs, then the full one."""
        f = min(1.0, (step + 1) / self.ramp_steps) if self.ramp_steps > 0 else 1.0
        return self.eps * f, self.step_size * f

    def ramp_metrics(self, step: int, device: torch.device) -> Metrics:
        return {"train_eps": torch.tensor(self.budget(step)[0], device=device)} if self.ramp_steps > 0 else {}

    @abc.abstractmethod
    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """The points the model trains on at this step (detached, in [0, 1]); each method defines it."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics, None]:
        x_adv = self.attack(model, x, y, step)
        logits = model(x_adv)
        ce = F.cross_entropy(logits, y)
        metrics = {"ce": ce.detach(), "adv_acc": (logits.argmax(1) == y).float().mean(),
                   **self.ramp_metrics(step, x.device)}
        return *self.add_term(ce, metrics, model, x, y, step, index, x_train=x_adv, logits=logits), None


class PGDAT(AttackTraining):
    """min_theta E max_{||delta||_inf <= eps} CE(f(x + delta), y): the inner max by PGD-k with a random
    start (Madry et al. 2018: MNIST eps 0.3, 40 steps of 0.01; CIFAR eps 8/255, 7 steps of 2/255), the
    outer on the last PGD iterate."""

    name = "pgd-at"

    def __init__(self, eps: float, step_size: float, steps: int, random_start: bool = True,
                 attack_bn: str = "eval", seed: int = 0, eps_warmup_epochs: float = 0.0):
        super().__init__(eps, step_size, attack_bn, seed, eps_warmup_epochs)
        if steps < 1:
            raise IgamError(f"method={self.name} needs steps >= 1 (got {steps}); Madry et al. use 40 "
                            "(MNIST), 7 (CIFAR).")
        if eps > 0 and step_size == 0:
            raise IgamError(f"method={self.name} needs step_size > 0; e.g. step_size=2/255 (CIFAR) or 0.01 "
                            "(MNIST).")
        self.steps, self.random_start = steps, random_start

    def own_passes(self, step: int) -> Passes:
        """PGD-k: k forwards and backwards (input gradients) for the attack, one of each to train."""
        return {"student": count(self.steps + 1, self.steps + 1)}

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """The PGD points the model trains on (crafted on the unwrapped model; no parameter gradients)."""
        eps, step_size = self.budget(step)
        pgd = PGD(unwrap(model), eps, step_size, self.steps, random_start=self.random_start,
                  keep_best=False, bn=self.attack_bn, seed=self.seed)
        return pgd(x, y, seed=self.step_seed(step))


class TRADES(PGDAT):
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL by PGD from x + 0.001 N(0, 1)
    (Zhang et al. 2019, official code: eval-mode attack, KL summed then divided by the batch)."""

    name = "trades"

    def __init__(self, eps: float, step_size: float, steps: int, beta: float = 6.0, attack_bn: str = "eval",
                 seed: int = 0, eps_warmup_epochs: float = 0.0):
        super().__init__(eps, step_size, steps, True, attack_bn, seed, eps_warmup_epochs)
        if beta < 0:
            raise IgamError(f"trades_beta={beta} must not be negative (Zhang et al. use 6).")
        self.beta = beta

    def own_passes(self, step: int) -> Passes:
        """TRADES-k: a forward for p(x), k forwards and backwards for the KL attack, then the loss at x and
        at x' (two forwards, two backwards)."""
        return {"student": count(self.steps + 3, self.steps + 2)}

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        net = unwrap(model)
        eps, step_size = self.budget(step)
        gen = generator_for(self.step_seed(step), x.device)
        with bn_mode(net, self.attack_bn), torch.enable_grad():
            with torch.no_grad():
                p_clean = F.softmax(net(x), 1)
            noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x_adv = project(x + 0.001 * noise, x, eps)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                kl = F.kl_div(F.log_softmax(net(x_adv), 1), p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
        return x_adv.detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics, None]:
        x_adv = self.attack(model, x, y, step)
        logits = model(x)
        logits_adv = model(x_adv)
        ce = F.cross_entropy(logits, y)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="sum") / len(x)
        metrics = {"ce": ce.detach(), "kl": kl.detach(), "acc": (logits.argmax(1) == y).float().mean(),
                   "adv_acc": (logits_adv.argmax(1) == y).float().mean(), **self.ramp_metrics(step, x.device)}
        return *self.add_term(ce + self.beta * kl, metrics, model, x, y, step, index, x_train=x_adv,
                              logits=logits_adv), None


def attack_budget(cfg) -> tuple[float, float]:
    return check_eps(cfg.eps, "eps"), check_eps(cfg.step_size, "step_size")


ATTACK_KEYS = ("step_size", "steps", "random_start", "eps_warmup_epochs", "attack_bn")


def adversarial_reads(*own: str):
    """`reads` of an adversarial method: its own keys, the eps ramp, and a teacher term's keys when
    teacher_term is set (igam.objectives.terms.term_reads)."""
    def reads(cfg) -> tuple[str, ...]:
        return (*own, "eps_warmup_epochs", "teacher_term", *term_reads(cfg))

    return reads


def with_teacher_term(objective, cfg, model: nn.Module, spec, device: torch.device):
    """The objective with the teacher term cfg.teacher_term names added (none: as it is)."""
    return objective.with_term(build_term(cfg, model, spec, device))


def pgd_cost(cfg) -> float:
    return cfg.steps + 1.0 + term_cost(cfg)


@register_objective(
    "pgd-at", help="PGD adversarial training (Madry et al. 2018): PGD-`steps` of `step_size` within `eps`",
    reads=adversarial_reads("step_size", "steps", "random_start", "attack_bn"), summary=("eps", "steps"),
    adversarial=True, cost=pgd_cost)
def make_pgd_at(cfg, model: nn.Module, spec, device: torch.device) -> PGDAT:
    eps, step = attack_budget(cfg)
    return with_teacher_term(PGDAT(eps, step, int(cfg.steps), bool(cfg.random_start), cfg.attack_bn,
                                   int(cfg.seed), float(cfg.eps_warmup_epochs)), cfg, model, spec, device)


@register_objective(
    "trades", help="TRADES (Zhang et al. 2019): CE + trades_beta KL(f(x) || f(x')), x' by PGD on the KL",
    reads=adversarial_reads("step_size", "steps", "attack_bn", "trades_beta"),
    summary=("eps", "steps", "trades_beta"), adversarial=True, cost=lambda cfg: pgd_cost(cfg) + 1.0,
    keys=(Key("trades_beta", 6.0, "TRADES robustness weight (Zhang et al.: 6)", "attack",
              check=non_negative),))
def make_trades(cfg, model: nn.Module, spec, device: torch.device) -> TRADES:
    eps, step = attack_budget(cfg)
    return with_teacher_term(TRADES(eps, step, int(cfg.steps), float(cfg.trades_beta), cfg.attack_bn,
                                    int(cfg.seed), float(cfg.eps_warmup_epochs)), cfg, model, spec, device)
