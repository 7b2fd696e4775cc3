"""Model registry: `create_model(name, num_classes=..., in_chans=..., input_size=...)` (timm style).

Names: madry-mnist, small-cnn, small-cnn-bn, resnet20/32/44/56/110, preact-resnet18, wrn-D-W (Madry's wide
ResNet; D = 6n+2 counts as Madry does, so wrn-32-10 has 5 units per stage, else D = 6n+4 as Zagoruyko
does, so wrn-16-4 has 2), and timm:NAME / torchvision:NAME.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from igam.errors import IgamError, unknown
from igam.models.base import ACTIVATIONS, ImageClassifier, Normalize, make_act
from igam.models.external import create_external
from igam.models.zoo import CifarResNet, MadryMNIST, PreActResNet18, SmallCNN, WideResNet

__all__ = ["ACTIVATIONS", "ImageClassifier", "Normalize", "create_model", "list_models", "make_act",
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


def create_model(name: str, *, num_classes: int, in_chans: int = 3, input_size: int | tuple[int, int] = 32,
                 activation: str = "default", width: int = 0, normalize: str = "dataset",
                 mean: list[float] | None = None, std: list[float] | None = None) -> ImageClassifier:
    """Create a model by name. Inputs are [0,1] NCHW; normalisation is the model's first layer."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if num_classes < 1 or in_chans < 1:
        raise IgamError(f"create_model: num_classes={num_classes} and in_chans={in_chans} must be >= 1.")
    if len(size) != 2 or min(size) < 1:
        raise IgamError(f"create_model: input_size={input_size} must be a positive size or (height, width).")
    norm = Normalize(normalize, mean, std, in_chans)
    if activation not in ("default", *ACTIVATIONS):
        raise unknown("activation", activation, ("default", *ACTIVATIONS))
    if name.startswith(("timm:", "torchvision:", "robustbench:")):
        if activation != "default":
            raise IgamError(f"activation={activation} applies to zoo models (`igam models`); {name} keeps "
                            "its own activations. Leave activation=default, or pick a zoo model.")
        model = create_external(name, norm, num_classes, in_chans, size)
    elif (m := _WRN.match(name)) is not None:
        if int(m.group(2)) < 1:
            raise IgamError(f"{name}: the widening factor W of wrn-D-W must be at least 1 (e.g. wrn-32-10).")
        act = "leaky-relu" if activation == "default" else activation
        model = WideResNet(norm, num_classes, in_chans, size, _wrn_units(int(m.group(1))), int(m.group(2)),
                           act=act, width=width)
    elif name in _REGISTRY:
        act = _DEFAULT_ACT[name] if activation == "default" else activation
        model = _REGISTRY[name](norm, num_classes, in_chans, size, act=act, width=width)
    else:
        raise unknown("model", name, sorted(_REGISTRY) + ["wrn-32-10", "timm:NAME", "torchvision:NAME"])
    model.igam_args = {"name": name, "num_classes": num_classes, "in_chans": in_chans,
                       "input_size": list(size), "activation": activation, "width": width,
                       "normalize": normalize,
                       "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
    return model


def model_from_args(args: dict[str, Any]) -> ImageClassifier:
    """Re-create a model from the `igam_args` stored in a run's meta.json."""
    missing = [k for k in ("name", "num_classes", "in_chans", "input_size") if k not in (args or {})]
    if missing:
        raise IgamError(f"The model description lacks {', '.join(missing)}; meta.json was not written by "
                        "igam or is damaged.")
    return create_model(args["name"], num_classes=args["num_classes"], in_chans=args["in_chans"],
                        input_size=tuple(args["input_size"]), activation=args.get("activation", "default"),
                        width=args.get("width", 0), normalize=args.get("normalize", "dataset"),
                        mean=args.get("mean"), std=args.get("std"))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
