"""Input Gradient Adversarial Matching as a loss module you can drop into any PyTorch training loop.

    igm = InputGradientMatching(teacher, discriminator, lambda_adv=1.0, lambda_diff=10.0)
    terms = igm(student, x, y)          # paper eq. 14: CE + lambda_adv L_adv + lambda_diff L_diff
    terms["loss"].backward(); opt.step()
    igm.discriminator_step(disc_opt)    # eq. 12: the discriminator maximises L_adv (every k steps)

The student's parameter gradient of the matching terms is a Hessian-vector product. mode='exact' gets it
by double backprop (J_s built with create_graph=True). mode='finite-difference' gets it from first-order
passes only: with v = dL_match/dJ_s (J_s held constant),
    d/dtheta <J_s(theta), v>  ~=  d/dtheta sum_i [L_i(x_i + h_i v_i) - L_i(x_i - h_i v_i)] / (2 h_i),
h_i = fd_step * ||x_i|| / ||v_i||. It needs no double-backward support (SyncBatchNorm, torch.compile,
custom kernels) and less memory; on smooth activations it matches the exact gradient, on ReLU networks it
differs at the kinks (see docs/IGAM.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.gradients import flat_cosine, input_gradient, per_example_objective, teacher_gradient
from igam.utils import unwrap


class InputGradientMatching(nn.Module):
    """IGAM loss terms for a batch (paper eqs. 7-14).

    Args:
        teacher: frozen network mapping *target* inputs to target logits (adapter included), or None for
            the `igr` control (J_t = 0: plain input-gradient-norm regularisation, Ross & Doshi-Velez 2018).
        discriminator: a GradientDiscriminator, or None (lambda_adv = 0).
        lambda_adv, lambda_diff: weights of L_adv (eq. 10) and L_diff (eq. 13); lambda_diff='auto' sets
            lambda_diff_auto / E||J_t||^2 on the first batch (then fixed, saved with the run).
        gradient_target: 'ce' (paper eqs. 8-9) or 'true-prob' (official code).
        scale: gradients w.r.t. x * scale (official: 255).
        diff_reduction: L_diff as the batch 'mean' (paper) or 'sum' (official) of per-example ||J_s-J_t||^2.
        adv_loss: 'saturating' (the student minimises eq. 10 itself) or 'non-saturating' (maximises
            log f_disc(J_s), the usual GAN trick; same fixed point, stronger early gradients).
        adv_scale: multiplies L_adv for student and discriminator (official: 0.5, its mean over 2B).
        disc_view: maps a target-space gradient to what the discriminator sees (crop adapters crop).
        mode: 'exact' or 'finite-difference'; fd_step: relative finite-difference step.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        discriminator: nn.Module | None = None,
        *,
        lambda_adv: float = 1.0,
        lambda_diff: float | str = "auto",
        lambda_diff_auto: float = 2.3,
        gradient_target: str = "ce",
        scale: float = 1.0,
        diff_reduction: str = "mean",
        adv_loss: str = "non-saturating",
        adv_scale: float = 1.0,
        disc_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mode: str = "exact",
        fd_step: float = 1e-2,
    ):
        super().__init__()
        if teacher is None and lambda_diff == "auto":
            raise IgamError(
                "lambda_diff=auto scales L_diff by the teacher's gradients; without a teacher "
                "(igr) give a number, e.g. lambda_diff=1, or pass a teacher for the scale."
            )
        if mode not in ("exact", "finite-difference"):
            raise IgamError(f"grad_matching={mode!r}: choose exact or finite-difference.")
        self._teacher = (teacher,)  # a plain attribute: the frozen teacher is not saved with the objective
        self.discriminator = discriminator
        self.lambda_adv = float(lambda_adv)
        self.lambda_diff_auto = float(lambda_diff_auto)
        auto = lambda_diff == "auto"
        self.register_buffer("lambda_diff", torch.tensor(math.nan if auto else float(lambda_diff)))
        self.gradient_target, self.scale, self.diff_reduction = gradient_target, float(scale), diff_reduction
        self.adv_loss, self.adv_scale = adv_loss, float(adv_scale)
        self.disc_view = disc_view or (lambda g: g)
        self.mode, self.fd_step = mode, float(fd_step)
        self.use_teacher = True  # False: the igr control even when a teacher is given for the scale
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    # -----------------------------------------------------------------------------------------
    def teacher_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """J_t (eqs. 9, 17), or zeros for the igr control. Sets lambda_diff on first use when 'auto'."""
        jt = (
            teacher_gradient(self.teacher, x, y, self.gradient_target, self.scale)
            if self.teacher is not None
            else torch.zeros_like(x)
        )
        if torch.isnan(self.lambda_diff):
            energy = float(jt.flatten(1).pow(2).sum(1).mean())
            per = energy if self.diff_reduction == "mean" else energy * len(x)
            if per <= 0:
                raise IgamError(
                    "lambda_diff=auto: the teacher's input gradients are all zero on this batch; "
                    "give lambda_diff a number."
                )
            self.lambda_diff.fill_(self.lambda_diff_auto / per)
        return jt if self.use_teacher else torch.zeros_like(jt)

    def _set_disc_grad(self, on: bool) -> None:
        if self.discriminator is not None:
            for p in self.discriminator.parameters():
                p.requires_grad_(on)

    def matching_loss(
        self, js: torch.Tensor, jt: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """lambda_diff L_diff (eq. 13) + lambda_adv L_adv (eq. 10, the student's side); D is held fixed."""
        d = (js - jt).flatten(1).pow(2).sum(1)
        l_diff = d.mean() if self.diff_reduction == "mean" else d.sum()
        total = self.lambda_diff * l_diff
        metrics = {"l_diff": l_diff.detach()}
        if self.discriminator is not None and self.lambda_adv != 0:
            self._set_disc_grad(False)
            logits = self.discriminator(torch.cat([self.disc_view(js), self.disc_view(jt)]))
            ls, lt = logits[: len(js)], logits[len(js) :]
            l_adv = self.adv_scale * (F.logsigmoid(lt).mean() + F.logsigmoid(-ls).mean())
            student = l_adv if self.adv_loss == "saturating" else -self.adv_scale * F.logsigmoid(ls).mean()
            total = total + self.lambda_adv * student
            metrics.update(
                l_adv=l_adv.detach(),
                disc_acc_student=(ls.detach() < 0).float().mean(),
                disc_acc_teacher=(lt.detach() > 0).float().mean(),
            )
        return total, metrics

    def forward(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """All terms for a batch; terms['loss'] is what to backpropagate (its value is eq. 14)."""
        jt = self.teacher_gradients(x, y)
        if self.mode == "exact":
            js, logits = input_gradient(
                student, x, y, self.gradient_target, create_graph=True, scale=self.scale
            )
            ce = F.cross_entropy(logits, y)
            match, metrics = self.matching_loss(js, jt)
            loss = ce + match
        else:
            js, logits = input_gradient(
                student, x, y, self.gradient_target, create_graph=False, scale=self.scale, retain_graph=True
            )
            ce = F.cross_entropy(logits, y)
            js_leaf = js.detach().requires_grad_(True)
            with torch.enable_grad():
                match, metrics = self.matching_loss(js_leaf, jt)
                (v,) = torch.autograd.grad(match, js_leaf)
            surrogate = self.finite_difference(student, x, y, v / self.scale)
            loss = ce + surrogate + (match.detach() - surrogate.detach())
            js = js.detach()
        self._cache = (js.detach(), jt)
        cos = flat_cosine(js.detach(), jt)
        metrics.update(
            ce=ce.detach(),
            acc=(logits.detach().argmax(1) == y).float().mean(),
            cos_js_jt=cos.mean(),
            js_norm=js.detach().flatten(1).norm(dim=1).mean(),
            jt_norm=jt.flatten(1).norm(dim=1).mean(),
            lambda_diff=self.lambda_diff.detach().clone(),
        )
        return {"loss": loss, **metrics}

    def finite_difference(
        self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """A scalar whose parameter gradient is the central difference estimate of d/dtheta <grad_x L, v>."""
        vn = v.flatten(1).norm(dim=1)
        h = self.fd_step * x.flatten(1).norm(dim=1) / vn.clamp_min(1e-30)
        live = (vn > 0).to(x.dtype)
        step = (h * live).view(-1, 1, 1, 1) * v
        net = unwrap(student)  # outside DDP's forward: its hooks still all-reduce the summed gradient once
        with _frozen_bn_stats(net) as bns:
            if bns:  # BatchNorm: each pass needs its own batch statistics, as at x
                plus = per_example_objective(net(x + step), y, self.gradient_target)
                minus = per_example_objective(net(x - step), y, self.gradient_target)
            else:  # one forward of 2B is cheaper
                both = per_example_objective(
                    net(torch.cat([x + step, x - step])), torch.cat([y, y]), self.gradient_target
                )
                plus, minus = both[: len(x)], both[len(x) :]
        return ((plus - minus) * live / (2 * h.clamp_min(1e-30))).sum()

    def discriminator_step(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """One update of f_disc maximising L_adv (eq. 12) on the last batch's (J_s, J_t), held constant."""
        if self.discriminator is None or self._cache is None or self.lambda_adv == 0:
            return {}
        js, jt = self._cache
        self._set_disc_grad(True)
        logits = self.discriminator(torch.cat([self.disc_view(js), self.disc_view(jt)]))
        ls, lt = logits[: len(js)], logits[len(js) :]
        loss = -self.adv_scale * (F.logsigmoid(lt).mean() + F.logsigmoid(-ls).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self._set_disc_grad(False)
        return {"disc_loss": loss.detach()}

    @torch.no_grad()
    def held_out_metrics(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """cos(J_s, J_t) and gradient norms on held-out images (eval mode)."""
        if self.teacher is None:
            return {}
        with torch.enable_grad():
            jt = teacher_gradient(self.teacher, x, y, self.gradient_target, self.scale)
            js, _ = input_gradient(student, x, y, self.gradient_target, scale=self.scale)
        return {
            "cos_js_jt": float(flat_cosine(js, jt).mean()),
            "js_norm": float(js.flatten(1).norm(dim=1).mean()),
            "jt_norm": float(jt.flatten(1).norm(dim=1).mean()),
        }


class _frozen_bn_stats:
    """Perturbed finite-difference passes use batch statistics but leave running averages alone."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self.bns

    def __exit__(self, *exc):
        for m, mom in zip(self.bns, self.saved):
            m.momentum = mom
