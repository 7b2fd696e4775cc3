"""The model zoo: every name, the shapes it accepts, the uniform head API, external architectures."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import SLOWER

from igam.errors import IgamError
from igam.models import ACTIVATIONS, Normalize, create_model, list_models, model_from_args
from igam.models.__init__ import has_batchnorm

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
# every registered name (cheap widths where the architecture allows one; sizes as relevant to each)
ZOO = [
    ("madry-mnist", 8, SHAPES), ("small-cnn", 8, SHAPES), ("small-cnn-bn", 8, SHAPES),
    ("resnet20", 4, SHAPES), ("resnet32", 2, [(3, 32, 32)]), ("resnet44", 2, [(3, 32, 32)]),
    ("resnet56", 2, [(3, 32, 32)]), ("resnet110", 2, [(3, 32, 32)]),
    ("preact-resnet18", 4, [(3, 32, 32), (3, 64, 64)]),
    ("wrn-10-1", 4, SHAPES), ("wrn-16-2", 2, [(3, 32, 32)]), ("wrn-32-10", 1, [(3, 32, 32)]),
    ("torchvision:resnet18", 0, [(3, 32, 32), (1, 28, 28), (3, 64, 64)]),
]


def test_the_zoo_table_covers_every_registered_name() -> None:
    listed = {n for n in list_models() if " " not in n and not n.endswith("NAME")}
    assert listed <= {name for name, _, _ in ZOO}


def test_igam_models_describes_every_architecture_with_its_true_parameter_count(capsys) -> None:
    """`igam models` gives every name a line that says what it is, not the bare name; the parameter counts
    it prints (static, so the listing builds nothing) are the models' own: default width, 10 classes,
    1x28x28 inputs for madry-mnist, else 3x32x32."""
    from igam.cli import main
    from igam.models import PARAMS, parameter_count

    assert main(["models"]) == 0
    listing = capsys.readouterr().out.split("\n\nShipped teachers")[0].splitlines()
    for name in list_models():
        line = next((t.strip() for t in listing if t.strip().startswith(name + " ")), "")
        assert len(line) > len(name) + 30, f"`igam models` shows no description of {name}: {line!r}"
    zoo = {n for n in list_models() if " " not in n and ":" not in n}
    assert zoo <= set(PARAMS), "every zoo model's line states its parameter count"
    for name, count in PARAMS.items():
        c, size = (1, 28) if name == "madry-mnist" else (3, 32)
        assert parameter_count(name, in_chans=c, input_size=size) == count, name
        shown = next(t for t in listing if t.split()[0] == name or f"[{name}: " in t or f", {name}: " in t)
        assert f"{count / 1e6:.2f}M" in shown, (name, shown)
    # the meta-device count is the count of the model create_model builds
    for name, c, size in (("madry-mnist", 1, 28), ("resnet20", 3, 32)):
        built = create_model(name, num_classes=10, in_chans=c, input_size=size)
        assert sum(p.numel() for p in built.parameters()) == parameter_count(name, in_chans=c,
                                                                             input_size=size)


@pytest.mark.parametrize("name,width,shapes", ZOO, ids=[z[0] for z in ZOO])
def test_forward_shapes_and_head(name: str, width: int, shapes: list[tuple[int, int, int]]) -> None:
    torch.manual_seed(0)
    for c, h, w in shapes:
        m = create_model(name, num_classes=7, in_chans=c, input_size=(h, w), width=width).eval()
        x = torch.rand(2, c, h, w)
        out = m(x)
        assert out.shape == (2, 7) and torch.isfinite(out).all(), (name, c, h)
        feats = m.forward_features(x)
        assert torch.allclose(m.forward_head(feats), out, atol=1e-5)
        assert m.forward_head(feats, pre_logits=True) is feats
        assert m.get_classifier() is m.fc and m.num_classes == 7
        # the input gradient exists (IGAM differentiates w.r.t. the input)
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xg).sum(), xg)
        assert g.shape == x.shape and g.abs().sum() > 0
    fc = m.reset_classifier(3)
    assert m.fc is fc and m(x).shape == (2, 3) and fc.bias.abs().sum() == 0
    assert m.igam_args["name"] == name and m.igam_args["num_classes"] == 7


def test_model_from_args_round_trip() -> None:
    m = create_model("small-cnn", num_classes=4, in_chans=1, input_size=28, width=8, activation="softplus",
                     normalize="dataset", mean=[0.1], std=[0.3])
    again = model_from_args(m.igam_args)
    again.load_state_dict(m.state_dict())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(m.eval()(x), again.eval()(x))
    assert again.igam_args == m.igam_args
    with pytest.raises(IgamError, match="lacks num_classes"):
        model_from_args({"name": "small-cnn", "in_chans": 1, "input_size": [28, 28]})


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations(act: str) -> None:
    m = create_model("small-cnn", num_classes=3, input_size=16, width=4, activation=act)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_normalisation_modes() -> None:
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(Normalize("none")(x), x)
    d = Normalize("dataset", [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], 3)(x)
    assert torch.allclose(d[:, 1], (x[:, 1] - 0.4) / 0.2)
    p = Normalize("per-image", channels=3)(x)
    assert torch.allclose(p.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(p.std((1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    l2 = Normalize("l2", channels=3)(x)
    assert torch.allclose(l2.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(IgamError, match="Did you mean 'per-image'"):
        Normalize("per_image")
    with pytest.raises(IgamError, match="1 channel means for a 3-channel model"):
        Normalize("dataset", [0.5], [0.2], 3)


def test_batchnorm_detection() -> None:
    assert has_batchnorm(create_model("small-cnn-bn", num_classes=2, width=4))
    assert not has_batchnorm(create_model("madry-mnist", num_classes=2, in_chans=1, input_size=28, width=4))


@pytest.mark.parametrize("name,kwargs,msg", [
    ("resnet-20", {}, "Did you mean 'resnet20'"), ("madry_mnist", {}, "Did you mean 'madry-mnist'"),
    ("wrn-30-10", {}, "depth must be 6n\\+2"), ("wrn-4-1", {}, "depth must be"),
    ("wrn-16-0", {}, "at least 1"),
    ("small-cnn", {"activation": "relu6"}, "Unknown activation 'relu6'"),
    ("small-cnn", {"num_classes": 0}, "must be >= 1"), ("madry-mnist", {"input_size": 2}, "at least 4x4"),
    ("torchvision:resnet19", {}, "torchvision has no model 'resnet19'. Did you mean"),
    ("keras:resnet18", {}, "Unknown model 'keras:resnet18'"),
    ("small-cnn", {"input_size": 0}, "input_size=0"),
])
def test_bad_model_requests(name: str, kwargs: dict, msg: str) -> None:
    args = {"num_classes": 10, "in_chans": 3, "input_size": 32, **kwargs}
    with pytest.raises(IgamError, match=msg):
        create_model(name, **args)


def test_wrn_depths_follow_madry_and_zagoruyko() -> None:
    def units(name: str) -> int:
        m = create_model(name, num_classes=2, width=1)
        return sum(type(b).__name__ == "PreActUnit" for b in m.features)

    assert units("wrn-32-1") == 15  # Madry: 6n+2 with n=5 per stage
    assert units("wrn-16-1") == 6  # Zagoruyko: 6n+4 with n=2
    assert units("wrn-28-1") == 12


def test_external_classifier_splits_the_last_linear() -> None:
    m = create_model("torchvision:resnet18", num_classes=5, in_chans=1, input_size=32)
    assert isinstance(m.fc, nn.Linear) and m.fc.out_features == 5
    assert m.features.conv1.in_channels == 1
    assert m.forward_features(torch.rand(2, 1, 32, 32)).shape == (2, 512)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                    reason="timm is not installed (pip install 'igam[timm]')")
def test_timm_models() -> None:
    m = create_model("timm:resnet18", num_classes=4, in_chans=3, input_size=32)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(IgamError, match="timm has no model"):
        create_model("timm:not-a-model", num_classes=4)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_missing_is_a_clear_error() -> None:
    with pytest.raises(IgamError, match=r"needs timm: pip install 'igam\[timm\]'"):
        create_model("timm:resnet18", num_classes=4)


def test_igam_models_piped_into_head_ends_quietly() -> None:
    """`igam models | head -1`: the reader closes the pipe early; igam says nothing about disk space."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(f"'{sys.executable}' -m igam models | head -1", shell=True, capture_output=True,
                         text=True, env=env, timeout=120 * SLOWER)
    assert out.stdout.strip() and "error" not in out.stderr and "Broken pipe" not in out.stderr, out.stderr
