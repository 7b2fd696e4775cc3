"""Attacks by name, with the conventions of the literature per dataset.

Names: fgsm | pgdK | pgdKxR (R restarts) | pgdK-cw (margin loss) | pgdKxR-cw | square | squareQ (Q queries)
| autoattack. K is any step count; the paper tables use pgd5/7/10/20/40/50/100.

Defaults: 1-channel 28x28 data (MNIST, Fashion-MNIST): eps 0.3, step 0.01 (Madry et al. 2018);
everything else (CIFAR, SVHN, Tiny-ImageNet): eps 8/255, step 2/255. An eps override keeps the step/eps
ratio (0.01/0.3 = 1/30, or 1/4) unless a step size is given too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from igam.attacks.autoattack import AutoAttack
from igam.attacks.base import Attack
from igam.attacks.fgsm import FGSM
from igam.attacks.pgd import PGD
from igam.attacks.square import Square
from igam.errors import IgamError, suggest
from igam.units import check_eps

PRESET_EXAMPLES = ("fgsm", "pgd5", "pgd7", "pgd10", "pgd20", "pgd40", "pgd50", "pgd100", "pgd20x5",
                   "pgd20-cw", "square", "autoattack")
_PGD = re.compile(r"pgd(\d+)(?:x(\d+))?(?:-(ce|cw))?")
_SQUARE = re.compile(r"square(\d+)?")


@dataclass(frozen=True)
class AttackSpec:
    """A parsed preset name."""

    kind: str  # fgsm | pgd | square | autoattack
    steps: int = 0
    restarts: int = 1
    loss: str = "ce"
    queries: int = 0


def parse_preset(name: str) -> AttackSpec:
    """'pgd20x5-cw' -> AttackSpec('pgd', 20, 5, 'cw'). Raises IgamError naming the valid forms."""
    s = name.strip().lower()
    if s in ("fgsm", "autoattack"):
        return AttackSpec(s)
    if (m := _PGD.fullmatch(s)) is not None:
        steps, restarts = int(m.group(1)), int(m.group(2) or 1)
        if steps < 1 or restarts < 1:
            raise IgamError(f"Attack '{name}' needs at least 1 step and 1 restart.")
        return AttackSpec("pgd", steps, restarts, m.group(3) or "ce")
    if (m := _SQUARE.fullmatch(s)) is not None:
        queries = int(m.group(1) or 5000)
        if queries < 1:
            raise IgamError(f"Attack '{name}' needs at least 1 query.")
        return AttackSpec("square", queries=queries)
    raise IgamError(f"Unknown attack '{name}'.{suggest(s, PRESET_EXAMPLES)} Valid forms: clean, fgsm, pgdK "
                    "(K steps, e.g. pgd20), pgdKxR (R restarts, e.g. pgd20x5), pgdK-cw (margin loss), "
                    "square, squareQ (Q queries), autoattack.")


def is_mnist_like(shape: tuple[int, ...]) -> bool:
    """1-channel 28x28 inputs: MNIST conventions (eps 0.3, step 0.01)."""
    return tuple(shape[-3:]) == (1, 28, 28)


def default_eps(shape: tuple[int, ...]) -> tuple[float, float]:
    """(eps, step size) of the literature for inputs of this (C, H, W) shape."""
    return (0.3, 0.01) if is_mnist_like(shape) else (8 / 255, 2 / 255)


def make_attack(name: str, model: nn.Module, shape: tuple[int, ...], *, eps: float | str | None = None,
                step_size: float | str | None = None, bn: str = "eval", seed: int = 0) -> Attack:
    """The attack a preset name stands for, on inputs of shape (C, H, W) (or (N, C, H, W))."""
    spec = parse_preset(name)
    eps0, step0 = default_eps(shape)
    e = eps0 if eps is None else check_eps(eps)
    if step_size is not None:
        step = check_eps(step_size, "step_size")
    else:
        step = step0 if eps is None else e * step0 / eps0
    if spec.kind == "fgsm":
        return FGSM(model, e, bn=bn, seed=seed)
    if spec.kind == "pgd":
        return PGD(model, e, step, spec.steps, restarts=spec.restarts, loss=spec.loss, bn=bn, seed=seed)
    if spec.kind == "square":
        return Square(model, e, spec.queries, bn=bn, seed=seed)
    return AutoAttack(model, e, bn=bn, seed=seed)


def column_name(name: str) -> str:
    """Table header of an attack name, as in the paper: Clean, FGSM, PGD20, PGD20x5-CW, Square, AutoAttack."""
    s = name.strip().lower()
    if s == "clean":
        return "Clean"
    if s == "autoattack":
        return "AutoAttack"
    if s.startswith("square"):
        return "Square" + s[6:]
    return s.upper()

