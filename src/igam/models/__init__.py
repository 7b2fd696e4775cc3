"""Model registry: `create_model(name, num_classes=..., in_chans=..., input_size=...)` (timm style).

Names: madry-mnist, small-cnn, small-cnn-bn, resnet20/32/44/56/110, preact-resnet18, wrn-D-W (Madry's wide
ResNet; D = 6n+2 counts as Madry does, so wrn-32-10 has 5 units per stage, else D = 6n+4 as Zagoruyko
does, so wrn-16-4 has 2), and timm:NAME / torchvision:NAME.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from igam.errors import IgamError, unknown
from igam.models.base import (
    ACTIVATIONS,
    ImageClassifier,
    Normalize,
    apply_normalization_metadata,
    make_act,
    normalization_metadata,
)
from igam.models.external import create_external
from igam.models.zoo import CifarResNet, MadryMNIST, PreActResNet18, SmallCNN, WideResNet

__all__ = ["ACTIVATIONS", "ImageClassifier", "Normalize", "apply_normalization_metadata", "create_model",
           "describe_models", "list_models", "make_act", "normalization_metadata", "parameter_count",
           "register_model", "model_from_args"]

_REGISTRY: dict[str, Callable[..., ImageClassifier]] = {}
_DEFAULT_ACT: dict[str, str] = {}


def register_model(name: str, default_act: str = "relu"):
    """Decorator: register `fn(norm, num_classes, in_chans, input_size, act, width)` under `name`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = fn
        _DEFAULT_ACT[name] = default_act
        return fn

    return deco


register_model("madry-mnist")(MadryMNIST)
register_model("small-cnn")(SmallCNN)
register_model("small-cnn-bn")(lambda *a, **k: SmallCNN(*a, **k, bn=True))
for _n in (20, 32, 44, 56, 110):
    register_model(f"resnet{_n}")(lambda *a, _b=(_n - 2) // 6, **k: CifarResNet(*a, n=_b, **k))
register_model("preact-resnet18")(PreActResNet18)

_WRN = re.compile(r"wrn-(\d+)-(\d+)$")


def _wrn_units(depth: int) -> int:
    if depth >= 8 and (depth - 2) % 6 == 0:
        return (depth - 2) // 6
    if depth >= 10 and (depth - 4) % 6 == 0:
        return (depth - 4) // 6
    raise IgamError(f"wrn-{depth}-W: depth must be 6n+2 (Madry: 32 -> n=5) or 6n+4 (Zagoruyko: 16 -> n=2).")


def list_models() -> list[str]:
    return sorted(_REGISTRY) + ["wrn-D-W (e.g. wrn-32-10, wrn-16-4)", "timm:NAME", "torchvision:NAME",
                                "robustbench:DATASET/THREAT/NAME"]


# `igam models`: per listed name, what it is and what it is for, and the zoo models whose parameters the
# line counts (PARAMS). tests/test_models.py checks that every name of list_models() has a line.
ABOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "madry-mnist": ("Madry et al.'s MNIST CNN (2 conv, fc 1024, no BatchNorm), the paper's MNIST teacher; "
                    "made for 1x28x28 (its fc grows with the input)", ("madry-mnist",)),
    "preact-resnet18": ("PreAct ResNet-18, the usual robust-training baseline on CIFAR",
                        ("preact-resnet18",)),
    **{f"resnet{d}": (f"He et al.'s CIFAR ResNet-{d} (widths 16/32/64, parameter-free shortcuts)",
                      (f"resnet{d}",)) for d in (20, 32, 44, 56, 110)},
    "small-cnn": ("small fast CNN (5 conv 3x3, global average pool), the student of the demo and the CPU "
                  "experiments (at width 16); inputs from 4x4", ("small-cnn",)),
    "small-cnn-bn": ("small-cnn with BatchNorm after every conv", ("small-cnn-bn",)),
    "wrn-D-W (e.g. wrn-32-10, wrn-16-4)": ("Madry's wide ResNet of depth D, widening factor W, leaky ReLU; "
                                           "wrn-32-10 is the paper's CIFAR student and teacher",
                                           ("wrn-32-10", "wrn-16-4")),
    "timm:NAME": ("any timm model, randomly initialised, built for the data's size and classes (pip install "
                  "'igam[timm]')", ()),
    "torchvision:NAME": ("any torchvision classifier, randomly initialised, first conv and logit layer "
                         "fitted to the data", ()),
    "robustbench:DATASET/THREAT/NAME": ("a RobustBench architecture at its dataset's input shape; as "
                                        "teacher=, with its published weights (below)", ()),
}
# parameters at the default width for 10 classes, on 1x28x28 (madry-mnist) or 3x32x32 inputs; static, so
# that `igam models` builds nothing (tests/test_models.py recounts them)
PARAMS: dict[str, int] = {
    "madry-mnist": 3_274_634, "preact-resnet18": 11_172_170, "resnet20": 269_722, "resnet32": 464_154,
    "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962, "small-cnn": 140_714,
    "small-cnn-bn": 141_034, "wrn-32-10": 45_901_914, "wrn-16-4": 2_706_906,
}


def describe_models() -> list[str]:
    """One line per name of list_models(): the name, what it is, and its parameter count (10 classes, the
    default width, 1x28x28 inputs for madry-mnist, else 3x32x32)."""
    lines = []
    for name in list_models():
        about, counted = ABOUT[name]
        counts = ", ".join(("" if n == name else f"{n}: ") + f"{PARAMS[n] / 1e6:.2f}M" for n in counted)
        lines.append(f"{name:<16} {about}" + (f" [{counts} parameters]" if counts else ""))
    return lines


def parameter_count(name: str, *, num_classes: int = 10, in_chans: int = 3, input_size: int = 32,
                    width: int = 0) -> int:
    """The parameters of zoo model `name` (not timm:, torchvision:, robustbench:), counted on the meta
    device: nothing is allocated or initialised."""
    norm = Normalize("none", None, None, in_chans)
    with torch.device("meta"):
        model = _zoo_builder(name, norm, num_classes, in_chans, (input_size, input_size), "default", width)()
    return sum(p.numel() for p in model.parameters())


def create_model(name: str, *, num_classes: int, in_chans: int = 3, input_size: int | tuple[int, int] = 32,
                 activation: str = "default", width: int = 0, normalize: str = "dataset",
                 mean: list[float] | None = None, std: list[float] | None = None) -> ImageClassifier:
    """Create a model by name. Inputs are [0,1] NCHW; normalisation is the model's first layer."""
    size: Any = ((input_size, input_size) if _is_int(input_size)
                 else tuple(input_size) if isinstance(input_size, list | tuple) else input_size)
    check_model_args(name, num_classes, in_chans, input_size if _is_int(input_size) else size, width)
    norm = Normalize(normalize, mean, std, in_chans)
    if activation not in ("default", *ACTIVATIONS):
        raise unknown("activation", activation, ("default", *ACTIVATIONS))
    if name.startswith(("timm:", "torchvision:", "robustbench:")):
        if activation != "default":
            raise IgamError(f"activation={activation} applies to zoo models (`igam models`); {name} keeps "
                            "its own activations. Leave activation=default, or pick a zoo model.")
        model = create_external(name, norm, num_classes, in_chans, size)
    else:
        model = _build_bounded(name, _zoo_builder(name, norm, num_classes, in_chans, size, activation, width))
    check_forward(model, name, in_chans, size)
    model.igam_args = {"name": name, "num_classes": num_classes, "in_chans": in_chans,
                       "input_size": list(size), "activation": activation, "width": width,
                       "normalize": normalize,
                       "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
    return model


def _zoo_builder(name: str, norm: Normalize, num_classes: int, in_chans: int, size: tuple[int, int],
                 activation: str, width: int) -> Callable[[], ImageClassifier]:
    """What builds zoo model `name` (a registered name or wrn-D-W) with these settings.

    Raises:
        IgamError: an unknown name, or a wrn-D-W out of bounds.
    """
    if (m := _WRN.match(name)) is not None:
        if int(m.group(2)) < 1:
            raise IgamError(f"{name}: the widening factor W of wrn-D-W must be at least 1 (e.g. wrn-32-10).")
        if int(m.group(2)) > 64 or int(m.group(1)) > 1000:
            raise IgamError(f"{name}: wrn-D-W takes a depth D up to 1000 and a widening factor W up to 64 "
                            "(e.g. wrn-32-10).")
        act = "leaky-relu" if activation == "default" else activation
        units, widen = _wrn_units(int(m.group(1))), int(m.group(2))
        return lambda: WideResNet(norm, num_classes, in_chans, size, units, widen, act=act, width=width)
    if name in _REGISTRY:
        act = _DEFAULT_ACT[name] if activation == "default" else activation
        return lambda: _REGISTRY[name](norm, num_classes, in_chans, size, act=act, width=width)
    raise unknown("model", name, sorted(_REGISTRY) + ["wrn-32-10", "timm:NAME", "torchvision:NAME"])


MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_CHANNELS = 64
MAX_SIDE = 1024  # input height / width in pixels
MAX_WIDTH = 1024  # width= (base channels / multiplier) of zoo models
MAX_PARAMS = 500_000_000  # 2 GB of float32 weights


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model_args(name: Any, num_classes: Any, in_chans: Any, size: Any, width: Any) -> None:
    """Types and bounds of a model description (from a config or a run's meta.json), checked before
    anything is allocated.

    Raises:
        IgamError: naming the value, its bound and the fix.
    """
    if not isinstance(name, str) or not name:
        raise IgamError(f"The model name must be a non-empty string, not {name!r}.")
    for key, v, hi in (("num_classes", num_classes, MAX_CLASSES), ("in_chans", in_chans, MAX_CHANNELS),
                       ("width", width, MAX_WIDTH)):
        lo = 0 if key == "width" else 1
        if not _is_int(v) or not lo <= v <= hi:
            raise IgamError(f"{key}={v!r} must be >= {lo} and <= {hi} (a whole number); the model cannot be "
                            "built with it (a damaged meta.json, or a typo in the configuration).")
    pair = (size, size) if _is_int(size) else size
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or not all(_is_int(v) and 1 <= v <= MAX_SIDE for v in pair)):
        shown = list(size) if isinstance(size, tuple | list) else size
        raise IgamError(f"input_size={shown!r} must be (height, width) in pixels, each a whole number in "
                        f"1 .. {MAX_SIDE}.")


def _build_bounded(name: str, build: Callable[[], ImageClassifier]) -> ImageClassifier:
    """Build a zoo model after counting its parameters on the meta device (no memory): refused above
    MAX_PARAMS instead of failing in the allocator."""
    with torch.device("meta"):
        probe = build()
    n = sum(p.numel() for p in probe.parameters())
    if n > MAX_PARAMS:
        raise IgamError(f"model={name} with these settings has {n:,} parameters, more than the "
                        f"{MAX_PARAMS:,} igam builds; lower width= (or the number of classes).")
    return build()


def check_forward(model: nn.Module, name: str, in_chans: int, size: tuple[int, int]) -> None:
    """One eval-mode forward pass of a zero image (no buffer or mode changes): an input smaller than the
    model's receptive field, or one it cannot take, is refused here, before any run directory is written."""
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, *size))
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise IgamError(f"model={name} cannot take {in_chans}x{size[0]}x{size[1]} inputs "
                        f"({type(e).__name__}: "
                        f"{reason}). The images are probably smaller than the model's receptive field: use "
                        "larger images (e.g. 28x28 or 32x32), or a model made for this size.") from None
    finally:
        for m, t in was.items():
            m.training = t
    del out


def model_from_args(args: dict[str, Any]) -> ImageClassifier:
    """Re-create a model from the `igam_args` stored in a run's meta.json."""
    if not isinstance(args, dict):
        raise IgamError(f"The model description must be a mapping, not {type(args).__name__}; meta.json was "
                        "not written by igam or is damaged.")
    missing = [k for k in ("name", "num_classes", "in_chans", "input_size") if k not in (args or {})]
    if missing:
        raise IgamError(f"The model description lacks {', '.join(missing)}; meta.json was not written by "
                        "igam or is damaged.")
    return create_model(args["name"], num_classes=args["num_classes"], in_chans=args["in_chans"],
                        input_size=_size(args["input_size"]), activation=args.get("activation", "default"),
                        width=args.get("width", 0), normalize=args.get("normalize", "dataset"),
                        mean=args.get("mean"), std=args.get("std"))


def _size(v: Any) -> Any:
    return tuple(v) if isinstance(v, list | tuple) else v


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
