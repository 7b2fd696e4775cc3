"""Bridges to timm and torchvision architectures, wrapped in the uniform ImageClassifier interface."""

from __future__ import annotations

import torch.nn as nn

from igam.errors import IgamError, suggest
from igam.models.base import ImageClassifier, Normalize


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent = root
    *parents, last = path.split(".")
    for p in parents:
        parent = getattr(parent, p)
    setattr(parent, last, new)


class ExternalClassifier(ImageClassifier):
    """Any network whose last nn.Linear is its logit layer: that layer becomes `fc`, the rest `features`."""

    def __init__(self, norm: Normalize, net: nn.Module):
        super().__init__(norm)
        linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise IgamError("This network has no nn.Linear logit layer, so igam cannot replace its head.")
        path, fc = linears[-1]
        _set_module(net, path, nn.Identity())
        self.features, self.fc = net, fc


def _first_conv_to(net: nn.Module, in_chans: int) -> None:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != in_chans:
                new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.groups, m.bias is not None)
                _set_module(net, name, new)
            return


def create_external(name: str, norm: Normalize, num_classes: int, in_chans: int) -> ImageClassifier:
    """`timm:NAME` or `torchvision:NAME`, randomly initialised (nothing is downloaded)."""
    lib, _, arch = name.partition(":")
    if lib == "timm":
        try:
            import timm
        except ImportError:
            raise IgamError(f"Model '{name}' needs timm: pip install 'igam[timm]'.") from None
        if arch not in timm.list_models():
            raise IgamError(f"timm has no model '{arch}'. See timm.list_models().")
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    elif lib == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            raise IgamError(f"torchvision has no model '{arch}'."
                            f"{suggest(arch, torchvision.models.list_models())}")
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        _first_conv_to(net, in_chans)
    else:
        raise IgamError(f"Unknown model library '{lib}'; write timm:NAME or torchvision:NAME.")
    return ExternalClassifier(norm, net)
