"""IGAM core: adapters, input gradients, the matching loss in both modes, the discriminator (paper 4.2f)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.method.adapters import build_adapter
from igam.method.discriminator import GradientDiscriminator, zero_mean_l2
from igam.method.gradients import input_gradient, teacher_gradient
from igam.method.matching import InputGradientMatching
from igam.models import create_model

ADAPTERS = [  # spec, target shape, teacher shape
    ("identity", (3, 8, 8), (3, 8, 8)),
    ("gray", (3, 8, 8), (1, 8, 8)),
    ("rgb", (1, 8, 8), (3, 8, 8)),
    ("resize", (3, 8, 8), (3, 16, 16)),
    ("resize", (3, 16, 16), (3, 8, 8)),
    ("resize", (3, 12, 12), (3, 8, 8)),
    ("crop", (3, 10, 10), (3, 8, 8)),
    ("pad", (3, 6, 6), (3, 10, 10)),
    ("random-pad", (3, 6, 6), (3, 10, 10)),
    ("gray+crop6", (3, 8, 8), (1, 6, 6)),
    ("transpose-conv", (3, 4, 4), (3, 8, 8)),
]


class TinyNet(nn.Module):
    """A smooth two-layer CNN for exact derivative checks."""

    def __init__(self, c: int = 1, k: int = 3, act=F.softplus, dtype=torch.float64):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1).to(dtype)
        self.fc = nn.Linear(4 * 16, k).to(dtype)
        self.act = act

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("spec,target,teacher", ADAPTERS)
def test_adapters_are_affine_with_correct_gradients(spec, target, teacher):
    torch.manual_seed(0)
    a = build_adapter(spec, target, teacher).double().eval()
    x1, x2 = torch.rand(2, *target, dtype=torch.float64), torch.rand(2, *target, dtype=torch.float64)
    assert a(x1).shape == (2, *teacher)
    zero = torch.zeros_like(x1)
    # affine: a(s x1 + t x2) = s a(x1) + t a(x2) + (1 - s - t) a(0)
    lhs = a(0.3 * x1 + 0.5 * x2)
    rhs = 0.3 * a(x1) + 0.5 * a(x2) + 0.2 * a(zero)
    torch.testing.assert_close(lhs, rhs)
    assert torch.autograd.gradcheck(lambda x: a(x), (x1.requires_grad_(),))
    assert torch.autograd.gradgradcheck(lambda x: a(x), (x1,))


def test_adapter_shape_errors_name_the_shapes():
    with pytest.raises(IgamError, match="3x32x32.*1x28x28|1x28x28.*3x32x32"):
        build_adapter("resize", (3, 32, 32), (1, 28, 28))
    with pytest.raises(IgamError, match="cannot crop"):
        build_adapter("crop", (3, 16, 16), (3, 32, 32))
    with pytest.raises(IgamError, match="Unknown adapter 'crp'"):
        build_adapter("crp", (3, 16, 16), (3, 8, 8))
    assert build_adapter("auto", (3, 32, 32), (1, 28, 28)).spec == "gray+crop"
    assert build_adapter("auto", (3, 64, 64), (3, 32, 32)).spec == "resize"


@pytest.mark.parametrize("target,teacher,good,bad", [
    ((1, 28, 28), (3, 32, 32), "rgb+pad", "gray"),     # MNIST student, CIFAR-10 teacher: grow and colour
    ((3, 32, 32), (1, 28, 28), "gray+crop28", "rgb"),  # CIFAR-10 student, MNIST teacher: shrink and grey
])
def test_adapter_hints_point_in_the_direction_of_the_transfer(target, teacher, good, bad):
    """A wrong adapter's error suggests adapters that go the right way (never gray+crop for a 1-channel
    target), and the suggested family builds."""
    with pytest.raises(IgamError) as e:
        build_adapter("identity", target, teacher)
    hint = str(e.value)
    assert good.split("+")[0] + "+" in hint and f"{bad}+" not in hint
    assert build_adapter(good, target, teacher).in_shape == target


def test_crop_adapter_gradient_is_zero_outside_and_disc_view_crops():
    a = build_adapter("gray+crop28", (3, 32, 32), (1, 28, 28))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    a(x).sum().backward()
    assert x.grad[:, :, :2].abs().sum() == 0 and x.grad[:, :, 2:30, 2:30].abs().min() > 0
    assert a.disc_view(x.grad).shape == (2, 3, 28, 28)


def test_random_pad_moves_in_training_and_centres_in_eval():
    a = build_adapter("random-pad", (1, 4, 4), (1, 12, 12))
    x = torch.ones(1, 1, 4, 4)
    torch.manual_seed(0)
    placements = {tuple(a.train()(x)[0, 0].nonzero()[0].tolist()) for _ in range(20)}
    assert len(placements) > 3
    assert a.eval()(x)[0, 0].nonzero()[0].tolist() == [4, 4]


def test_resize_down_by_two_is_average_pooling_and_up_is_bilinear():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(build_adapter("resize", (3, 8, 8), (3, 4, 4))(x), F.avg_pool2d(x, 2))
    up = build_adapter("resize", (3, 8, 8), (3, 16, 16))(x)
    torch.testing.assert_close(up, F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))


def test_teacher_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = TinyNet()
    x, y = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    for target in ("ce", "true-prob"):
        j = teacher_gradient(net, x, y, target)
        fd = torch.zeros_like(x)
        h = 1e-6
        for idx in range(x[0].numel()):
            e = torch.zeros_like(x).flatten(1)
            e[:, idx] = h
            e = e.view_as(x)
            lp = _per_example(net(x + e), y, target)
            lm = _per_example(net(x - e), y, target)
            fd.flatten(1)[:, idx] = (lp - lm) / (2 * h)
        torch.testing.assert_close(j, fd, rtol=1e-5, atol=1e-8)


def _per_example(logits, y, target):
    if target == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return logits.softmax(1).gather(1, y[:, None]).squeeze(1)


def test_true_prob_gradient_is_minus_p_times_ce_gradient():
    torch.manual_seed(1)
    net = TinyNet()
    x, y = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    g_ce, logits = input_gradient(net, x, y, "ce")
    g_p, _ = input_gradient(net, x, y, "true-prob")
    p = logits.softmax(1).gather(1, y[:, None]).view(-1, 1, 1, 1).detach()
    torch.testing.assert_close(g_p, -p * g_ce)
    g_255, _ = input_gradient(net, x, y, "ce", scale=255.0)
    torch.testing.assert_close(g_255 * 255, g_ce)


def test_per_example_gradient_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    net = create_model("small-cnn", num_classes=5, in_chans=3, input_size=8, width=4).eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    g_all, _ = input_gradient(net, x, y)
    g_few, _ = input_gradient(net, x[:3], y[:3])
    torch.testing.assert_close(g_all[:3], g_few, rtol=1e-5, atol=1e-7)


def test_double_backprop_parameter_gradients_pass_gradcheck():
    """d/dtheta of CE + lambda ||J_s - J_t||^2 (eq. 13), exact mode, checked in float64."""
    torch.manual_seed(0)
    net = TinyNet()
    x, y = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    jt = torch.randn_like(x) * 0.1
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())

    def loss(*ps):
        f = lambda inp: torch.func.functional_call(net, dict(zip(names, ps)), (inp,))  # noqa: E731
        js, logits = input_gradient(f, x, y, create_graph=True)
        return F.cross_entropy(logits, y) + 3.0 * (js - jt).flatten(1).pow(2).sum(1).mean()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


def _matching_grad(net, igm, x, y):
    net.zero_grad()
    igm(net, x, y)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("bn", [False, True])
def test_finite_difference_matches_exact_on_smooth_models(bn):
    torch.manual_seed(0)
    name = "small-cnn-bn" if bn else "small-cnn"
    student = create_model(name, num_classes=4, in_chans=3, input_size=8, width=8, activation="softplus")
    teacher = create_model("small-cnn", num_classes=4, in_chans=3, input_size=8, width=4).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))
    disc = GradientDiscriminator((3, 8, 8), layers=2, channels=4)
    grads = {}
    for mode in ("exact", "finite-difference"):
        torch.manual_seed(1)
        igm = InputGradientMatching(teacher, disc, lambda_adv=0.5, lambda_diff=20.0, mode=mode)
        grads[mode] = _matching_grad(student.train(), igm, x, y)
    cos = F.cosine_similarity(grads["exact"], grads["finite-difference"], dim=0)
    assert cos >= 0.99, f"cosine {cos:.4f}"


def test_loss_value_and_terms_are_the_same_in_both_modes():
    torch.manual_seed(0)
    student = create_model(
        "small-cnn", num_classes=3, in_chans=1, input_size=8, width=4, activation="softplus"
    )
    teacher = (
        create_model("small-cnn", num_classes=3, in_chans=1, input_size=8, width=4)
        .eval()
        .requires_grad_(False)
    )
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    a = InputGradientMatching(teacher, lambda_adv=0, lambda_diff=2.0)(student, x, y)
    b = InputGradientMatching(teacher, lambda_adv=0, lambda_diff=2.0, mode="finite-difference")(student, x, y)
    torch.testing.assert_close(a["loss"].detach(), b["loss"].detach())
    torch.testing.assert_close(a["l_diff"], b["l_diff"])
    expected = a["ce"] + 2.0 * a["l_diff"]
    torch.testing.assert_close(a["loss"].detach(), expected)


def test_lambda_diff_auto_targets_the_teacher_gradient_energy():
    torch.manual_seed(0)
    teacher = (
        create_model("small-cnn", num_classes=3, in_chans=1, input_size=8, width=4)
        .eval()
        .requires_grad_(False)
    )
    student = create_model("small-cnn", num_classes=3, in_chans=1, input_size=8, width=4)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    igm = InputGradientMatching(teacher, lambda_diff="auto", lambda_diff_auto=2.3)
    igm(student, x, y)
    jt = teacher_gradient(teacher, x, y)
    energy = float(jt.flatten(1).pow(2).sum(1).mean())
    assert math.isclose(float(igm.lambda_diff) * energy, 2.3, rel_tol=1e-4)
    with pytest.raises(IgamError, match="without a teacher"):
        InputGradientMatching(None, lambda_diff="auto")


def test_igr_control_penalises_the_gradient_norm():
    torch.manual_seed(0)
    student = create_model("small-cnn", num_classes=3, in_chans=1, input_size=8, width=4)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    t = InputGradientMatching(None, lambda_diff=1.0)(student, x, y)
    js, _ = input_gradient(student, x, y)
    torch.testing.assert_close(t["l_diff"], js.flatten(1).pow(2).sum(1).mean())


def test_discriminator_separates_two_gradient_distributions():
    torch.manual_seed(0)
    disc = GradientDiscriminator((1, 8, 8), layers=3, channels=8)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    smooth = lambda n: F.avg_pool2d(torch.randn(n, 1, 8, 8), 3, 1, 1) * 3  # noqa: E731  (spatially correlated)
    noise = lambda n: torch.randn(n, 1, 8, 8)  # noqa: E731  (white)
    for _ in range(150):
        logits = disc(torch.cat([noise(32), smooth(32)]))
        loss = -(F.logsigmoid(logits[32:]).mean() + F.logsigmoid(-logits[:32]).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    disc.eval()
    with torch.no_grad():
        acc = ((disc(noise(500)) < 0).float().mean() + (disc(smooth(500)) > 0).float().mean()) / 2
    assert acc > 0.95


def test_official_disc_normalisation_clamps_like_tensorflow():
    g = torch.randn(2, 3, 4, 4)
    out = zero_mean_l2(g)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.ones(2))
    tiny = torch.zeros(1, 1, 2, 2)
    tiny[0, 0, 0, 0] = 1e-8
    # squared norm < 1e-12: TF multiplies by rsqrt(1e-12) = 1e6 instead of normalising
    torch.testing.assert_close(zero_mean_l2(tiny), (tiny - tiny.mean()) * 1e6)


def test_adversarial_loss_is_minimal_when_student_matches_teacher():
    """Theorem 6.1: with the optimal discriminator, L_adv = -log 4 + 2 JS(p_t || p_s), minimal (= -log 4)
    exactly when the student's gradient distribution equals the teacher's. Checked by training our
    discriminator to near-optimality against student distributions shifted by 0, 0.75 and 1.5."""
    values = {}
    for shift in (0.0, 0.75, 1.5):
        torch.manual_seed(0)
        disc = GradientDiscriminator((1, 4, 4), layers=1, channels=8)
        opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
        teacher = lambda n: torch.randn(n, 1, 4, 4)  # noqa: E731
        student = lambda n, s=shift: torch.randn(n, 1, 4, 4) + s  # noqa: E731
        for _ in range(300):
            logits = disc(torch.cat([student(128), teacher(128)]))
            l_adv = F.logsigmoid(logits[128:]).mean() + F.logsigmoid(-logits[:128]).mean()
            opt.zero_grad()
            (-l_adv).backward()
            opt.step()
        with torch.no_grad():
            logits = disc(torch.cat([student(4000), teacher(4000)]))
            values[shift] = float(F.logsigmoid(logits[4000:]).mean() + F.logsigmoid(-logits[:4000]).mean())
    assert abs(values[0.0] + math.log(4)) < 0.05
    assert values[0.0] < values[0.75] < values[1.5]


def test_student_side_terms_never_update_the_discriminator():
    torch.manual_seed(0)
    teacher = (
        create_model("small-cnn", num_classes=3, in_chans=1, input_size=8, width=4)
        .eval()
        .requires_grad_(False)
    )
    student = create_model("small-cnn", num_classes=3, in_chans=1, input_size=8, width=4)
    disc = GradientDiscriminator((1, 8, 8), layers=2, channels=4)
    igm = InputGradientMatching(teacher, disc, lambda_adv=1.0, lambda_diff=1.0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    terms = igm(student, x, y)
    terms["loss"].backward()
    assert all(p.grad is None for p in disc.parameters())
    before = [p.detach().clone() for p in disc.parameters()]
    out = igm.discriminator_step(terms, torch.optim.SGD(disc.parameters(), lr=0.1))
    assert "disc_loss" in out
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    # NaN/Inf guard: a non-finite discriminator gradient skips the update and says so
    bad = {**terms, "js": terms["js"].clone().fill_(float("inf"))}
    kept = [p.detach().clone() for p in disc.parameters()]
    out = igm.discriminator_step(bad, torch.optim.SGD(disc.parameters(), lr=0.1))
    assert set(out) == {"disc_skipped"}
    assert all(torch.equal(a, b) for a, b in zip(kept, disc.parameters()))
