"""The attack interface: `Attack(model, eps=...)(x, y) -> x_adv`, pixel space, L-inf ball, inputs in [0, 1].

Cross-cutting concerns live here and nowhere else: input checks, the model's mode (eval by default,
train-mode BatchNorm for the official-IGAM protocol, always restored), seeding, and the loss that
iterative attacks ascend (cross-entropy or Carlini-Wagner margin, untargeted or targeted).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.units import check_eps
from igam.utils import bn_mode

LOSSES = ("ce", "cw")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example logit margin z_y - max_{j != y} z_j (Carlini & Wagner 2017); negative = misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return z_y - other


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                targeted: bool = False) -> torch.Tensor:
    """Per-example loss an attack *ascends*. Untargeted: CE(y) or -margin(y); targeted (y = target class):
    -CE(target) or margin(target)."""
    if loss == "ce":
        out = F.cross_entropy(logits, y, reduction="none")
    elif loss == "cw":
        out = -margin(logits, y)
    else:
        raise IgamError(f"Unknown attack loss '{loss}'; use one of {', '.join(LOSSES)}.")
    return -out if targeted else out


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto the L-inf ball of radius eps around x, intersected with the image box [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def generator_for(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device` (random draws on CUDA stay on CUDA; same seed, same draws per device)."""
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


class Attack(ABC):
    """Base class. Subclasses implement `forward(x, y, gen) -> x_adv` and list their settings.

    `__call__` checks shapes and range, switches the model to eval mode (or train-mode BatchNorm with
    bn='train', leaving running statistics alone) and back, and returns a detached x_adv. An attack is
    a pure function of (x, y, seed): calling it twice with the same seed gives the same result.

    Shape: x (N, C, H, W) float in [0, 1]; y (N,) int64 labels (target classes when targeted).
    """

    name = "attack"

    def __init__(self, model: nn.Module, eps: float | str, *, bn: str = "eval", seed: int = 0):
        if bn not in ("eval", "train"):
            raise IgamError(f"bn={bn!r} is not a BatchNorm mode; use eval or train.")
        self.model, self.eps, self.bn, self.seed = model, check_eps(eps), bn, int(seed)

    @abstractmethod
    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x_adv for a batch; each attack file implements it."""

    def settings(self) -> dict[str, Any]:
        """What produced the numbers (saved with every result)."""
        return {"attack": self.name, "eps": self.eps, "bn": self.bn}

    def passes(self, n: int) -> int:
        """An upper bound on the model's forward passes for one call on a batch of n images (the progress
        bar's total, igam.progress); one gradient step is one pass. Default: 1 (FGSM)."""
        return 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        x, y = check_inputs(x, y)
        gen = generator_for(self.seed if seed is None else seed, x.device)
        with bn_mode(self.model, self.bn), torch.enable_grad():
            x_adv = self.forward(x.detach(), y.detach(), gen)
        return x_adv.detach()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.settings().items() if k != "attack")
        return f"{type(self).__name__}({args})"


def check_labels(y: Any, n: int) -> torch.Tensor:
    """Labels as int64 class indices of shape (n,): any integer dtype (uint8, int32, ...) is converted;
    one-hot or probability rows, floats, booleans and wrong lengths are refused with IgamError."""
    if not torch.is_tensor(y):
        raise IgamError(f"The labels must be a tensor of class indices of shape ({n},); got "
                        f"{type(y).__name__}.")
    if y.ndim == 2 and y.shape == (n, y.shape[1]) and y.shape[1] > 1:
        raise IgamError(f"The labels of shape {tuple(y.shape)} look one-hot (or like probabilities): "
                        f"attacks and evaluation take class indices of shape ({n},). Convert them with "
                        "y.argmax(1).")
    if y.ndim != 1 or len(y) != n:
        raise IgamError(f"The labels must have shape (N,) = ({n},), one class index per image; got shape "
                        f"{tuple(y.shape)}.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise IgamError(f"The labels must be integer class indices; got {y.dtype}. Convert them with "
                        "y.long() (after checking they are whole numbers).")
    if len(y) and int(y.min()) < 0:
        raise IgamError(f"The labels must be class indices 0 .. K-1; got {int(y.min())}.")
    return y.long()


def check_images(x: Any, *, allow_uint8: bool = False) -> None:
    """Images of shape (N, C, H, W): float in [0, 1] (or uint8 0..255 where allow_uint8). Floats on the
    0..255 scale, NaNs and other dtypes are refused with IgamError naming the conversion."""
    ok_dtype = torch.is_tensor(x) and (x.is_floating_point() or (allow_uint8 and x.dtype == torch.uint8))
    if not ok_dtype or x.ndim != 4:
        what = "float images in [0, 1]" + (" or uint8 images" if allow_uint8 else "")
        raise IgamError(f"Attacks and evaluation take {what} of shape (N, C, H, W); got "
                        f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}. "
                        "Convert uint8 images with x.float() / 255.")
    if x.is_floating_point() and len(x):
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise IgamError(f"Float images must lie in [0, 1] (pixel space; normalisation belongs inside the "
                            f"model); got values in [{lo:.3g}, {hi:.3g}]. Divide 0-255 pixels by 255, or "
                            "pass uint8 images.")


def check_inputs(x: torch.Tensor, y: torch.Tensor, *, allow_uint8: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one input check of every attack and evaluation path: images (see `check_images`) and labels
    (see `check_labels`). Returns (x, y) with y as int64."""
    check_images(x, allow_uint8=allow_uint8)
    return x, check_labels(y, len(x))
