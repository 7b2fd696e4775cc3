"""FGSM: Goodfellow, Shlens & Szegedy, "Explaining and harnessing adversarial examples", ICLR 2015."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from igam.attacks.base import LOSSES, Attack, attack_loss
from igam.errors import IgamError


class FGSM(Attack):
    """Fast Gradient Sign Method: one step of size eps along sign(grad loss), no random start
    (as the IGAM release evaluates it).

    Distance measure: Linf.
    Arguments:
        model: maps (N, C, H, W) images in [0, 1] to logits.
        eps: radius in pixel units (default 8/255; MNIST uses 0.3). Fractions like '8/255' work.
        loss: 'ce' (default) or 'cw' (margin). targeted: y holds target classes.
        bn: 'eval' (default) or 'train' (batch statistics, official-IGAM protocol).
    Shape: x (N, C, H, W) in [0, 1]; y (N,) int64. Returns x_adv of x's shape, |x_adv - x| <= eps, in [0, 1].
    Example:
        >>> attack = FGSM(model, eps=8 / 255)
        >>> x_adv = attack(x, y)
    """

    name = "fgsm"

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, *, loss: str = "ce",
                 targeted: bool = False, bn: str = "eval", seed: int = 0):
        super().__init__(model, eps, bn=bn, seed=seed)
        if loss not in LOSSES:
            raise IgamError(f"FGSM loss={loss!r}; use one of {', '.join(LOSSES)}.")
        self.loss, self.targeted = loss, targeted

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x_adv = x.clone().requires_grad_(True)
        loss = attack_loss(self.model(x_adv), y, self.loss, self.targeted).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        return (x + self.eps * grad.sign()).clamp_(0.0, 1.0)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "loss": self.loss, "targeted": self.targeted}
