"""Input Gradient Adversarial Matching as a loss module you can drop into any PyTorch training loop.

    igm = InputGradientMatching(teacher, discriminator, lambda_adv=1.0, lambda_diff=10.0,
                                disc_optimizer=disc_opt)
    terms = igm(student, x, y)          # paper eq. 14: CE + lambda_adv L_adv + lambda_diff L_diff
    terms["loss"].backward(); opt.step()
    igm.discriminator_step(terms)       # eq. 12: the discriminator maximises L_adv (every k steps)

Algorithm 1 of the paper, one step, in the order `forward` runs it:
    J_t = grad_x L(f_t(A x + b), y)                   the frozen teacher's input gradient (eqs. 9, 17)
    J_s = grad_x L(f_s(x), y)                         the student's (eq. 8), differentiable in exact mode
    L_diff = E ||J_s - J_t||^2                        (eq. 13)
    L_adv  = E log f_disc(J_t) + E log(1 - f_disc(J_s))   (eq. 10; f_disc held fixed)
    loss   = CE + lambda_adv L_adv + lambda_diff L_diff   (eq. 14)
and, every k steps, f_disc takes a step maximising L_adv on the step's detached (J_s, J_t) (eq. 12).

The student's parameter gradient of the matching terms is a Hessian-vector product: mode='exact' takes it
by double backprop (J_s built with create_graph=True); mode='finite-difference' from first-order passes
(igam.method.finite_difference).

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

from igam.distributed import world_size
from igam.errors import IgamError
from igam.method import finite_difference
from igam.method.discriminator import DiscriminatorTrainer, GradientDiscriminator, adversarial_loss
from igam.method.double_backward import lean_double_backward
from igam.method.gradients import flat_cosine, input_gradient, per_example_objective, teacher_gradient
from igam.method.teacher_cache import TeacherGradientCache, teacher_cache_blockers

Terms = dict[str, torch.Tensor]


class InputGradientMatching(nn.Module):
    """IGAM loss terms for a batch (paper eqs. 7-14).

    Args:
        teacher: frozen network mapping *target* inputs (B, C, H, W) in [0, 1] to target logits (adapter
            included), or None for the `igr` control (J_t = 0: plain input-gradient-norm regularisation,
            Ross & Doshi-Velez 2018).
        discriminator: a GradientDiscriminator, or None (lambda_adv = 0).
        lambda_adv, lambda_diff: weights of L_adv (eq. 10) and L_diff (eq. 13); lambda_diff='auto' sets
            lambda_diff_auto / E||J_t||^2 on the first batch (`resolve_lambda_diff`; then fixed, saved with
            the run as the buffer `lambda_diff`).
        use_teacher: False gives the igr control (J_t = 0) while a given teacher still sets the scale of
            lambda_diff='auto', so igr and IGAM runs are comparable.
        gradient_target: 'ce' (paper eqs. 8-9) or 'true-prob' (official code).
        scale: gradients w.r.t. x * scale (official: 255), i.e. J / scale.
        diff_reduction: L_diff as the batch 'mean' (paper) or 'sum' (official) of per-example ||J_s-J_t||^2.
        adv_loss: 'saturating' (the student minimises eq. 10 itself) or 'non-saturating' (maximises
            log f_disc(J_s), the usual GAN trick; same fixed point, stronger early gradients).
        adv_scale: multiplies L_adv for student and discriminator (official: 0.5, its mean over 2B).
        disc_view: maps a target-space gradient to what the discriminator sees (crop adapters crop).
        disc_optimizer, disc_every, disc_follow_lr: the discriminator's optimiser, update cadence in
            steps, and whether its lr follows the student's schedule (see DiscriminatorTrainer).
        mode: 'exact' or 'finite-difference'; fd_step: relative finite-difference step.
        fd_scheme: 'central' (two extra passes of B images) or 'forward' (one extra pass, reusing the pass
            at x).
        amp_input_grad: keep an enclosing autocast (bf16) on for the input-gradient path too (exact mode
            only); by default that path runs in float32.
        teacher_cache: keep each training image's J_t after its first computation
            (igam.method.teacher_cache) and serve it when `forward` is given the batch's training-set
            `index`; exact only for inputs that do not change between epochs and a deterministic teacher.
        cache_device_limit_bytes: the largest cache kept on a CUDA device (None: a quarter of the free
            memory); above it the cache lives in pinned host memory.
        double_backward: exact mode's double backward through the student's convolutions and train-mode
            BatchNorm: 'lean' (igam.method.double_backward: the same derivatives from leaner kernels) or
            'torch' (PyTorch's own formulas). Equal up to float rounding.
        diff_loss: the per-example L_diff: 'l2', ||J_s - J_t||^2 (eq. 13), or 'cos', 1 - cos(J_s, J_t): the
            direction only, as in perceptually aligned gradients (Ganz, Kawar & Elad, ICML 2023), with the
            robust teacher's gradient as the target direction; lambda_diff='auto' is then lambda_diff_auto
            itself (the cosine has no scale to match).
        include_ce: False leaves the cross-entropy out of 'loss' (loss = the weighted matching terms only),
            for a matching term added to another method's loss; exact mode only.

    Raises:
        IgamError: lambda_diff='auto' without a teacher, an unknown mode or scheme, amp_input_grad in
            finite-difference mode, teacher_cache with a teacher that makes it wrong (train-mode
            BatchNorm, a random adapter), an unknown double_backward.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        discriminator: GradientDiscriminator | None = None,
        *,
        lambda_adv: float = 1.0,
        lambda_diff: float | str = "auto",
        lambda_diff_auto: float = 2.3,
        use_teacher: bool = True,
        gradient_target: str = "ce",
        scale: float = 1.0,
        diff_reduction: str = "mean",
        adv_loss: str = "saturating",
        adv_scale: float = 1.0,
        disc_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
        disc_optimizer: torch.optim.Optimizer | None = None,
        disc_every: int = 1,
        disc_follow_lr: bool = False,
        mode: str = "exact",
        fd_step: float = 1e-2,
        fd_scheme: str = "central",
        amp_input_grad: bool = False,
        teacher_cache: bool = False,
        cache_device_limit_bytes: int | None = None,
        double_backward: str = "lean",
        diff_loss: str = "l2",
        include_ce: bool = True,
    ):
        super().__init__()
        if diff_loss not in ("l2", "cos"):
            raise IgamError(f"diff_loss={diff_loss!r}: choose l2 or cos.")
        if not include_ce and mode != "exact":
            raise IgamError("An input-gradient term added to another method's loss needs grad_matching=exact "
                            "(the finite-difference surrogate carries the cross-entropy's gradient).")
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
        if double_backward not in ("lean", "torch"):
            raise IgamError(f"double_backward={double_backward!r}: choose lean or torch.")
        blockers = teacher_cache_blockers(teacher) if teacher_cache else []
        if blockers:
            raise IgamError(f"teacher_cache: cached teacher gradients would be wrong: {'; '.join(blockers)}.")
        # not a module or buffer: the cache is never saved (it refills lazily after a resume)
        self.teacher_cache = (TeacherGradientCache(cache_device_limit_bytes)
                              if teacher_cache and teacher is not None else None)
        self._teacher = (teacher,)  # a plain attribute: the frozen teacher is not saved with the objective
        self.discriminator = discriminator  # registered: saved with the objective
        self.adversary = (DiscriminatorTrainer(discriminator, disc_optimizer, every=disc_every,
                                               follow_lr=disc_follow_lr, adv_scale=adv_scale)
                          if discriminator is not None and lambda_adv != 0 else None)
        self.lambda_adv = float(lambda_adv)
        self.lambda_diff_auto = float(lambda_diff_auto)
        auto = lambda_diff == "auto"
        self.register_buffer("lambda_diff", torch.tensor(math.nan if auto else float(lambda_diff)))
        # python-side "lambda_diff is set" flag, so that no step reads the buffer back from the device
        self._lambda_known = not auto
        self.use_teacher = use_teacher
        self.gradient_target, self.scale, self.diff_reduction = gradient_target, float(scale), diff_reduction
        self.adv_loss, self.adv_scale = adv_loss, float(adv_scale)
        self.disc_view = disc_view or (lambda g: g)
        self.mode, self.fd_step, self.fd_scheme = mode, float(fd_step), fd_scheme
        self.amp_input_grad = bool(amp_input_grad)
        self.double_backward = double_backward
        self.diff_loss, self.include_ce = diff_loss, include_ce

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._lambda_known = False  # re-check the loaded lambda_diff (once) on the next batch

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    # ----------------------------------------------------------------------------------- the paper
    def teacher_gradients(self, x: torch.Tensor, y: torch.Tensor,
                          index: torch.Tensor | None = None) -> torch.Tensor:
        """J_t (eqs. 9, 17): (B, C, H, W) like x, detached; zeros without a teacher. With the teacher
        cache on and `index` (B,) int64 (the batch's training-set positions) given, each image's J_t is
        computed once and then served from the cache."""
        if self.teacher is None:
            return torch.zeros_like(x)

        def compute(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return teacher_gradient(self.teacher, xb, yb, self.gradient_target, self.scale)

        if self.teacher_cache is not None and index is not None:
            return self.teacher_cache.lookup(index, x, y, compute)
        return compute(x, y)

    def resolve_lambda_diff(self, jt: torch.Tensor, batch_size: int) -> None:
        """lambda_diff='auto': set it to lambda_diff_auto / E||J_t||^2 from this batch's J_t (B, C, H, W)
        (under torchrun, of the global batch), once; a number given or loaded is kept.

        Raises:
            IgamError: when J_t is zero on the whole batch (no scale to take).
        """
        if not self._lambda_known and bool(torch.isnan(self.lambda_diff)):
            energy_t = jt.flatten(1).pow(2).sum(1).mean().detach().float()
            if world_size() > 1:  # one lambda_diff for all ranks: the energy of the global batch
                import torch.distributed as tdist

                tdist.all_reduce(energy_t)
                energy_t /= world_size()
            energy = 1.0 if self.diff_loss == "cos" else float(energy_t)  # the cosine has no scale
            per = energy if self.diff_reduction == "mean" else energy * batch_size
            if per <= 0:
                raise IgamError(
                    "lambda_diff=auto: the teacher's input gradients are all zero on this batch; "
                    "give lambda_diff a number."
                )
            self.lambda_diff.fill_(self.lambda_diff_auto / per)
        self._lambda_known = True

    def matching_loss(self, js: torch.Tensor, jt: torch.Tensor) -> tuple[torch.Tensor, Terms]:
        """lambda_diff L_diff (eq. 13) + lambda_adv L_adv (eq. 10, the student's side; f_disc held fixed)
        for gradient maps js, jt (B, C, H, W). Returns (the weighted sum, {l_diff, l_adv, disc
        accuracies}). L_diff per example is ||J_s - J_t||^2 (diff_loss 'l2') or 1 - cos(J_s, J_t) ('cos')."""
        if self.diff_loss == "cos":
            d = 1 - flat_cosine(js, jt)
        else:
            d = (js - jt).flatten(1).pow(2).sum(1)
        l_diff = d.mean() if self.diff_reduction == "mean" else d.sum()
        total = self.lambda_diff * l_diff
        metrics = {"l_diff": l_diff.detach()}
        if self.adversary is not None:
            logits = self.adversary.logits(torch.cat([self.disc_view(js), self.disc_view(jt)]))
            ls, lt = logits[: len(js)], logits[len(js):]
            l_adv = self.adv_scale * adversarial_loss(ls, lt)
            student = l_adv if self.adv_loss == "saturating" else -self.adv_scale * F.logsigmoid(ls).mean()
            total = total + self.lambda_adv * student
            metrics.update(
                l_adv=l_adv.detach(),
                disc_acc_student=(ls.detach() < 0).float().mean(),
                disc_acc_teacher=(lt.detach() > 0).float().mean(),
            )
        return total, metrics

    def forward(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                index: torch.Tensor | None = None) -> Terms:
        """All terms for a batch x (B, C, H, W) float in [0, 1], y (B,) int64; `index` (B,) int64, the
        training-set positions of the batch's images, lets the teacher cache serve J_t (None: computed).

        Returns a dict of tensors: 'loss' (scalar to backpropagate; its value is eq. 14), the scalar
        metrics ce, acc, l_diff, l_adv, disc accuracies, cos_js_jt, js_norm, jt_norm, lambda_diff, and
        'js', 'jt' (B, C, H, W), detached: the step's gradient maps, which `discriminator_step` takes.

        One student forward pass at x serves the cross-entropy, J_s and (fd_scheme='forward') the base point
        of the finite difference. Under DDP `student` is the wrapper and that pass is its forward; the one
        backward of terms['loss'] then fires DDP's all-reduce hooks once per parameter."""
        with self._input_grad_precision(x):
            if self.use_teacher or not self._lambda_known:  # igr: the teacher only sets lambda_diff
                jt = self.teacher_gradients(x, y, index)
                self.resolve_lambda_diff(jt, len(x))
            if not self.use_teacher:
                jt = torch.zeros_like(x)
            x_in = x.detach().requires_grad_(True)
            exact = self.mode == "exact"
            # finite differences of the CE: J_s and the parameter gradient of sum_i L_i(x_i) (= B x that of
            # the CE) come from one backward, and the graph at x is freed (finite_difference.linear_term)
            fused = not exact and self.gradient_target == "ce"
            params = [q for q in student.parameters() if q.requires_grad] if fused else []
            lean = exact and self.double_backward == "lean"
            with torch.enable_grad(), (lean_double_backward() if lean else contextlib.nullcontext()):
                logits = student(x_in)
            with torch.enable_grad():
                per = per_example_objective(logits, y, self.gradient_target)
                g, *base_grads = torch.autograd.grad(per.sum(), [x_in, *params], allow_unused=True,
                                                     create_graph=exact, retain_graph=not fused)
            js = g / self.scale if self.scale != 1.0 else g
            # the CE of the same pass (for target 'ce' it is the per-example vector already computed)
            ce = per.mean() if self.gradient_target == "ce" else F.cross_entropy(logits.float(), y)
            if exact:
                x_in.requires_grad_(False)  # the step's backward needs no gradient w.r.t. the input itself
                match, metrics = self.matching_loss(js, jt)
                loss = ce + match if self.include_ce else match
            else:
                js_leaf = js.detach().requires_grad_(True)
                with torch.enable_grad():
                    match, metrics = self.matching_loss(js_leaf, jt)
                    (v,) = torch.autograd.grad(match, js_leaf)
                loss = finite_difference.surrogate_loss(
                    student, x, y, v / self.scale, ce=ce, match=match, per=per, params=params,
                    base_grads=base_grads, fused=fused, scheme=self.fd_scheme, fd_step=self.fd_step,
                    target=self.gradient_target)
        js = js.detach()
        metrics.update(
            ce=ce.detach(),
            acc=(logits.detach().argmax(1) == y).float().mean(),
            cos_js_jt=flat_cosine(js, jt).mean(),
            js_norm=js.flatten(1).norm(dim=1).mean(),
            jt_norm=jt.flatten(1).norm(dim=1).mean(),
            lambda_diff=self.lambda_diff.detach().clone(),
        )
        return {"loss": loss, **metrics, "js": js, "jt": jt}

    def discriminator_step(self, terms: Terms, optimizer: torch.optim.Optimizer | None = None) -> Terms:
        """One update of f_disc maximising L_adv (eq. 12) on a step's terms['js'], terms['jt'], held
        constant. Returns {'disc_loss'} (or {'disc_skipped'}; {} without a discriminator)."""
        if self.adversary is None:
            return {}
        js, jt = terms["js"].detach(), terms["jt"].detach()
        return self.adversary.update(self.disc_view(js), self.disc_view(jt), optimizer)

    # ------------------------------------------------------------------------------------ plumbing
    def wrap_discriminator(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Under torchrun: route the discriminator's own update through wrap(discriminator), e.g. a DDP
        wrapper, so its gradients are averaged over ranks (see DiscriminatorTrainer.wrap_ddp)."""
        if self.adversary is not None:
            self.adversary.wrap_ddp(wrap)

    def _input_grad_precision(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """float32 for the input-gradient path inside an autocast region, unless amp_input_grad."""
        if self.amp_input_grad or not torch.is_autocast_enabled(x.device.type):
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, enabled=False)

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
        if self.adversary is not None:
            self.adversary.compile(compile_fn, self.disc_view(torch.cat([example, example])))

    @torch.no_grad()
    def held_out_metrics(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """cos(J_s, J_t) and gradient norms on held-out images x (B, C, H, W) in [0, 1] (eval mode)."""
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
