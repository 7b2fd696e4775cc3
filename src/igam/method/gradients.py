"""Input gradients J(x) = grad_x L (paper eqs. 8, 9, 17), per example.

The differentiated quantity is a *sum* over the batch of per-example terms, so each example's gradient
is independent of the batch size (with eval-mode or no BatchNorm; train-mode BatchNorm couples examples).
`target='ce'` differentiates the cross-entropy (paper); `target='true-prob'` the true-class probability
p_y (official code; grad p_y = -p_y grad CE). `scale` takes the gradient w.r.t. x * scale (the official
code differentiates w.r.t. 0-255 pixels: scale=255 divides J by 255).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def per_example_objective(logits: torch.Tensor, y: torch.Tensor, target: str = "ce") -> torch.Tensor:
    """The per-example quantity whose input gradient is J: CE_i, or p_y,i for target='true-prob'.
    Half-precision logits are promoted to float32 (the loss of a mixed-precision forward stays accurate)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if target == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if target == "true-prob":
        return logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    raise ValueError(f"gradient target must be 'ce' or 'true-prob', not {target!r}")


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: str = "ce",
    create_graph: bool = False,
    scale: float = 1.0,
    retain_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, logits): J = d/dx sum_i L_i(x_i) / scale, and the logits of the same forward pass.

    With create_graph=True, J is a differentiable function of the model's parameters (double backprop);
    the caller's loss can then include terms of J. retain_graph=True keeps the forward graph so the
    caller can still backpropagate a loss of the logits. Never accumulates parameter gradients itself.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        obj = per_example_objective(logits, y, target).sum()
        (g,) = torch.autograd.grad(obj, x, create_graph=create_graph, retain_graph=retain_graph)
    return (g / scale if scale != 1.0 else g), logits


def teacher_gradient(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, target: str = "ce", scale: float = 1.0
) -> torch.Tensor:
    """J_t: the frozen teacher's input gradient w.r.t. the target input, through its adapter; first order,
    detached, and no parameter gradients (the teacher's parameters do not require grad)."""
    g, _ = input_gradient(teacher, x, y, target, create_graph=False, scale=scale)
    return g.detach()


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example cosine similarity of two gradient maps."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)
