"""Attacks: the L-inf/[0,1] contract, closed forms on linear models, FGSM = 1-step PGD, restarts, presets,
mode restoration, and (slow, real MNIST) PGD breaking a standard model and the masking checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import real_data_root

from igam.attacks import FGSM, PGD, Square, column_name, make_attack, margin, parse_preset
from igam.errors import IgamError

DATA = real_data_root("mnist.npz")
needs_mnist = pytest.mark.skipif(DATA is None, reason="real MNIST absent: no mnist.npz in $IGAM_DATA or "
                                 "../shared/data beside the repository")


class Linear(nn.Module):
    """logits = W x + b on flattened pixels: every attack has a closed form here."""

    def __init__(self, d: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, d, generator=g))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class TinyCNN(nn.Module):
    def __init__(self, c: int = 1, k: int = 10, bn: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8) if bn else nn.Identity(),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.1),
                                 nn.Linear(128, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _data(n: int = 16, shape=(1, 8, 8), k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g)


def _in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    return bool((x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda m: FGSM(m, 0.1), lambda m: PGD(m, 0.1, 0.02, 5),
    lambda m: PGD(m, 0.1, 0.05, 3, restarts=3, loss="cw"),
    lambda m: PGD(m, 0.1, 0.02, 4, targeted=True), lambda m: Square(m, 0.1, 50),
    lambda m: Square(m, 0.1, 30, restarts=2, targeted=True)])
def test_output_inside_eps_ball_and_box(make):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = _data()
    x[:4] = 0.0  # corners of the box: clamping must keep them inside
    x[4:8] = 1.0
    attack = make(model)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert _in_ball(x_adv, x, attack.eps)
    assert torch.equal(x_adv, attack(x, y)), "an attack is a pure function of (x, y, seed)"


def test_linear_model_closed_form():
    """Two classes, logits W x: the L-inf worst case moves every pixel by eps against sign(w_y - w_other),
    and the margin drops by exactly eps * ||w_y - w_other||_1 (no pixel near the box edges)."""
    model = Linear(64, 2).eval()
    eps = 0.05
    g = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(8, 1, 8, 8, generator=g)
    y = torch.randint(0, 2, (8,), generator=g)
    w = model.fc.weight.detach()
    direction = (w[1 - y] - w[y]).sign().view_as(x)  # pixel-wise push towards the other class
    for attack in (FGSM(model, eps, loss="cw"),
                   PGD(model, eps, eps / 4, 10, random_start=False, loss="cw", keep_best=False),
                   PGD(model, eps, eps / 4, 10, loss="cw", keep_best=False)):
        x_adv = attack(x, y)
        torch.testing.assert_close(x_adv, x + eps * direction)
        drop = margin(model(x), y) - margin(model(x_adv), y)
        torch.testing.assert_close(drop, eps * (w[1] - w[0]).abs().sum().expand(8), rtol=1e-4, atol=1e-4)


def test_pgd_one_step_equals_fgsm_exactly():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = _data(32)
    for loss in ("ce", "cw"):
        fgsm = FGSM(model, 0.1, loss=loss)(x, y)
        pgd = PGD(model, 0.1, 0.1, 1, random_start=False, loss=loss)(x, y)
        assert torch.equal(fgsm, pgd)


def test_restarts_never_lower_success():
    torch.manual_seed(0)
    model = TinyCNN(bn=False).eval()
    x, y = _data(64)
    one = PGD(model, 0.02, 0.005, 3, seed=7)(x, y)
    five = PGD(model, 0.02, 0.005, 3, restarts=5, seed=7)(x, y)
    with torch.no_grad():
        fooled_one, fooled_five = model(one).argmax(1) != y, model(five).argmax(1) != y
    assert bool((fooled_five | ~fooled_one).all()), "an example broken by 1 restart survived 5"
    assert int(fooled_five.sum()) >= int(fooled_one.sum())


def test_targeted_pgd_reaches_target_on_linear_model():
    model = Linear(64, 3, seed=2).eval()
    x, _ = _data(16)
    target = torch.full((16,), 2)
    x_adv = PGD(model, 1.0, 0.1, 30, targeted=True, loss="cw")(x, target)
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) == 2).all())


def test_model_mode_restored_and_bn_statistics_untouched():
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    model.net[5].eval()  # a mixed state must come back exactly
    before = {m: m.training for m in model.modules()}
    stats = model.net[1].running_mean.clone()
    x, y = _data()
    for bn in ("eval", "train"):
        PGD(model, 0.1, 0.05, 2, bn=bn)(x, y)
        Square(model, 0.1, 5, bn=bn)(x, y)
        assert {m: m.training for m in model.modules()} == before
        assert torch.equal(model.net[1].running_mean, stats)
        assert all(p.grad is None for p in model.parameters()), "attacks must not touch parameter gradients"


def test_seed_changes_random_start_only():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = _data()
    a = PGD(model, 0.1, 0.01, 2)
    assert torch.equal(a(x, y, seed=1), a(x, y, seed=1))
    assert not torch.equal(a(x, y, seed=1), a(x, y, seed=2))


def test_presets_and_conventions():
    model = TinyCNN(c=3).eval()
    assert parse_preset("pgd20x5-cw").steps == 20 and parse_preset("pgd20x5-cw").restarts == 5
    assert parse_preset("pgd20-cw").loss == "cw" and parse_preset("square").queries == 5000
    # the default step rule: max(2.5 eps / K, the dataset's step scaled to eps); '-fixed': the paper's step
    mnist = make_attack("pgd40", model, (1, 28, 28))
    assert (mnist.eps, mnist.steps) == (0.3, 40) and mnist.step_size == pytest.approx(2.5 * 0.3 / 40)
    assert mnist.settings()["step_rule"] == "reach" and mnist.settings()["reaches_boundary"]
    paper = make_attack("pgd40-fixed", model, (1, 28, 28))
    assert (paper.eps, paper.step_size, paper.steps) == (0.3, 0.01, 40) and paper.step_rule == "fixed"
    cifar = make_attack("pgd10", model, (3, 32, 32))
    assert (cifar.eps, cifar.step_size) == (8 / 255, 2 / 255)
    wide = make_attack("pgd10-fixed", model, (3, 32, 32), eps="16/255")
    assert wide.eps == pytest.approx(16 / 255) and wide.step_size == pytest.approx(4 / 255)
    assert isinstance(make_attack("fgsm", model, (3, 32, 32)), FGSM)
    assert [column_name(a) for a in ("clean", "fgsm", "pgd20x5", "autoattack")] == \
        ["Clean", "FGSM", "PGD20X5", "AutoAttack"]
    assert parse_preset("autoattack-plus").kind == "autoattack" and parse_preset("APGD-T").name == "apgd-t"
    assert parse_preset("square5000").kind == "square", "square stays igam's own; aa-square is AutoAttack's"


@pytest.mark.parametrize("bad, match", [("pgd", "Valid forms"), ("pgd0", "at least 1"), ("fgms", "fgsm"),
                                        ("square0", "at least 1")])
def test_bad_preset_names(bad, match):
    with pytest.raises(IgamError, match=match):
        parse_preset(bad)


def test_bad_inputs_are_clear_errors():
    model = TinyCNN().eval()
    x, y = _data(4)
    with pytest.raises(IgamError, match="8/255"):
        PGD(model, eps=8)
    with pytest.raises(IgamError, match=r"\[0, 1\]"):
        PGD(model, 0.1)(x * 255, y)
    with pytest.raises(IgamError, match="uint8"):
        FGSM(model, 0.1)((x * 255).to(torch.uint8), y)
    with pytest.raises(IgamError, match="labels"):
        FGSM(model, 0.1)(x, y.float())
    with pytest.raises(IgamError, match="loss"):
        PGD(model, 0.1, loss="dlr")
    with pytest.raises(IgamError, match="BatchNorm"):
        PGD(model, 0.1, bn="training")


# ----------------------------------------------------------------------------------------------
# real MNIST: a standard-trained small model
@pytest.fixture(scope="module")
def mnist_model():
    from igam.data import load_data, spec_of
    from igam.models import create_model

    a = load_data("mnist", str(DATA), train_subset=4000, test_subset=200)
    spec = spec_of(a)
    torch.manual_seed(0)
    model = create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28, width=8, mean=spec.mean,
                         std=spec.std)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = a.x_train.float() / 255, a.y_train
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), a.x_test.float() / 255, a.y_test


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.slow
@needs_mnist
def test_pgd20_breaks_standard_mnist_model(mnist_model):
    model, x, y = mnist_model
    clean = _acc(model, x, y)
    assert clean > 0.85, f"the fixture model did not train ({clean:.2%})"
    for name in ("fgsm", "pgd20", "pgd20-cw", "square1000"):
        attack = make_attack(name, model, (1, 28, 28))
        x_adv = attack(x, y)
        assert _in_ball(x_adv, x, 0.3), name
        acc = _acc(model, x_adv, y)
        if name.startswith("pgd"):
            assert acc <= 0.05, f"{name} leaves {acc:.1%} of a standard model's accuracy at eps 0.3"
        assert acc < clean - 0.3, name


class Quantized(nn.Module):
    """Deliberate gradient masking: round(x * 4) / 4 before the model; its input gradient is zero."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)


@pytest.mark.slow
@needs_mnist
def test_masking_checks_flag_quantized_model_not_plain_one(mnist_model):
    from igam.evaluate import masking_report

    model, x, y = mnist_model
    x, y = x[:100], y[:100]
    plain = masking_report(model, x, y, queries=300)
    failed_plain = [k for k, v in plain["checks"].items() if v["passed"] is False]
    assert plain["passed"], f"a plain standard model was flagged: {failed_plain} {plain['checks']}"
    masked = masking_report(Quantized(model), x, y, queries=300)
    assert not masked["passed"]
    assert masked["checks"]["gradients"]["passed"] is False
    assert masked["checks"]["gradients"]["zero_margin"] == 1.0
    assert masked["checks"]["blackbox_vs_whitebox"]["passed"] is False
