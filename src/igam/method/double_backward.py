"""A lean double backward through the student's convolutions and train-mode BatchNorm, for exact
input-gradient matching (double_backward=lean, the default; docs/IGAM.md, docs/PERFORMANCE.md).

Exact mode backpropagates through the student's input gradient J_s (paper eq. 8, built with
create_graph=True), so the backward of every layer gets differentiated once more. For two layer types
PyTorch's formulas for that are much slower than they need to be, and `lean_double_backward()` replaces
them with the same derivatives:

Convolution. J_s's graph holds g_x = conv_transpose(g_y, W) for each convolution. Its derivatives, given
the upstream gradient u (of g_x), are d/dg_y = conv(u, W) and d/dW = the weight gradient of a convolution
with input u and output gradient g_y, i.e. one forward and one weight-gradient kernel. PyTorch's formula
(ConvolutionBackwardBackward0) computes the weight part as a convolution over transposed, copied tensors,
which on a CPU is up to 2x slower than the weight-gradient kernel. The first-order backward computes only
the gradients the running backward pass needs (as PyTorch's own node does): J_s's pass asks for g_x
alone, not for the parameter gradients.

BatchNorm (train mode). Per channel, with M = N*H*W values, mean mu, invstd r = 1/sqrt(var + eps) (biased
variance), x^ = (x - mu) r, and the layer's backward (gamma = weight; means over N, H, W):

    g_x = gamma r (g_y - mean(g_y) - x^ mean(g_y x^)),   g_gamma = sum(g_y x^),   g_beta = sum(g_y).

Given the upstream gradients u (of g_x), u_gamma, u_beta, and the channel scalars gbar = mean(g_y),
c = mean(g_y x^), ubar = mean(u), d = mean(u x^), e = mean(u g_y), its derivatives are

    d/d g_y   = gamma r (u - ubar - x^ d) + u_gamma x^ + u_beta      (BatchNorm's backward of u, plus)
    d/d gamma = M r (e - ubar gbar - c d)
    d/d x     = gamma r^2 [-(e - ubar gbar - 3 c d) x^ - d (g_y - gbar) - c (u - ubar)]
                + u_gamma r (g_y - gbar - x^ c)

(from d x^_i / d x_j = r (delta_ij - 1/M - x^_i x^_j / M) and d(1/r) / d x_j = x^_j / M). Every channel
scalar but e comes out of BatchNorm's own backward kernel, and d/dx is one fused a x + b g_y + c' u + d'
per channel: about 9 passes over the activation where PyTorch's NativeBatchNormBackwardBackward0 takes
about 28.

`lean_double_backward()` is a TorchFunctionMode around the student's forward pass in exact mode. It routes
`F.conv2d` (numeric padding, batched 4-d input) and `F.batch_norm` with batch statistics, in float32/64
outside autocast, to the autograd Functions below; every other call (eval-mode BatchNorm, strings as
padding, transposed or 1-d/3-d convolutions, half precision, SyncBatchNorm across processes, which does
not call F.batch_norm) runs as before, and so does everything while saved-tensor hooks are installed
(activation checkpointing, save_on_cpu) or inside vmap/grad transforms. Forward values and BatchNorm
running statistics are PyTorch's own CPU kernels', bit for bit (on CUDA, F.batch_norm may pick cuDNN,
this path PyTorch's native kernel: equal to float rounding); gradients agree with PyTorch's up to float
rounding (tests/test_double_backward.py checks every derivative in float64). Second derivatives only: a
backward through them with create_graph=True raises (use double_backward=torch for third order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from igam.errors import IgamError

aten = torch.ops.aten
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
THIRD_ORDER = ("double_backward=lean gives first and second derivatives only, and this backward pass "
               "builds a graph to differentiate them once more (create_graph=True); use "
               "double_backward=torch (or lean_double_backward() off) for third-order derivatives.")


def _needed(ctx, i: int) -> bool:
    """Whether the running backward pass needs the gradient of the Function's i-th input (PyTorch's own
    nodes compute only those; a custom Function's needs_input_grad only says that it requires grad)."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if _will_execute is None or node is None:
        return True
    try:
        return bool(_will_execute(node))
    except RuntimeError:  # not inside the engine's backward (e.g. a direct call): assume it is needed
        return True


# ------------------------------------------------------------------------------------- convolution
class _ConvInputGradient(torch.autograd.Function):
    """g_x = conv_transpose(g_y, W) of a convolution, as a function of (g_y, W), with the lean backward
    of the module docstring. Not differentiable a third time: a backward with create_graph=True raises."""

    @staticmethod
    def forward(ctx, gy, x, weight, stride, padding, dilation, groups):  # type: ignore[override]
        out_pad = [0] * len(stride)
        gx = aten.convolution_backward(gy, x, weight, None, stride, padding, dilation, False, out_pad, groups,
                                       [True, False, False])[0]
        ctx.save_for_backward(gy, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.set_materialize_grads(False)
        return gx

    @staticmethod
    def backward(ctx, u):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise IgamError(THIRD_ORDER)
        gy, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        out_pad = [0] * len(stride)
        d_gy = d_w = None
        if u is None:
            return None, None, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            d_gy = aten.convolution(u, weight, None, stride, padding, dilation, False, out_pad, groups)
        if ctx.needs_input_grad[2]:
            d_w = aten.convolution_backward(gy, u, weight, None, stride, padding, dilation, False, out_pad,
                                            groups, [False, True, False])[1]
        return d_gy, None, d_w, None, None, None, None


class LeanConv2d(torch.autograd.Function):
    """F.conv2d(x, W, b, ...) whose backward builds g_x through `_ConvInputGradient` when it is being
    differentiated (create_graph), and computes only the gradients the backward pass needs."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        out_pad = [0] * len(stride)
        mask = [_needed(ctx, 0), _needed(ctx, 1), ctx.has_bias and _needed(ctx, 2)]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        if not torch.is_grad_enabled():  # a first-order backward: PyTorch's kernel, as F.conv2d's node
            return (*aten.convolution_backward(gy, x, weight, bias_sizes, stride, padding, dilation, False,
                                               out_pad, groups, mask), None, None, None, None)
        gx = _ConvInputGradient.apply(gy, x, weight, stride, padding, dilation, groups) if mask[0] else None
        gw = gb = None
        if mask[1] or mask[2]:  # parameter gradients that are differentiated too: PyTorch's own formula
            _, gw, gb = aten.convolution_backward(gy, x, weight, bias_sizes, stride, padding, dilation, False,
                                                  out_pad, groups, [False, mask[1], mask[2]])
        return gx, gw, gb, None, None, None, None


def _as_list(v: int | tuple[int, ...] | list[int], n: int) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [int(v)] * n


def lean_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                dilation: int | tuple[int, int] = 1, groups: int = 1) -> torch.Tensor | None:
    """F.conv2d's signature; the output through LeanConv2d, or None where the lean path does not apply
    (padding given as 'same', an unbatched input, not float32/64, mixed dtypes or devices, autocast on)."""
    if isinstance(padding, str):
        if padding != "valid":
            return None
        padding = 0
    if input.dim() != 4 or not _plain_float(input, weight, bias):
        return None
    return LeanConv2d.apply(input, weight, bias, _as_list(stride, 2), _as_list(padding, 2),
                            _as_list(dilation, 2), int(groups))


# ---------------------------------------------------------------------------------------- BatchNorm
def _channel_view(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


class _BatchNormBackward(torch.autograd.Function):
    """(g_x, g_gamma, g_beta) of train-mode BatchNorm as a function of (g_y, x, gamma), with the lean
    backward of the module docstring. Not differentiable a third time: a backward with create_graph=True
    raises."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):  # type: ignore[override]
        gx, gw, gb = aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps,
                                                     [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        ctx.eps = eps
        ctx.set_materialize_grads(False)  # g_gamma, g_beta unused downstream (as in J_s): no zero passes
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u, u_gw, u_gb):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise IgamError(THIRD_ORDER)
        if u is None and u_gw is None and u_gb is None:
            return None, None, None, None, None, None
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
    apply (eval mode, not float32/64, mixed dtypes or devices, autocast on, only one of weight and bias),
    so that the caller runs F.batch_norm itself."""
    if not training or input.dim() < 2 or not _plain_float(input, weight, bias):
        return None
    if (weight is None) != (bias is None):
        return None
    if input.numel() // input.shape[1] <= 1:  # F.batch_norm raises its own clear error for this
        return None
    return LeanBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)


# ------------------------------------------------------------------------------------- the switch
def _plain_float(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """float32/64 tensors of one dtype on one device, autocast off."""
    if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        return False
    return all(t is None or (t.dtype == x.dtype and t.device == x.device) for t in others)


def _steps_aside() -> bool:
    """True where the lean Functions would be wrong or refused: saved-tensor hooks are installed (e.g.
    torch.utils.checkpoint without reentrance, which recomputes the forward later, outside this mode, and
    hands the recomputed saved tensors back by position; also torch.autograd.graph.save_on_cpu), or a
    functorch transform (vmap, grad) is running."""
    if _saved_tensor_hooks is not None and _saved_tensor_hooks(False) is not None:
        return True
    return _functorch_level is not None and _functorch_level() is not None


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class lean_double_backward(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Inside `with lean_double_backward():`, F.conv2d and train-mode F.batch_norm calls get the lean
    double backward (module docstring); every other call runs unchanged. Graphs built inside keep it
    after the block."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = None
        if _steps_aside():
            pass
        elif func is F.conv2d:
            out = lean_conv2d(**(dict(zip(_CONV_ARGS, args)) | kwargs))
        elif func is F.batch_norm:
            out = lean_batch_norm(**(dict(zip(_BN_ARGS, args)) | kwargs))
        return out if out is not None else func(*args, **kwargs)
