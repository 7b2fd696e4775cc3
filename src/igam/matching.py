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
differs at the kinks (see docs/IGAM.md). fd_scheme='forward' uses [L_i(x_i + h_i v_i) - L_i(x_i)] / h_i
instead, reusing the pass at x that J_s already needs: one extra pass of B images instead of 2B (error O(h)
instead of O(h^2); docs/PERFORMANCE.md has the speed and accuracy of both).

Precision: J_t, J_s, the matching terms and the finite-difference passes run in float32 even inside an
autocast region (amp=bf16|fp16), unless amp_input_grad=True (exact mode only): small robust-teacher
gradients and difference quotients do not survive bf16 rounding by default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.gradients import flat_cosine, input_gradient, per_example_objective, teacher_gradient


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
        fd_scheme: 'central' (default; two extra passes of B images) or 'forward' (one extra pass, reusing
            the pass at x).
        amp_input_grad: keep an enclosing autocast (bf16) on for the input-gradient path too (exact mode
            only); by default that path runs in float32.
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
        adv_loss: str = "saturating",
        adv_scale: float = 1.0,
        disc_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mode: str = "exact",
        fd_step: float = 1e-2,
        fd_scheme: str = "central",
        amp_input_grad: bool = False,
    ):
        super().__init__()
        if teacher is None and lambda_diff == "auto":
            raise IgamError(
                "lambda_diff=auto scales L_diff by the teacher's gradients; without a teacher "
                "(igr) give a number, e.g. lambda_diff=1, or pass a teacher for the scale."
            )
        if mode not in ("exact", "finite-difference"):
            raise IgamError(f"grad_matching={mode!r}: choose exact or finite-difference.")
        if fd_scheme not in ("central", "forward"):
            raise IgamError(f"fd_scheme={fd_scheme!r}: choose central or forward.")
        if amp_input_grad and mode != "exact":
            raise IgamError(
                "amp_input_grad=true needs grad_matching=exact: finite-difference quotients cancel to noise "
                "in bfloat16. Drop amp_input_grad (the input-gradient path then runs in float32)."
            )
        self._teacher = (teacher,)  # a plain attribute: the frozen teacher is not saved with the objective
        self.discriminator = discriminator
        self.lambda_adv = float(lambda_adv)
        self.lambda_diff_auto = float(lambda_diff_auto)
        auto = lambda_diff == "auto"
        self.register_buffer("lambda_diff", torch.tensor(math.nan if auto else float(lambda_diff)))
        self.gradient_target, self.scale, self.diff_reduction = gradient_target, float(scale), diff_reduction
        self.adv_loss, self.adv_scale = adv_loss, float(adv_scale)
        self.disc_view = disc_view or (lambda g: g)
        self.mode, self.fd_step, self.fd_scheme = mode, float(fd_step), fd_scheme
        self.amp_input_grad = bool(amp_input_grad)
        self.use_teacher = True  # False: the igr control even when a teacher is given for the scale
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # python-side "lambda_diff is set" flag, so that no step reads the buffer back from the device
        self._lambda_known = not auto
        # the discriminator as its own update sees it (a DDP wrapper under torchrun; see wrap_discriminator)
        self._disc_update: tuple[nn.Module | None] = (None,)
        self._disc_call: tuple[nn.Module | None] = (None,)  # a compiled discriminator (accelerate)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._lambda_known = False  # re-check the loaded lambda_diff (once) on the next batch

    def wrap_discriminator(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the discriminator's own update through `wrap(discriminator)`, e.g. a DDP wrapper, so its
        gradients are averaged over ranks and every rank takes the same step. The student-side pass keeps
        using the bare module with requires_grad off: no parameter gradients, nothing for DDP to reduce."""
        if self.discriminator is not None:
            self._set_disc_grad(True)  # DDP registers the parameters that require grad at construction
            self._disc_update = (wrap(self._disc()),)

    def _disc(self) -> nn.Module:
        """The discriminator as its forward passes call it (compiled, when accelerate compiled it)."""
        return self._disc_call[0] if self._disc_call[0] is not None else self.discriminator

    def accelerate(
        self,
        compile_fn: Callable[..., nn.Module] | None = None,
        memory_format: torch.memory_format | None = None,
        example: torch.Tensor | None = None,
    ) -> None:
        """Speed settings for the teacher and the discriminator (the student is the training loop's).

        compile_fn(module, example_input, what, frozen_too=False) returns a compiled module, or the module
        itself where compilation fails; `example` is a training batch of inputs (zeros will do). Both
        networks only ever need first-order gradients, so compiling them is safe in either mode. The
        registered discriminator stays the plain module (saved and loaded as before)."""
        if memory_format is not None:
            for net in (self.teacher, self.discriminator):
                if net is not None:
                    net.to(memory_format=memory_format)
        if compile_fn is None or example is None:
            return
        if self.teacher is not None:
            self._teacher = (compile_fn(self.teacher, example, "the teacher"),)
        if self.discriminator is not None and self.lambda_adv != 0:
            view = self.disc_view(torch.cat([example, example]))
            self._disc_call = (compile_fn(self.discriminator, view, "the discriminator", frozen_too=True),)

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
        if not self._lambda_known and bool(torch.isnan(self.lambda_diff)):  # first batch only
            energy_t = jt.flatten(1).pow(2).sum(1).mean().detach().float()
            if _world_size() > 1:  # one lambda_diff for all ranks: the energy of the global batch
                import torch.distributed as tdist

                tdist.all_reduce(energy_t)
                energy_t /= _world_size()
            energy = float(energy_t)
            per = energy if self.diff_reduction == "mean" else energy * len(x)
            if per <= 0:
                raise IgamError(
                    "lambda_diff=auto: the teacher's input gradients are all zero on this batch; "
                    "give lambda_diff a number."
                )
            self.lambda_diff.fill_(self.lambda_diff_auto / per)
        self._lambda_known = True
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
            logits = self._disc()(torch.cat([self.disc_view(js), self.disc_view(jt)]))
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
        """All terms for a batch; terms['loss'] is what to backpropagate (its value is eq. 14).

        One student forward pass at x serves the cross-entropy, J_s and (fd_scheme='forward') the base point
        of the finite difference. Under DDP `student` is the wrapper and that pass is its forward; the one
        backward of terms['loss'] then fires DDP's all-reduce hooks once per parameter (all-reduced: the
        sum of every pass's contribution)."""
        with self._input_grad_precision(x):
            jt = self.teacher_gradients(x, y)
            x_in = x.detach().requires_grad_(True)
            # finite differences of the CE: J_s and the parameter gradient of sum_i L_i(x_i) (= B x that of
            # the CE) come from one backward, and the graph at x is freed (see _linear_term)
            fused = self.mode != "exact" and self.gradient_target == "ce"
            params = [q for q in student.parameters() if q.requires_grad] if fused else []
            with torch.enable_grad():
                logits = student(x_in)
                per = per_example_objective(logits, y, self.gradient_target)
                g, *w_base = torch.autograd.grad(per.sum(), [x_in, *params], allow_unused=True,
                                                 create_graph=self.mode == "exact", retain_graph=not fused)
            js = g / self.scale if self.scale != 1.0 else g
            # the CE of the same pass (for target 'ce' it is the per-example vector already computed)
            ce = per.mean() if self.gradient_target == "ce" else F.cross_entropy(logits.float(), y)
            if self.mode == "exact":
                x_in.requires_grad_(False)  # the step's backward needs no gradient w.r.t. the input itself
                match, metrics = self.matching_loss(js, jt)
                loss = ce + match
            else:
                js_leaf = js.detach().requires_grad_(True)
                with torch.enable_grad():
                    match, metrics = self.matching_loss(js_leaf, jt)
                    (v,) = torch.autograd.grad(match, js_leaf)
                if self.fd_scheme == "central" and fused:
                    surrogate = self.finite_difference(student, x, y, v / self.scale)
                    surrogate = surrogate + _linear_term(params, w_base, 1.0 / len(x))
                    loss = surrogate + ((ce + match).detach() - surrogate.detach())
                elif self.fd_scheme == "central":
                    surrogate = self.finite_difference(student, x, y, v / self.scale)
                    loss = ce + surrogate + (match.detach() - surrogate.detach())
                elif fused:
                    surrogate = self.forward_difference(student, x, y, v / self.scale,
                                                        base_grads=(params, w_base))
                    loss = surrogate + ((ce + match).detach() - surrogate.detach())
                else:  # p_y target: the graph at x carries the CE and the base point L_i(x_i)
                    surrogate = self.forward_difference(student, x, y, v / self.scale, base=per)
                    loss = ce + surrogate + (match.detach() - surrogate.detach())
                js = js.detach()
        self._cache = (js.detach(), jt)
        js_d = js.detach()
        metrics.update(
            ce=ce.detach(),
            acc=(logits.detach().argmax(1) == y).float().mean(),
            cos_js_jt=flat_cosine(js_d, jt).mean(),
            js_norm=js_d.flatten(1).norm(dim=1).mean(),
            jt_norm=jt.flatten(1).norm(dim=1).mean(),
            lambda_diff=self.lambda_diff.detach().clone(),
        )
        return {"loss": loss, **metrics}

    def _input_grad_precision(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """float32 for the input-gradient path inside an autocast region, unless amp_input_grad."""
        if self.amp_input_grad or not torch.is_autocast_enabled(x.device.type):
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, enabled=False)

    def finite_difference(
        self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """A scalar whose parameter gradient is the central difference estimate of d/dtheta <grad_x L, v>:
        sum_i [L_i(x_i + h_i v_i) - L_i(x_i - h_i v_i)] / (2 h_i), h_i = fd_step ||x_i|| / ||v_i||.

        The perturbed passes go through the module inside any DDP wrapper (DDP's forward expects one
        backward per forward): their parameter gradients add up with those of the pass at x in the one
        backward of the total loss, and DDP's hooks all-reduce that sum once. A torch.compile wrapper is
        kept (the passes are first order)."""
        vn = v.flatten(1).norm(dim=1)
        h = self.fd_step * x.flatten(1).norm(dim=1) / vn.clamp_min(1e-30)
        live = (vn > 0).to(x.dtype)
        step = (h * live).view(-1, 1, 1, 1) * v
        net = _without_ddp(student)
        with _frozen_bn_stats(net) as bns, torch.enable_grad():
            if bns:  # BatchNorm: each pass needs its own batch statistics, as at x
                plus = per_example_objective(net(x + step), y, self.gradient_target)
                minus = per_example_objective(net(x - step), y, self.gradient_target)
            else:  # one forward of 2B is cheaper
                both = per_example_objective(
                    net(torch.cat([x + step, x - step])), torch.cat([y, y]), self.gradient_target
                )
                plus, minus = both[: len(x)], both[len(x) :]
        return ((plus - minus) * live / (2 * h.clamp_min(1e-30))).sum()

    def forward_difference(
        self,
        student: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        v: torch.Tensor,
        base: torch.Tensor | None = None,
        base_grads: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None,
    ) -> torch.Tensor:
        """A scalar whose parameter gradient is CE's plus the forward-difference estimate of
        d/dtheta <grad_x L, v>, with one step h for the whole batch:

            [sum_i L_i(x_i + h v_i) - sum_i L_i(x_i)] / h,   h = fd_step ||x|| / ||v||  (batch norms)

        (a directional derivative of the batch's total loss, so train-mode BatchNorm's coupling of the
        examples is differentiated as exact mode does it). One extra pass of B images.

        base_grads ([parameters], [d sum_i L_i(x_i) / d parameter]) (target 'ce', computed with J_s): the
        base point and the CE enter as a linear term with parameter gradient (1/B - 1/h) x those gradients;
        the graph at x is not backpropagated a second time. base (per-example L_i(x_i)
        attached to the graph at x): the base point is backpropagated through that graph instead (the
        caller adds the CE). Under torchrun ||x||^2 and ||v||^2 are summed over ranks, so every rank steps
        along the same global direction and DDP's average equals one process on the concatenated batch."""
        norms = torch.stack([x.detach().pow(2).sum(), v.detach().pow(2).sum()]).float()
        if _world_size() > 1:
            import torch.distributed as tdist

            tdist.all_reduce(norms)
        h = (self.fd_step * norms[0].sqrt() / norms[1].sqrt().clamp_min(1e-30)).to(x.dtype)
        net = _without_ddp(student)
        with _frozen_bn_stats(net), torch.enable_grad():
            plus = per_example_objective(net(x + h * v), y, self.gradient_target).sum()
            if base is not None:
                return (plus - base.sum()) / h
            params, grads = base_grads or ([], [])
            return plus / h + _linear_term(params, grads, 1.0 / len(x) - 1.0 / h)

    def discriminator_step(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """One update of f_disc maximising L_adv (eq. 12) on the last batch's (J_s, J_t), held constant."""
        if self.discriminator is None or self._cache is None or self.lambda_adv == 0:
            return {}
        js, jt = self._cache
        self._set_disc_grad(True)
        disc = self._disc_update[0] if self._disc_update[0] is not None else self._disc()
        logits = disc(torch.cat([self.disc_view(js), self.disc_view(jt)]))
        ls, lt = logits[: len(js)], logits[len(js) :]
        loss = -self.adv_scale * (F.logsigmoid(lt).mean() + F.logsigmoid(-ls).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # always, so that DDP ranks meet in the same all-reduce
        grads = [p.grad for p in self.discriminator.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True
        if finite:  # NaN/Inf guard: (all-reduced) non-finite gradients skip the update on every rank
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._set_disc_grad(False)
        if not finite:  # logged as disc_skipped (the fraction of student steps with a skipped D update)
            return {"disc_skipped": torch.ones(())}
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


def _linear_term(
    params: list[torch.Tensor], grads: list[torch.Tensor | None], coef: float | torch.Tensor
) -> torch.Tensor:
    """sum_p <p, coef * grad_p> (grads held constant): a scalar whose parameter gradient is coef * grads.
    It carries gradients computed by an earlier autograd.grad into the step's one backward (and, under DDP,
    into the all-reduce that backward triggers)."""
    terms = [(p * (g * coef)).sum() for p, g in zip(params, grads) if g is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _without_ddp(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel wrappers; torch.compile wrappers are kept."""
    while type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = model.module
    return model


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
