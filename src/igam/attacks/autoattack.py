"""AutoAttack (standard): Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (arXiv:2003.01690), through torchattacks (optional extra)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from igam.attacks.base import Attack
from igam.errors import IgamError

INSTALL_HINT = (
    "AutoAttack needs the optional package torchattacks 3.5.1. Install it with "
    "`pip install 'igam[autoattack]'`, or, to keep your `requests` (torchattacks pins requests~=2.25.1, "
    "which it only needs for the robustbench copy it ships), "
    "`pip install --no-deps torchattacks==3.5.1 scipy`. "
    "Without it, use the presets pgdKxR, pgdK-cw and square, which are built in.")


def torchattacks_version() -> str | None:
    """The installed torchattacks version, or None when it cannot be imported."""
    try:
        import torchattacks
    except Exception:  # ImportError, or a broken install (e.g. scipy missing)
        return None
    return str(getattr(torchattacks, "__version__", "unknown"))


class AutoAttack(Attack):
    """AutoAttack 'standard' for L-inf: APGD-CE, APGD-T (9 target classes), FAB-T and Square (5000 queries),
    each run on the examples the previous ones left correctly classified; the per-example worst case is
    returned. Implemented by torchattacks.AutoAttack; igam adds the [0, 1] checks, the BatchNorm mode
    (eval, or train-mode BatchNorm without touching running statistics) and seeding that leaves the global
    RNG as it was.

    Distance measure: Linf.
    Arguments:
        model: maps (N, C, H, W) images in [0, 1] to logits. eps: default 8/255 (MNIST 0.3).
        num_classes: classes of the model (APGD-T/FAB-T targets); default: read from the model's logits.
        bn, seed: as for every attack.
    Shape: x (N, C, H, W) in [0, 1]; y (N,) int64. Returns x_adv of x's shape, |x_adv - x| <= eps, in [0, 1].
    Example:
        >>> attack = AutoAttack(model, eps=8 / 255)
        >>> x_adv = attack(x, y)
    """

    name = "autoattack"

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, *, num_classes: int | None = None,
                 bn: str = "eval", seed: int = 0):
        super().__init__(model, eps, bn=bn, seed=seed)
        self.version = torchattacks_version()
        if self.version is None:
            raise IgamError(INSTALL_HINT)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        import torchattacks

        k = self.num_classes or int(getattr(self.model, "num_classes", 0)) or _num_classes(self.model, x)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=x.device))
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # torchattacks seeds the global RNG
            atk = torchattacks.AutoAttack(self.model, norm="Linf", eps=self.eps, version="standard",
                                          n_classes=k, seed=seed)
            if self.bn == "train":  # keep the batch-statistics BatchNorm that igam's bn_mode set up
                atk.set_model_training_mode(model_training=True, batchnorm_training=True,
                                            dropout_training=False)
            x_adv = atk(x, y)
        # torchattacks works in float32 and may round; restate the contract exactly
        return torch.minimum(torch.maximum(x_adv.to(x.dtype), x - self.eps), x + self.eps).clamp_(0.0, 1.0)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "version": "standard",
                "components": ["apgd-ce", "apgd-t", "fab-t", "square"], "library": "torchattacks",
                "library_version": self.version}


@torch.no_grad()
def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    return int(model(x[:1]).shape[1])
