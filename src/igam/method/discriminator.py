"""The gradient discriminator f_disc and its training (paper 4.2.1, eqs. 10-12, Appendix A; official
`IgamConvDiscriminatorModel`).

N x [conv 4x4 stride 2 'SAME' (bias) -> BatchNorm (eps 1e-3) -> LeakyReLU 0.1], flatten, linear -> one
logit: log-odds that a gradient map came from the teacher. (The official code uses 2 softmax outputs;
a 2-way softmax is a sigmoid of the logit difference, so one logit is the same family of functions.)
Appendix A: 4 layers 8-16-32-64 (Tiny-ImageNet teacher) or 5 layers 16-32-64-128-256 (MNIST/CIFAR).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def zero_mean_l2(g: torch.Tensor) -> torch.Tensor:
    """Official preprocessing: subtract each map's mean, scale to unit L2 norm with TF's clamp of the
    squared norm at 1e-12 (not F.normalize, whose clamp is on the norm)."""
    g = g - g.mean((1, 2, 3), keepdim=True)
    return g * torch.rsqrt((g * g).sum((1, 2, 3), keepdim=True).clamp_min(1e-12))


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding for a strided conv: output ceil(H/s), extra padding at the bottom/right.
    (For 32x32 inputs this equals padding=1; for 28x28 views it keeps 5 layers possible: 28-14-7-4-2-1.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


class GradientDiscriminator(nn.Module):
    """f_disc: input-gradient maps (B, C, H, W), float, any scale -> logits (B,) of "came from the teacher".

    Args:
        in_shape: (C, H, W) of the gradient maps it sees (after the adapter's disc_view, e.g. a crop).
        layers: strided 4x4 conv blocks, each halving H and W ('SAME' padding) and doubling the channels.
        channels: channels of the first block (then 2x per block). Defaults 4 and 8 are igam's config
            defaults (disc_layers, disc_channels); Appendix A's MNIST/CIFAR setting is layers=5,
            channels=16.
        input_norm: 'none' (paper) or 'zero-mean-l2' (official code: each map centred, unit L2 norm).
    """

    def __init__(
        self, in_shape: tuple[int, int, int], layers: int = 4, channels: int = 8, input_norm: str = "none"
    ):
        super().__init__()
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for i in range(layers):
            cout = channels * 2**i
            blocks += [SameConv2d(c, cout, 4, 2), nn.BatchNorm2d(cout, eps=1e-3), nn.LeakyReLU(0.1)]
            c = cout
        self.features = nn.Sequential(*blocks, nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(2, *in_shape)).shape[1]
        self.head = nn.Linear(n, 1)
        self.input_norm = input_norm
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (16 * m.out_channels)) ** 0.5)
                nn.init.zeros_(m.bias)
        bound = (3.0 / n) ** 0.5
        nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.zeros_(self.head.bias)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of 'this gradient map came from the teacher'."""
        if self.input_norm == "zero-mean-l2":
            g = zero_mean_l2(g)
        return self.head(self.features(g)).squeeze(1)


def adversarial_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor) -> torch.Tensor:
    """L_adv (eq. 10) for a batch: mean log f_disc(J_t) + mean log(1 - f_disc(J_s)), from the
    discriminator's logits (B,) on the student's and on the teacher's gradient maps. The discriminator
    maximises it (eq. 12); the student minimises it (eq. 14, saturating form)."""
    return F.logsigmoid(logits_teacher).mean() + F.logsigmoid(-logits_student).mean()


class DiscriminatorTrainer:
    """The one owner of f_disc's training: the network, its optimiser, the optimiser's learning rate
    following the student's schedule, the cadence (one update every `every` student steps), and the
    forms its passes take (compiled; DDP-wrapped for its own update under torchrun).

    Both sides are fed explicitly with the step's gradient maps (as the discriminator sees them):
    `logits(views)` for the student's side (parameters frozen, no parameter gradients) and
    `update(js_view, jt_view)` for its own step (eq. 12), with the maps held constant.

    Args:
        net: the GradientDiscriminator.
        optimizer: its optimiser, or None (then `update` needs one passed in).
        every: update cadence in student steps (paper Algorithm 1: k).
        follow_lr: scale the optimiser's base learning rates by the student's schedule factor (`on_lr`).
        adv_scale: multiplies L_adv (official code: 0.5).
    """

    def __init__(self, net: GradientDiscriminator, optimizer: torch.optim.Optimizer | None = None, *,
                 every: int = 1, follow_lr: bool = False, adv_scale: float = 1.0):
        self.net, self.optimizer, self.every = net, optimizer, int(every)
        self.follow_lr, self.adv_scale = follow_lr, float(adv_scale)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else []
        self._call: nn.Module = net  # the forward passes' form (compiled by `compile`)
        self._update: nn.Module | None = None  # the own update's form under DDP (`wrap_ddp`)

    def set_grad(self, on: bool) -> None:
        for p in self.net.parameters():
            p.requires_grad_(on)

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """Logits (2B,) of a batch of maps, the discriminator held fixed (the student's side of eq. 14)."""
        self.set_grad(False)
        return self._call(views)

    def due(self, k: int) -> bool:
        """Whether the k-th IGAM step (k = 0, 1, ...) is followed by a discriminator update."""
        return k % self.every == 0

    def on_lr(self, factor: float) -> None:
        """The student's schedule factor; the optimiser follows it when follow_lr."""
        if self.follow_lr and self.optimizer is not None:
            for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = lr * factor

    def update(self, js_view: torch.Tensor, jt_view: torch.Tensor,
               optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """One step of f_disc maximising adv_scale x L_adv (eq. 12) on detached maps (B, C, H, W) of the
        student and of the teacher. A step whose gradients are not finite is skipped (on every rank).
        Returns {'disc_loss'} or {'disc_skipped': 1}."""
        opt = optimizer or self.optimizer
        if opt is None:
            raise ValueError("DiscriminatorTrainer.update needs an optimizer (none was given).")
        self.set_grad(True)
        disc = self._update if self._update is not None else self._call
        logits = disc(torch.cat([js_view, jt_view]))
        ls, lt = logits[: len(js_view)], logits[len(js_view):]
        loss = -self.adv_scale * adversarial_loss(ls, lt)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # always, so that DDP ranks meet in the same all-reduce
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True
        if finite:  # NaN/Inf guard: (all-reduced) non-finite gradients skip the update on every rank
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.set_grad(False)
        if not finite:  # logged as disc_skipped (the fraction of student steps with a skipped D update)
            return {"disc_skipped": torch.ones((), device=loss.device)}
        return {"disc_loss": loss.detach()}

    def compile(self, compile_fn: Callable[..., nn.Module], example_views: torch.Tensor) -> None:
        """Route the forward passes through compile_fn(net, example, what, frozen_too=True) (first-order
        only, so safe in any matching mode); the registered network stays the plain module."""
        self._call = compile_fn(self.net, example_views, "the discriminator", frozen_too=True)

    def wrap_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the own update through wrap(net), e.g. a DDP wrapper, so its gradients are averaged over
        ranks and every rank takes the same step. The student's side keeps the bare (or compiled) module
        with requires_grad off: no parameter gradients, nothing for DDP to reduce."""
        self.set_grad(True)  # DDP registers the parameters that require grad at construction
        self._update = wrap(self._call)

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state (the network's weights are saved with the module that registers it)."""
        return {"disc_opt": self.optimizer.state_dict()} if self.optimizer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and "disc_opt" in state:
            self.optimizer.load_state_dict(state["disc_opt"])
