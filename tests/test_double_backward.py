"""The lean double backward (igam.method.double_backward, double_backward=lean) gives PyTorch's derivatives
through convolutions and train-mode BatchNorm: every second derivative in float64, the same forward values
and running statistics, only the gradients a backward pass asks for, the same exact IGAM step up to float
rounding, and it stays out of the way where it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from igam.errors import IgamError
from igam.method.discriminator import GradientDiscriminator
from igam.method.double_backward import lean_double_backward
from igam.method.matching import InputGradientMatching
from igam.models import create_model


def _second_derivatives(bn: nn.Module, x: torch.Tensor, lean: bool, outer: tuple[float, float, float]):
    """(y, d/d(x, params) of a loss of BatchNorm's first derivatives, the buffers after the step)."""
    torch.manual_seed(1)
    gy_weight, u = torch.randn_like(x), torch.randn_like(x)
    x = x.clone().requires_grad_(True)
    params = list(bn.parameters())
    if lean:
        with lean_double_backward():
            y = bn(x)
    else:
        y = bn(x)
    first = torch.autograd.grad((y * gy_weight).sum() + y.pow(2).sum(), [x, *params], create_graph=True)
    loss = outer[0] * (first[0] * u).sum()
    if params:  # the parameter gradients' own derivatives (u_gamma, u_beta of the module docstring)
        ramp = torch.arange(len(first[2]))
        loss = loss + outer[1] * first[1].pow(2).sum() + outer[2] * (first[2] * ramp).sum()
    second = torch.autograd.grad(loss, [x, *params])
    return y.detach(), second, [b.clone() for b in bn.buffers()]


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm2d, (6, 3, 4, 5)), (nn.BatchNorm1d, (7, 4)),
                                       (nn.BatchNorm1d, (5, 3, 6))])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("outer", [(1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_every_second_derivative_equals_pytorchs_in_float64(cls, shape, affine, momentum, outer):
    torch.manual_seed(0)
    bn = cls(shape[1], affine=affine, momentum=momentum).double().train()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.3
    y_ref, ref, buf_ref = _second_derivatives(copy.deepcopy(bn), x, False, outer)
    y_new, new, buf_new = _second_derivatives(copy.deepcopy(bn), x, True, outer)
    assert torch.equal(y_ref, y_new)
    for a, b in zip(buf_ref, buf_new):  # running mean, variance, num_batches_tracked
        assert torch.equal(a, b)
    for a, b in zip(ref, new):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
        if outer != (0.0, 0.0, 0.0):
            assert a.abs().max() > 0 or b.abs().max() == 0


def test_float32_forward_is_bit_identical_and_channels_last_is_kept():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16)
    x = torch.randn(32, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    ref, new = copy.deepcopy(bn), copy.deepcopy(bn)
    y_ref = ref(x)
    with lean_double_backward():
        y_new = new(x)
    assert torch.equal(y_ref, y_new) and torch.equal(ref.running_var, new.running_var)
    assert y_new.is_contiguous(memory_format=torch.channels_last)
    assert type(y_new.grad_fn).__name__.startswith("LeanBatchNorm")


@pytest.mark.parametrize("case", ["eval", "bfloat16", "autocast"])
def test_calls_it_does_not_cover_run_unchanged(case):
    """Eval mode (no batch statistics), half precision and autocast go to F.batch_norm as before."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    if case == "eval":
        bn.eval()
    if case == "bfloat16":
        bn, x = bn.bfloat16(), x.detach().bfloat16().requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else torch.enable_grad()
    with ctx, lean_double_backward():
        y = bn(x)
    assert not type(y.grad_fn).__name__.startswith("LeanBatchNorm")


def test_a_batch_of_one_value_per_channel_keeps_pytorchs_error():
    with lean_double_backward(), pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3).train()(torch.randn(1, 3))


def _conv_second_derivatives(conv: nn.Conv2d, x: torch.Tensor, lean: bool, outer: tuple[float, float]):
    """(y, d/d(x, W, b) of a loss of the convolution's first derivatives)."""
    torch.manual_seed(1)
    x = x.clone().requires_grad_(True)
    if lean:
        with lean_double_backward():
            y = conv(x)
    else:
        y = conv(x)
    gy_weight = torch.randn_like(y)
    params = list(conv.parameters())
    first = torch.autograd.grad((y * gy_weight).sum() + y.pow(2).sum(), [x, *params], create_graph=True)
    loss = outer[0] * (first[0] * torch.randn_like(x)).sum() + outer[1] * first[1].pow(2).sum()
    return y.detach(), torch.autograd.grad(loss, [x, *params], allow_unused=True)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=4, stride=2, padding=1),
                                dict(kernel_size=3, dilation=2, padding=(2, 1), bias=False),
                                dict(kernel_size=3, groups=2, padding="valid"),
                                dict(kernel_size=1, stride=2, bias=False)])
@pytest.mark.parametrize("outer", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_every_convolution_second_derivative_equals_pytorchs_in_float64(kw, outer):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kw).double()
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    y_ref, ref = _conv_second_derivatives(conv, x, False, outer)
    y_new, new = _conv_second_derivatives(conv, x, True, outer)
    assert torch.equal(y_ref, y_new)
    for a, b in zip(ref, new):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_convolutions_it_does_not_cover_run_unchanged():
    """padding='same', an unbatched input and half precision go to F.conv2d as before."""
    with lean_double_backward():
        y1 = nn.Conv2d(2, 3, 3, padding="same")(torch.randn(1, 2, 5, 5, requires_grad=True))
        y2 = nn.Conv2d(2, 3, 3)(torch.randn(2, 5, 5, requires_grad=True))
        y3 = nn.Conv2d(2, 3, 3).bfloat16()(torch.randn(1, 2, 5, 5, dtype=torch.bfloat16, requires_grad=True))
    for y in (y1, y2, y3):
        assert not type(y.grad_fn).__name__.startswith("LeanConv2d")


class _ConvolutionBackwardCalls(TorchDispatchMode):
    """Records the output mask of every aten.convolution_backward call (input, weight, bias)."""

    def __init__(self):
        super().__init__()
        self.masks: list[tuple[bool, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


def test_the_input_gradient_pass_computes_no_weight_gradients():
    """J_s's pass (autograd.grad w.r.t. the input, create_graph) asks each convolution for g_x only, as
    PyTorch's own node does; the step's backward then computes the weight gradients."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with lean_double_backward():
        y = net(x)
    calls = _ConvolutionBackwardCalls()
    with calls:
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    assert calls.masks and all(mask == (True, False, False) for mask in calls.masks)
    calls = _ConvolutionBackwardCalls()
    with calls:
        (g.pow(2).sum() + y.sum()).backward()
    assert any(mask[1] for mask in calls.masks)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _exact_step_grads(dtype: torch.dtype, double_backward: str):
    torch.manual_seed(0)
    student = create_model("resnet20", num_classes=5, in_chans=3, input_size=8, width=4).to(dtype).train()
    teacher = create_model("small-cnn", num_classes=5, in_chans=3, input_size=8, width=4).to(dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    disc = GradientDiscriminator((3, 8, 8), layers=2, channels=4).to(dtype)
    igm = InputGradientMatching(teacher, disc, lambda_adv=0.5, lambda_diff=20.0, mode="exact",
                                double_backward=double_backward)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 3, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 5, (16,), generator=gen)
    terms = igm(student, x, y)
    nodes = _graph_nodes(terms["loss"])
    assert ("LeanBatchNormBackward" in nodes and "LeanConv2dBackward" in nodes) == (double_backward == "lean")
    terms["loss"].backward()
    return float(terms["loss"].detach()), torch.cat([p.grad.flatten() for p in student.parameters()])


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions]
    return names


def test_an_exact_igam_step_has_the_same_parameter_gradient_with_either_formula():
    """resnet20 (convolutions, BatchNorm after each): float64 to rounding, float32 to float tolerance."""
    loss_t, g_t = _exact_step_grads(torch.float64, "torch")
    loss_l, g_l = _exact_step_grads(torch.float64, "lean")
    assert loss_t == loss_l
    torch.testing.assert_close(g_l, g_t, rtol=1e-9, atol=1e-12)
    loss_t, g_t = _exact_step_grads(torch.float32, "torch")
    loss_l, g_l = _exact_step_grads(torch.float32, "lean")
    assert loss_t == loss_l  # the forward pass is PyTorch's own kernel
    assert F.cosine_similarity(g_l, g_t, dim=0) > 1 - 1e-6
    torch.testing.assert_close(g_l, g_t, rtol=1e-3, atol=1e-5 * float(g_t.abs().max()))


def test_exact_igam_training_follows_the_same_trajectory_with_either_formula():
    """A few exact IGAM steps on a BatchNorm student: the losses agree to float tolerance and both runs
    learn (the loss falls)."""
    losses = {}
    for mode in ("torch", "lean"):
        torch.manual_seed(0)
        student = create_model("small-cnn-bn", num_classes=4, in_chans=3, input_size=8, width=8).train()
        teacher = create_model("small-cnn", num_classes=4, in_chans=3, input_size=8, width=4).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1)
        disc = GradientDiscriminator((3, 8, 8), layers=2, channels=4)
        disc_opt = torch.optim.SGD(disc.parameters(), lr=0.05)
        igm = InputGradientMatching(teacher, disc, lambda_adv=0.5, lambda_diff=20.0, mode="exact",
                                    disc_optimizer=disc_opt, double_backward=mode)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(2)
        x, y = torch.rand(32, 3, 8, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        run = []
        for _ in range(12):
            terms = igm(student, x, y)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            igm.discriminator_step(terms)
            run.append(float(terms["loss"].detach()))
        losses[mode] = torch.tensor(run)
    torch.testing.assert_close(losses["lean"], losses["torch"], rtol=1e-4, atol=1e-5)
    assert losses["lean"][-3:].mean() < 0.8 * losses["lean"][:3].mean()


def test_an_unknown_formula_is_refused():
    with pytest.raises(IgamError, match="double_backward='fast': choose lean or torch"):
        InputGradientMatching(None, None, lambda_diff=1.0, double_backward="fast")


def test_activation_checkpointing_makes_it_step_aside():
    """torch.utils.checkpoint (non-reentrant) recomputes the forward in the backward, outside the mode:
    the lean Functions' saved tensors would be handed PyTorch's (a silently wrong J_s). Under saved-tensor
    hooks the mode steps aside, so J_s and the step agree with PyTorch's."""
    torch.manual_seed(0)
    segment = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().train()
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    results = []
    for lean, ckpt in ((False, True), (True, True)):  # (checkpoint itself moves the running stats twice)
        seg = copy.deepcopy(segment)
        xi = x.clone().requires_grad_(True)
        with lean_double_backward() if lean else torch.enable_grad():
            h = checkpoint(seg, xi, use_reentrant=False) if ckpt else seg(xi)
        (g,) = torch.autograd.grad(F.softplus(h).pow(2).sum(), xi, create_graph=True)
        g.pow(2).sum().backward()
        results.append((g.detach(), [p.grad for p in seg.parameters()], seg[1].running_var.clone()))
    (g_ref, p_ref, rv_ref), (g_new, p_new, rv_new) = results
    torch.testing.assert_close(g_new, g_ref, rtol=1e-12, atol=0)
    for a, b in zip(p_ref, p_new):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert torch.equal(rv_ref, rv_new)


def test_vmap_inside_the_mode_runs_as_pytorch_does():
    """A student that runs its convolutions under torch.func.vmap (an ensemble) works as without the mode."""
    torch.manual_seed(0)
    nets = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(2)]
    params, _ = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    norms = []
    for lean in (False, True):
        with lean_double_backward() if lean else torch.enable_grad():
            out = torch.func.vmap(lambda p, xx: functional_call(base, p, (xx,)), in_dims=(0, None))(params, x)
        (g,) = torch.autograd.grad(F.softplus(out).sum(), x, create_graph=True)
        norms.append(g.detach())
    torch.testing.assert_close(norms[1], norms[0])


def test_a_third_derivative_is_refused_not_dropped():
    """Differentiating the second derivatives again (create_graph=True through the lean nodes) raises,
    naming double_backward=torch, instead of silently leaving terms out."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 2, 3, padding=1)).double()
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with lean_double_backward():
        y = net(x)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(IgamError, match="double_backward=torch"):
        torch.autograd.grad(g.pow(2).sum(), list(net.parameters()), create_graph=True)
