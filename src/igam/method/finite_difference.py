"""The student's parameter gradient of the matching terms from first-order passes only
(grad_matching=finite-difference; docs/IGAM.md, "finite-difference matching").

The parameter gradient of a loss of J_s = grad_x L is a Hessian-vector product. With v = dL_match/dJ_s
(J_s held constant) it is d/dtheta <grad_x L, v>, which a difference quotient of the loss along v gives:

    central:  sum_i [L_i(x_i + h_i v_i) - L_i(x_i - h_i v_i)] / (2 h_i),  h_i = fd_step ||x_i|| / ||v_i||
    forward:  [sum_i L_i(x_i + h v_i) - sum_i L_i(x_i)] / h,               h = fd_step ||x|| / ||v||

Each function returns a *surrogate*: a scalar whose parameter gradient is the estimate (its value is not
the loss; `surrogate_loss` puts the true value back). No double backward is needed, so SyncBatchNorm,
torch.compile and custom kernels work, at less memory; on ReLU networks the estimate differs from the
exact gradient at the kinks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from igam.distributed import world_size
from igam.method.gradients import per_example_objective
from igam.utils import bn_batch_stats, without_ddp


def linear_term(params: list[torch.Tensor], grads: list[torch.Tensor | None],
                coef: float | torch.Tensor) -> torch.Tensor:
    """sum_p <p, coef * grad_p> (grads held constant): a scalar whose parameter gradient is coef * grads.
    It carries gradients computed by an earlier autograd.grad into the step's one backward (and, under DDP,
    into the all-reduce that backward triggers)."""
    terms = [(p * (g * coef)).sum() for p, g in zip(params, grads) if g is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def central_difference(student: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                       fd_step: float, target: str = "ce") -> torch.Tensor:
    """Surrogate of the central difference of sum_i <grad_x L_i, v_i> (module docstring), per-example
    steps h_i. x, v: (B, C, H, W) float; y: (B,) int64. Two extra passes of B images (one of 2B without
    BatchNorm); BatchNorm running averages are left alone.

    The perturbed passes go through the module inside any DDP wrapper (DDP's forward expects one backward
    per forward): their parameter gradients add up with those of the pass at x in the one backward of the
    total loss, and DDP's hooks all-reduce that sum once. A torch.compile wrapper is kept."""
    vn = v.flatten(1).norm(dim=1)
    h = fd_step * x.flatten(1).norm(dim=1) / vn.clamp_min(1e-30)
    live = (vn > 0).to(x.dtype)
    step = (h * live).view(-1, 1, 1, 1) * v
    net = without_ddp(student)
    with bn_batch_stats(net) as bns, torch.enable_grad():
        if bns:  # BatchNorm: each pass needs its own batch statistics, as at x
            plus = per_example_objective(net(x + step), y, target)
            minus = per_example_objective(net(x - step), y, target)
        else:  # one forward of 2B is cheaper
            both = per_example_objective(net(torch.cat([x + step, x - step])), torch.cat([y, y]), target)
            plus, minus = both[: len(x)], both[len(x):]
    return ((plus - minus) * live / (2 * h.clamp_min(1e-30))).sum()


def forward_difference(student: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                       fd_step: float, target: str = "ce", base: torch.Tensor | None = None,
                       base_grads: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None
                       ) -> torch.Tensor:
    """Surrogate whose parameter gradient is CE's plus the forward-difference estimate of
    d/dtheta sum_i <grad_x L_i, v_i>, with one step h for the whole batch (a directional derivative of the
    batch's total loss, so train-mode BatchNorm's coupling of the examples is differentiated as exact
    mode does it). One extra pass of B images.

    base_grads ([parameters], [d sum_i L_i(x_i) / d parameter]) (target 'ce', computed with J_s): the
    base point and the CE enter as a linear term with parameter gradient (1/B - 1/h) x those gradients;
    the graph at x is not backpropagated a second time. base (per-example L_i(x_i) attached to the graph
    at x): the base point is backpropagated through that graph instead (the caller adds the CE). Under
    torchrun ||x||^2 and ||v||^2 are summed over ranks, so every rank steps along the same global direction
    and DDP's average equals one process on the concatenated batch."""
    norms = torch.stack([x.detach().pow(2).sum(), v.detach().pow(2).sum()]).float()
    if world_size() > 1:
        import torch.distributed as tdist

        tdist.all_reduce(norms)
    h = (fd_step * norms[0].sqrt() / norms[1].sqrt().clamp_min(1e-30)).to(x.dtype)
    net = without_ddp(student)
    with bn_batch_stats(net), torch.enable_grad():
        plus = per_example_objective(net(x + h * v), y, target).sum()
        if base is not None:
            return (plus - base.sum()) / h
        params, grads = base_grads or ([], [])
        return plus / h + linear_term(params, grads, 1.0 / len(x) - 1.0 / h)


def surrogate_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
                   ce: torch.Tensor, match: torch.Tensor, per: torch.Tensor,
                   params: list[torch.Tensor], base_grads: list[torch.Tensor | None], fused: bool,
                   scheme: str, fd_step: float, target: str) -> torch.Tensor:
    """The student's loss in finite-difference mode: value ce + match (eq. 14), parameter gradient
    CE's plus the estimate of the matching terms' along v = dL_match/dJ_s (in x units).

    fused (target 'ce'): the parameter gradient of sum_i L_i(x_i) was computed with J_s (`base_grads`
    for `params`) and the graph at x is freed; otherwise `ce` and `per` are attached to that graph."""
    if scheme == "central":
        surrogate = central_difference(student, x, y, v, fd_step, target)
        if fused:
            surrogate = surrogate + linear_term(params, base_grads, 1.0 / len(x))
            return surrogate + ((ce + match).detach() - surrogate.detach())
        return ce + surrogate + (match.detach() - surrogate.detach())
    if fused:
        surrogate = forward_difference(student, x, y, v, fd_step, target, base_grads=(params, base_grads))
        return surrogate + ((ce + match).detach() - surrogate.detach())
    # p_y target: the graph at x carries the CE and the base point L_i(x_i)
    surrogate = forward_difference(student, x, y, v, fd_step, target, base=per)
    return ce + surrogate + (match.detach() - surrogate.detach())
