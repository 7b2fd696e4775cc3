"""Adversarial attacks in pixel space (inputs in [0, 1], L-inf ball), one small file each.

    from igam.attacks import PGD, make_attack
    x_adv = PGD(model, eps=0.3, step_size=0.01, steps=40)(x, y)
    x_adv = make_attack("pgd20x5", model, (1, 28, 28))(x, y)

FGSM (Goodfellow et al. 2015), PGD (Madry et al. 2018) with restarts, CE/margin/both losses and a constant
or cosine-decaying step (STRONG_PGD, "pgd100x3-mix-cos", is the strongest: what igam calls "PGD"), Square
(Andriushchenko et al. 2020, our own), and AutoAttack (Croce & Hein 2020) through the authors' reference
implementation, pyautoattack: make_attack("autoattack", ...), "autoattack-plus", "apgd-t", ...
"""

from igam.attacks.autoattack import INSTALL_HINT, AutoAttack, pyautoattack_version
from igam.attacks.base import Attack, attack_loss, margin, project
from igam.attacks.fgsm import FGSM
from igam.attacks.pgd import PGD
from igam.attacks.presets import (
    PRESET_EXAMPLES,
    STRONG_PGD,
    AttackSpec,
    column_label,
    column_name,
    default_eps,
    is_mnist_like,
    make_attack,
    parse_preset,
    pgd_step,
)
from igam.attacks.square import Square

__all__ = ["INSTALL_HINT", "PRESET_EXAMPLES", "STRONG_PGD", "Attack", "AttackSpec", "AutoAttack", "FGSM",
           "PGD", "Square", "attack_loss", "column_label", "column_name", "default_eps", "is_mnist_like",
           "make_attack", "margin", "pgd_step", "parse_preset", "project", "pyautoattack_version"]
