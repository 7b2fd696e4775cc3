"""A lean double backward through train-mode BatchNorm, for exact input-gradient matching
(bn_double_backward=lean, the default; docs/PERFORMANCE.md, "A lean BatchNorm double backward").

Exact mode backpropagates through the student's input gradient J_s (paper eq. 8, built with
create_graph=True), so every train-mode BatchNorm layer's backward gets differentiated once more.
PyTorch's formula for that (NativeBatchNormBackwardBackward0) takes about 28 elementwise passes over the
activation per layer: on a resnet20 step it was a quarter of the whole exact IGAM step. This module gives
the same derivatives from about 9 passes.

Per channel, with M = N*H*W values, mean mu, invstd r = 1/sqrt(var + eps) (biased variance), x^ = (x - mu) r,
and the layer's backward (gamma = weight; means over N, H, W):

    g_x = gamma r (g_y - mean(g_y) - x^ mean(g_y x^)),   g_gamma = sum(g_y x^),   g_beta = sum(g_y).

Given the upstream gradients u (of g_x), u_gamma, u_beta, and the channel scalars gbar = mean(g_y),
c = mean(g_y x^), ubar = mean(u), d = mean(u x^), e = mean(u g_y), its derivatives are

    d/d g_y   = gamma r (u - ubar - x^ d) + u_gamma x^ + u_beta      (BatchNorm's backward of u, plus)
    d/d gamma = M r (e - ubar gbar - c d)
    d/d x     = gamma r^2 [-(e - ubar gbar - 3 c d) x^ - d (g_y - gbar) - c (u - ubar)]
                + u_gamma r (g_y - gbar - x^ c)

(derived from d x^_i / d x_j = r (delta_ij - 1/M - x^_i x^_j / M) and d(1/r) / d x_j = x^_j / M). Every
channel scalar but e comes out of BatchNorm's own backward kernels, and d/dx is one fused
a x + b g_y + c' u + d' expression. tests/test_batchnorm.py checks all of it against PyTorch in float64.

How it is switched on: `lean_batchnorm()` is a TorchFunctionMode around the student's forward pass in
exact mode. It routes each `F.batch_norm` call that uses batch statistics (train mode) in float32/64 to
`LeanBatchNorm`; everything else (eval mode, half precision, autocast, SyncBatchNorm across processes,
which does not call F.batch_norm) runs as before. The forward values and running statistics are
PyTorch's own kernel's (aten.native_batch_norm); gradients agree with PyTorch's up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _channel_view(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


class _BatchNormBackward(torch.autograd.Function):
    """(g_x, g_gamma, g_beta) of train-mode BatchNorm as a function of (g_y, x, gamma), with the lean
    backward of the module docstring. Not differentiable a third time (once_differentiable)."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):  # type: ignore[override]
        gx, gw, gb = aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps,
                                                     [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u, u_gw, u_gb):  # type: ignore[override]
        gy, x, weight, mean, invstd, sum_gy_xhat, sum_gy = ctx.saved_tensors
        sh = _channel_view(x)
        m = x.numel() // x.shape[1]
        gbar, c = sum_gy / m, sum_gy_xhat / m
        w = weight if weight is not None else torch.ones_like(invstd)
        # d/dx = a_hat * x^ + b * g_y + c_u * u + d0, per channel; x^ = r x - r mu is folded in at the end
        a_hat, b, d0 = torch.zeros_like(invstd), torch.zeros_like(invstd), torch.zeros_like(invstd)
        c_u = None
        g_gy: torch.Tensor | None = None
        g_w = torch.zeros_like(invstd)
        if u is not None:
            g_gy, sum_u_xhat, sum_u = aten.native_batch_norm_backward(
                u, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
            ubar, d = sum_u / m, sum_u_xhat / m
            e = (u * gy).sum([0, *range(2, x.dim())]) / m
            k = w * invstd * invstd
            a_hat = -k * (e - ubar * gbar - 3 * c * d)
            b = -k * d
            c_u = -k * c
            d0 = k * (d * gbar + c * ubar)
            g_w = m * invstd * (e - ubar * gbar - c * d)
        if u_gw is not None:  # g_gamma = sum(g_y x^)
            s = u_gw * invstd
            b, d0, a_hat = b + s, d0 - s * gbar, a_hat - s * c
            term = u_gw.view(sh) * ((x - mean.view(sh)) * invstd.view(sh))
            g_gy = term if g_gy is None else g_gy + term
        if u_gb is not None:  # g_beta = sum(g_y)
            g_gy = u_gb.view(sh).expand_as(x).clone() if g_gy is None else g_gy + u_gb.view(sh)
        a = a_hat * invstd
        g_x = x * a.view(sh)
        g_x.addcmul_(gy, b.view(sh))
        if c_u is not None:
            g_x.addcmul_(u, c_u.view(sh))
        g_x.add_((d0 - a * mean).view(sh))
        return g_gy, g_x, (g_w if weight is not None else None), None, None, None


class LeanBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm y = gamma x^ + beta with batch statistics (and the running statistics updated
    in place, as F.batch_norm does), whose backward is `_BatchNormBackward`: differentiable, with the lean
    double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # type: ignore[override]
        y, mean, invstd = aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum,
                                                 eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, (gw if weight is not None else None), (gb if weight is not None else None), None, None, \
            None, None


def lean_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor | None:
    """F.batch_norm's signature; the output through LeanBatchNorm, or None where the lean path does not
    apply (eval mode, not float32/64, parameters of another dtype, autocast on, weight and bias not both
    given or both absent), so that the caller runs F.batch_norm itself."""
    if not training or input.dim() < 2 or input.dtype not in (torch.float32, torch.float64):
        return None
    if torch.is_autocast_enabled(input.device.type) or (weight is None) != (bias is None):
        return None
    if any(t is not None and (t.dtype != input.dtype or t.device != input.device) for t in (weight, bias)):
        return None
    if input.numel() // input.shape[1] <= 1:  # F.batch_norm raises its own clear error for this
        return None
    return LeanBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class lean_batchnorm(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Inside `with lean_batchnorm():`, train-mode F.batch_norm calls get the lean double backward
    (module docstring); every other call runs unchanged. Graphs built inside keep it after the block."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = dict(zip(_BN_ARGS, args)) | kwargs
            out = lean_batch_norm(**bound)
            if out is not None:
                return out
        return func(*args, **kwargs)
