"""Square Attack: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (arXiv:1912.00049). L-inf version."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from igam.attacks.base import Attack, margin
from igam.errors import IgamError

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # iterations (of 10000) where p halves


class Square(Attack):
    """Score-based black-box attack: random search over squares of +-eps patches, accepted when the
    margin loss drops. Uses only the model's logits (no gradients), so gradient masking cannot stop it.

    Follows the authors' `square_attack_linf`: vertical-stripe initialisation, the piecewise-constant
    schedule of the square's area fraction p (from p_init, halving at 10, 50, 200, ... of 10000 queries,
    rescaled to n_queries), one window position per iteration shared by the batch, and queries spent
    only on examples not yet fooled. Untargeted it minimises z_y - max_{j!=y} z_j; targeted (y = target)
    it minimises max_{j!=t} z_j - z_t.

    Distance measure: Linf.
    Arguments:
        model: maps (N, C, H, W) images in [0, 1] to logits.
        eps: radius (default 8/255; MNIST 0.3). n_queries: per restart (default 5000, as AutoAttack).
        p_init: initial fraction of pixels a square covers (default 0.8, AutoAttack's Linf value).
        restarts: default 1. targeted: y holds target classes. bn, seed: as for every attack.
    Shape: x (N, C, H, W) in [0, 1]; y (N,) int64. Returns x_adv of x's shape, |x_adv - x| <= eps, in [0, 1].
    Example:
        >>> attack = Square(model, eps=8 / 255, n_queries=5000)
        >>> x_adv = attack(x, y)
    """

    name = "square"

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, n_queries: int = 5000, *,
                 p_init: float = 0.8, restarts: int = 1, targeted: bool = False, bn: str = "eval",
                 seed: int = 0):
        super().__init__(model, eps, bn=bn, seed=seed)
        if int(n_queries) < 1 or int(restarts) < 1 or not 0 < p_init <= 1:
            raise IgamError(f"Square needs n_queries >= 1, restarts >= 1 and 0 < p_init <= 1; got "
                            f"{n_queries}, {restarts}, {p_init}.")
        self.n_queries, self.p_init, self.restarts = int(n_queries), float(p_init), int(restarts)
        self.targeted = bool(targeted)

    def _objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example loss to minimise; negative means the attack succeeded."""
        return -margin(logits, y) if self.targeted else margin(logits, y)

    def _p(self, it: int) -> float:
        it = int(it / self.n_queries * 10000)
        return self.p_init / 2 ** sum(it > t for t in _SCHEDULE)

    def _signs(self, shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        r = torch.randint(0, 2, shape, generator=gen, device=like.device)
        return (2 * r - 1).to(like.dtype) * self.eps

    @torch.no_grad()
    def _run(self, x: torch.Tensor, y: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        x_best = (x + self._signs((n, c, 1, w), gen, x)).clamp_(0.0, 1.0)  # vertical stripes
        loss = self._objective(self.model(x_best), y)
        for i in range(self.n_queries - 1):
            idx = (loss > 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_curr, x_best_curr = x[idx], x_best[idx]
            deltas = x_best_curr - x_curr
            # the square's side: at most the shorter side - 1 (images may be taller than wide), at least 1
            s = min(max(int(round(math.sqrt(self._p(i) * h * w))), 1), max(min(h, w) - 1, 1))
            r0 = int(torch.randint(0, max(h - s, 1), (1,), generator=gen, device=x.device))
            c0 = int(torch.randint(0, max(w - s, 1), (1,), generator=gen, device=x.device))
            win = (slice(None), slice(None), slice(r0, r0 + s), slice(c0, c0 + s))
            new = self._signs((len(idx), c, 1, 1), gen, x).expand(-1, -1, s, s).clone()
            for _ in range(10):  # redraw patches that would not change the current best point
                same = ((x_curr[win] + new).clamp(0, 1) - x_best_curr[win]).abs().flatten(1).amax(1) < 1e-7
                if not bool(same.any()):
                    break
                redraw = self._signs((len(idx), c, 1, 1), gen, x).expand(-1, -1, s, s)
                new = torch.where(same[:, None, None, None], redraw, new)
            deltas[win] = new
            x_new = (x_curr + deltas).clamp_(0.0, 1.0)
            loss_new = self._objective(self.model(x_new), y[idx])
            better = loss_new < loss[idx]
            loss[idx] = torch.where(better, loss_new, loss[idx])
            x_best[idx[better]] = x_new[better]
        return x_best, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x_best, loss = self._run(x, y, gen)
        for _ in range(self.restarts - 1):
            todo = (loss > 0).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            x_new, l_new = self._run(x[todo], y[todo], gen)
            better = l_new < loss[todo]
            x_best[todo[better]], loss[todo[better]] = x_new[better], l_new[better]
        return x_best

    def passes(self, n: int) -> int:
        """n_queries per restart (fewer when every image is fooled early)."""
        return self.restarts * self.n_queries

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "n_queries": self.n_queries, "p_init": self.p_init,
                "restarts": self.restarts, "targeted": self.targeted, "library": "igam"}
