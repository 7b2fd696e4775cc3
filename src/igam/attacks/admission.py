"""RobustBench's admission checks of a model (Croce et al. 2021, "RobustBench", sec. 3: the model zoo admits
deterministic models with non-zero gradients w.r.t. the input and no optimisation loop at inference time;
randomised or test-time-optimising defences need adaptive evaluations of their own).

Three checks, each measured on a small batch in the evaluation's BatchNorm mode:

- deterministic: two forwards of the same batch give identical logits, and a forward with autograd on (as
  the attacks run the model: input requiring grad) gives the logits of a forward under `torch.no_grad()`
  (as accuracy is counted). A model that draws random numbers (dropout left on, `torch.randn` noise) fails
  the first; one that behaves differently when it is being differentiated fails the second (the attacks
  would then attack another function than the one scored). Bit-identical logits pass; differences up to
  `DET_RTOL` x max|logit| pass too and are reported (floating-point non-determinism of GPU kernels), larger
  ones fail.
- input gradients non-zero and finite: `checks.gradient_stats` / the `gradients` masking check, which
  runs on every evaluation (not repeated here).
- no_inference_optimisation: forwards under `torch.no_grad()` must leave every parameter, buffer and
  parameter `.grad` bit-identical, and must neither switch autograd back on (no torch op runs with grad
  mode enabled) nor call `torch.autograd.grad` / `backward`. Both are observed through a
  `torch.overrides.TorchFunctionMode`, which sees every torch function and Tensor method the forward calls,
  however the model imported them. This catches test-time adaptation (e.g. TENT: parameters or BatchNorm
  statistics updated by the forward) and gradient-based input purification (an inner attack or denoising
  loop that re-enables autograd).

  Forward time is deliberately not judged: "much slower than expected" has no sound reference (the cost of
  a forward depends on the architecture, the device and the machine's load, and an inner loop slows the
  gradient pass just as much), so a timing threshold would both miss loops and flag slow honest models. A
  loop that optimises without autograd and without touching the model's state (e.g. hand-written finite
  differences) is not detected by these checks; a randomised one fails `deterministic`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from igam.utils import bn_mode

ADMISSION_CHECKS = ("deterministic", "no_inference_optimisation")
DET_RTOL = 1e-5  # logits may differ by this share of max|logit| (kernel non-determinism) and still pass
ADMISSION_N = 32  # images the admission checks use (the first of the check images)

_AUTOGRAD_CALLS = {torch.autograd.grad: "torch.autograd.grad",
                   torch.autograd.backward: "torch.autograd.backward",
                   torch.Tensor.backward: "Tensor.backward"}


class InferenceProbe(TorchFunctionMode):
    """Watches a forward run under `torch.no_grad()`: torch ops that run with grad mode enabled anyway
    (`grad_ops`, with up to 5 of their names) and calls of the autograd engine (`autograd_calls`)."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_ops = 0
        self.grad_op_names: list[str] = []
        self.autograd_calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        name = _AUTOGRAD_CALLS.get(func)
        if name is not None:
            self.autograd_calls.append(name)
        elif torch.is_grad_enabled():
            self.grad_ops += 1
            label = getattr(func, "__name__", str(func))
            if len(self.grad_op_names) < 5 and label not in self.grad_op_names:
                self.grad_op_names.append(label)
        return func(*args, **(kwargs or {}))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # NaN == NaN here: an unchanged NaN is not a change
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))
    return bool(torch.equal(a, b))


def _logits(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple | list) else out).detach().float()


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float, float]:
    """(identical, max |a - b|, tolerance) of two logit tensors."""
    if a.shape != b.shape:
        return False, float("inf"), 0.0
    if torch.equal(a, b):
        return True, 0.0, 0.0
    diff = (a - b).abs().nan_to_num(float("inf")).max().item()
    scale = max(a.abs().nan_to_num(0.0).max().item(), b.abs().nan_to_num(0.0).max().item(), 1e-12)
    return False, diff, DET_RTOL * scale


def admission_checks(model: nn.Module, x: torch.Tensor, bn: str = "eval") -> dict[str, dict[str, Any]]:
    """RobustBench's admission checks `deterministic` and `no_inference_optimisation` (see the module
    docstring; the gradient check is `gradients` of the masking checks) of `model` on float images
    x (N, C, H, W) in [0, 1] (the first `ADMISSION_N` are used), in BatchNorm mode `bn`.

    Returns {name: {"passed": bool, "detail": str, ...measurements}}. The model's parameters, buffers and
    `.grad` are put back as they were, so a failing model leaves the evaluation's later steps unaffected.
    """
    device = next(model.parameters()).device
    xb = x[:ADMISSION_N].to(device)
    state, grads = _state(model), _grads(model)
    probe = InferenceProbe()
    try:
        with bn_mode(model, bn):
            with torch.no_grad(), probe:
                first = _logits(model(xb))
                second = _logits(model(xb))
            requires_grad_out = first.requires_grad or second.requires_grad
            with torch.enable_grad():
                xg = xb.clone().requires_grad_(True)
                graded = _logits(model(xg))
        changed = [k for k, v in _state(model).items() if k not in state or not _same(state[k], v)]
        grads_changed = sum(not _same(a, p.grad) for a, p in zip(grads, model.parameters()))
    finally:
        with torch.no_grad():
            now = model.state_dict()
            for k, v in state.items():
                if k in now and isinstance(now[k], torch.Tensor) and now[k].shape == v.shape:
                    now[k].copy_(v)
        for g, p in zip(grads, model.parameters()):
            p.grad = g

    same, diff, tol = _difference(first, second)
    same_g, diff_g, tol_g = _difference(first, graded)
    fails = []
    if not same and diff > tol:
        fails.append(f"two forwards of the same {len(xb)} images differ (max |logit difference| {diff:.3g}): "
                     "the output is random (dropout left on, noise) or depends on state the forward changes "
                     "(see no_inference_optimisation); a randomised model needs --attacks autoattack-rand "
                     "(EOT) and is not admitted as a deterministic one")
    if not same_g and diff_g > tol_g:
        fails.append(f"with autograd on (as attacks run it) the logits differ from those under no_grad (as "
                     f"accuracy is counted) by up to {diff_g:.3g}: the attacks see another function than the "
                     "one scored")
    if fails:
        det = {"passed": False, "detail": "; ".join(fails)}
    elif same and same_g:
        det = {"passed": True, "detail": f"bit-identical logits from two forwards and with autograd on, "
                                         f"{len(xb)} images"}
    else:
        det = {"passed": True, "detail": f"logits differ by at most {max(diff, diff_g):.3g} (tolerance "
                                         f"{max(tol, tol_g):.3g}: floating-point non-determinism of the "
                                         f"kernels), {len(xb)} images"}
    det.update(n=len(xb), max_diff=max(diff, diff_g))

    why = []
    if changed:
        why.append(f"the forward changed {len(changed)} parameter(s)/buffer(s) ({', '.join(changed[:3])}"
                   f"{', ...' if len(changed) > 3 else ''}): it adapts at test time")
    if grads_changed:
        why.append(f"the forward changed the .grad of {grads_changed} parameter(s)")
    if probe.autograd_calls:
        calls = sorted(set(probe.autograd_calls))
        why.append(f"the forward called {', '.join(calls)} {len(probe.autograd_calls)} time(s) under no_grad")
    if probe.grad_ops or requires_grad_out:
        ops = f" ({', '.join(probe.grad_op_names)}, ...)" if probe.grad_op_names else ""
        why.append(f"the forward switched autograd back on: {probe.grad_ops} torch op(s){ops} ran with grad "
                   "mode enabled under no_grad")
    if why:
        opt: dict[str, Any] = {"passed": False, "detail": "; ".join(why) + ": an optimisation loop at "
                               "inference (RobustBench refuses it; such a defence needs an adaptive attack "
                               "through its loop)"}
    else:
        opt = {"passed": True, "detail": f"no parameter, buffer or .grad changed; no autograd under no_grad "
                                         f"({len(xb)} images, 2 forwards)"}
    opt.update(changed=changed[:10], autograd_calls=len(probe.autograd_calls), grad_mode_ops=probe.grad_ops)
    return {"deterministic": det, "no_inference_optimisation": opt}
