"""Bridges to timm, torchvision and RobustBench architectures, wrapped in the uniform ImageClassifier
interface (inputs [0, 1] NCHW, a replaceable logit layer `fc`)."""

from __future__ import annotations

import torch
import torch.nn as nn

import igam.models.robustbench_zoo as robustbench_zoo
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
        self.head_path = path  # where the logit layer sat in the wrapped network

    def native_names(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict of the wrapped network as its library names it (the logit layer at head_path)
        renamed to this module's names (features.*, fc.*)."""
        head = self.head_path + "."
        return {("fc." + k[len(head):]) if k.startswith(head) else ("features." + k): v
                for k, v in state.items()}

    def native_keys(self) -> set[str]:
        """The parameter and buffer names the wrapped network has in its own library."""
        return {k[len("features."):] for k in self.state_dict() if k.startswith("features.")} | {
            f"{self.head_path}.{k[len('fc.'):]}" for k in self.state_dict() if k.startswith("fc.")}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        # networks with auxiliary heads (GoogLeNet, Inception in train mode) return (main, aux...) tuples
        return out[0] if isinstance(out, tuple | list) else out


def _first_conv_to(net: nn.Module, in_chans: int) -> None:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != in_chans:
                new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.groups, m.bias is not None)
                _set_module(net, name, new)
            return


def create_external(name: str, norm: Normalize, num_classes: int, in_chans: int,
                    input_size: tuple[int, int] = (32, 32)) -> ImageClassifier:
    """`timm:NAME`, `torchvision:NAME` or `robustbench:DATASET/THREAT/NAME`, randomly initialised (nothing
    is downloaded), for inputs (in_chans, *input_size). Models that take an image size (timm's ViTs) are
    built for input_size; auxiliary heads (torchvision's GoogLeNet, Inception) are left out.

    Raises:
        IgamError: unknown library or model, a library not installed, or a model that cannot take inputs
            of this size (checked with one forward pass).
    """
    lib, _, arch = name.partition(":")
    if lib == "timm":
        try:
            import timm
        except ImportError:
            raise IgamError(f"Model '{name}' needs timm: pip install 'igam[timm]'.") from None
        if arch not in timm.list_models():
            raise IgamError(f"timm has no model '{arch}'.{suggest(arch, timm.list_models())}")
        kw = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
        try:
            net = timm.create_model(arch, img_size=tuple(input_size), **kw)
        except TypeError:  # a model without an image size argument (convolutional)
            net = timm.create_model(arch, **kw)
    elif lib == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            raise IgamError(f"torchvision has no model '{arch}'."
                            f"{suggest(arch, torchvision.models.list_models())}")
        kw = {"weights": None, "num_classes": num_classes}
        try:
            net = torchvision.models.get_model(arch, aux_logits=False, init_weights=True, **kw)
        except (TypeError, ValueError):  # no auxiliary heads to leave out
            net = torchvision.models.get_model(arch, **kw)
        _first_conv_to(net, in_chans)
    elif lib == "robustbench":
        dataset = robustbench_zoo.parse_name(name)[0]
        want = robustbench_zoo.SHAPES[dataset]
        if (in_chans, *input_size) != want:
            raise IgamError(f"'{name}' takes {'x'.join(map(str, want))} inputs, not "
                            f"{in_chans}x{input_size[0]}x{input_size[1]}; put an adapter in front of it.")
        net = robustbench_zoo.build_network(name)
    else:
        raise IgamError(f"Unknown model library '{lib}'; write timm:NAME, torchvision:NAME or "
                        "robustbench:DATASET/THREAT/NAME.")
    model = ExternalClassifier(norm, net)
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    _check_input_size(model, name, in_chans, input_size)
    return model


def _check_input_size(model: nn.Module, name: str, in_chans: int, size: tuple[int, int]) -> None:
    """One forward pass of a 1-image batch (eval mode, restored): a clear error for sizes the model cannot
    take (a ViT's fixed patch grid, a network that pools below 1x1)."""
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *size))
    except Exception as e:  # any shape error deep inside a foreign architecture
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise IgamError(f"Model '{name}' cannot take {in_chans}x{size[0]}x{size[1]} inputs ({first}). Use "
                        "inputs of the size it was made for (e.g. an adapter with resize), or another "
                        "model.") from None
    finally:
        model.train(was)
