"""PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards deep learning models resistant to
adversarial attacks", ICLR 2018 (arXiv:1706.06083); with the field's usual strengthening for evaluation
(Carlini & Wagner 2017's margin loss beside cross-entropy, a decaying step as in Croce & Hein 2020's APGD,
several restarts: Carlini et al. 2019, "On evaluating adversarial robustness", sec. 4-5)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from igam.attacks.base import LOSSES, Attack, attack_loss, project
from igam.errors import IgamError
from igam.units import check_eps

SCHEDULES = ("constant", "cosine")
MIX = "mix"  # R restarts with cross-entropy and R with the CW margin loss
STRONG_PGD = "pgd100x3-mix-cos"  # igam's strongest PGD preset (attacks.presets): what igam calls "PGD"


def step_at(step_size: float, i: int, steps: int, schedule: str = "constant") -> float:
    """The step of iteration i (0-based) of `steps`: `step_size` throughout ('constant'), or cosine decay
    from `step_size` towards 0: step_size (1 + cos(pi i / steps)) / 2 ('cosine')."""
    if schedule == "cosine":
        return step_size * 0.5 * (1.0 + math.cos(math.pi * i / steps))
    return step_size


def path_length(step_size: float, steps: int, schedule: str = "constant") -> float:
    """The farthest (L-inf) distance `steps` PGD steps can travel: steps x step_size, or for the cosine
    schedule step_size (steps + 1) / 2 (the cosines of pi i / steps, i < steps, sum to 1)."""
    if schedule == "cosine":
        return step_size * (steps + 1) / 2 if steps > 1 else step_size
    return steps * step_size


class PGD(Attack):
    """Projected gradient descent on the L-inf ball: `steps` signed-gradient steps of `step_size` (constant,
    or decaying with schedule='cosine'), each followed by projection onto the eps-ball and [0, 1], from a
    uniform random start, `restarts` times (loss='mix': `restarts` times with cross-entropy, then as many
    times with the CW margin loss).

    Per example the worst case is kept: across restarts, and (keep_best=True, for evaluation) across the
    iterates of a restart, any misclassified point found is kept; otherwise the point of highest loss.
    Restart 0 uses the same random start as a single-restart attack with the same seed, so more
    restarts can only add successes. Between restarts with different losses, the point with the lower
    logit margin is kept (the two losses' values are not comparable).

    Distance measure: Linf.
    Arguments:
        model: maps (N, C, H, W) images in [0, 1] to logits.
        eps: radius (default 8/255; MNIST 0.3). step_size: default 2/255 (MNIST 0.01). steps: default 10.
        random_start: uniform start in the eps-ball (default True). restarts: default 1.
        loss: 'ce' (default), 'cw' (margin, Carlini & Wagner 2017) or 'mix' (both, `restarts` each).
        schedule: 'constant' (default) or 'cosine' (step_size decays to 0 over the steps, which settles the
            iterate in a maximum the way APGD's step halving does). targeted: y holds target classes.
        keep_best: keep the best iterate per example (default True; training uses the last iterate).
        bn: 'eval' (default) or 'train'. seed: seed of the random starts.
        step_rule: a label saved in the records: how step_size was chosen (reach, fixed or given).
    Shape: x (N, C, H, W) in [0, 1]; y (N,) int64. Returns x_adv of x's shape, |x_adv - x| <= eps, in [0, 1].
    Example:
        >>> attack = PGD(model, eps=0.3, step_size=0.01, steps=40)
        >>> x_adv = attack(x, y)
    """

    name = "pgd"

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, step_size: float | str = 2 / 255,
                 steps: int = 10, *, random_start: bool = True, restarts: int = 1, loss: str = "ce",
                 targeted: bool = False, keep_best: bool = True, bn: str = "eval", seed: int = 0,
                 step_rule: str = "given", schedule: str = "constant"):
        super().__init__(model, eps, bn=bn, seed=seed)
        self.step_size = check_eps(step_size, "step_size")
        if int(steps) < 1 or int(restarts) < 1:
            raise IgamError(f"PGD needs steps >= 1 and restarts >= 1; got steps={steps}, "
                            f"restarts={restarts}.")
        if loss not in (*LOSSES, MIX):
            raise IgamError(f"PGD loss={loss!r}; use one of {', '.join((*LOSSES, MIX))}.")
        if schedule not in SCHEDULES:
            raise IgamError(f"PGD schedule={schedule!r}; use one of {', '.join(SCHEDULES)}.")
        self.schedule = schedule
        self.steps, self.restarts, self.random_start = int(steps), int(restarts), bool(random_start)
        self.loss, self.targeted, self.keep_best = loss, bool(targeted), bool(keep_best)
        self.step_rule = str(step_rule)  # how step_size was chosen (reach | fixed | given), for the records

    def _success(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == y if self.targeted else pred != y

    def _run(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, score: bool = True,
             loss_name: str | None = None, rank_by: str | None = None):
        """One restart ascending `loss_name` (default: self.loss): (x_adv, success mask, score) of the kept
        point per example, the score being the `rank_by` loss (default: the ascended one) that ranks
        failed points across restarts (score=False: x_adv only, Madry's last iterate, without the extra
        forward pass)."""
        loss_name = loss_name or self.loss
        rank_by = rank_by or loss_name
        if self.random_start:
            noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x_adv = (x + (2 * noise - 1) * self.eps).clamp_(0.0, 1.0)
        else:
            x_adv = x.clone()
        best = x_adv.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for i in range(self.steps):
            x_adv.requires_grad_(True)
            logits = self.model(x_adv)
            loss = attack_loss(logits, y, loss_name, self.targeted)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            if self.keep_best and i > 0:  # x_adv is an iterate after a step: keep it if it succeeds
                new = self._success(logits.detach(), y) & ~found
                best[new], found = x_adv.detach()[new], found | new
            step = step_at(self.step_size, i, self.steps, self.schedule)
            x_adv = project(x_adv.detach() + step * grad.sign(), x, self.eps)
        if not score:
            return x_adv, None, None
        with torch.no_grad():
            logits = self.model(x_adv)
            loss = attack_loss(logits, y, rank_by, self.targeted)
            success = self._success(logits, y)
        if not self.keep_best:
            return x_adv, success, loss
        x_out = torch.where(found[:, None, None, None], best, x_adv)
        return x_out, found | success, torch.where(found, torch.full_like(loss, float("inf")), loss)

    def losses(self) -> list[str]:
        """The loss each restart ascends, in order."""
        if self.loss == MIX:
            return ["ce"] * self.restarts + ["cw"] * self.restarts
        return [self.loss] * self.restarts

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        losses = self.losses()
        rank_by = "cw" if len(set(losses)) > 1 else None  # one scale to rank failed points across losses
        x_best, success, loss = self._run(x, y, gen, score=self.keep_best or len(losses) > 1,
                                          loss_name=losses[0], rank_by=rank_by)
        for name in losses[1:]:
            x_new, s_new, l_new = self._run(x, y, gen, loss_name=name, rank_by=rank_by)
            # take the new point where it succeeds and the kept one does not, or neither does and it is worse
            take = (s_new & ~success) | (~s_new & ~success & (l_new > loss))
            x_best[take], loss[take] = x_new[take], l_new[take]
            success = success | s_new
        return x_best

    def passes(self, n: int) -> int:
        """steps per restart, plus the scoring pass of each restart that keeps the best point."""
        scored = self.keep_best or self.restarts > 1
        return self.restarts * (self.steps + int(scored))

    def settings(self) -> dict[str, Any]:
        path = path_length(self.step_size, self.steps, self.schedule)
        return {**super().settings(), "step_size": self.step_size, "steps": self.steps,
                "restarts": self.restarts, "random_start": self.random_start, "loss": self.loss,
                "targeted": self.targeted, "step_rule": self.step_rule, "schedule": self.schedule,
                "path_length": path, "reaches_boundary": path >= self.eps * (1 - 1e-6)}
