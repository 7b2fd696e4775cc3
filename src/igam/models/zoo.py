"""Architectures of the zoo: madry-mnist, Madry's wide ResNets, CIFAR ResNets, PreAct ResNet-18, a small
CNN."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.models.base import ImageClassifier, Normalize, init_weights, make_act

SMOOTH_ACTIVATIONS = ("softplus", "silu", "gelu")


def pool_for(act: str) -> type[nn.Module]:
    """Max pooling for (leaky) ReLU networks, average pooling for smooth activations (softplus, SiLU,
    GELU), so that a smooth student is smooth end to end: its input gradient then changes continuously,
    which input-gradient penalties and finite-difference matching rely on (Rodriguez-Munoz et al. 2024 find
    gradient-norm training works with GELU, not ReLU). The other zoo models pool only globally (average)."""
    return nn.AvgPool2d if act in SMOOTH_ACTIVATIONS else nn.MaxPool2d


class MadryMNIST(ImageClassifier):
    """Madry et al.'s MNIST model: conv 32 5x5, pool, conv 64 5x5, pool, fc 1024, fc k (no BatchNorm).
    Max pooling with (leaky) ReLU, as Madry et al.; average pooling with a smooth activation (pool_for)."""

    def __init__(self, norm: Normalize, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 act: str = "relu", width: int = 0):
        super().__init__(norm)
        w = width or 32
        h, wd = input_size
        if h < 4 or wd < 4:
            raise IgamError(f"madry-mnist needs inputs of at least 4x4 pixels (two 2x2 poolings), got "
                            f"{h}x{wd}.")
        pool = pool_for(act)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 5, padding=2), make_act(act), pool(2),
            nn.Conv2d(w, 2 * w, 5, padding=2), make_act(act), pool(2),
            nn.Flatten(), nn.Linear(2 * w * (h // 4) * (wd // 4), 1024), make_act(act))
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():  # Madry: truncated normal sigma 0.1, biases 0.1
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.1, a=-0.2, b=0.2)
                nn.init.constant_(m.bias, 0.1)


class SmallCNN(ImageClassifier):
    """A small fast CNN: [conv, conv, pool] x2, conv, global average pool, fc. Optional BatchNorm.
    Max pooling with (leaky) ReLU; average pooling with a smooth activation, so the whole network is smooth
    (finite-difference gradient matching is then exact up to O(h^2))."""

    def __init__(self, norm: Normalize, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 act: str = "relu", width: int = 0, bn: bool = False):
        super().__init__(norm)
        w = width or 32

        def block(cin, cout):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
            return layers + ([nn.BatchNorm2d(cout)] if bn else []) + [make_act(act)]

        pool = pool_for(act)
        self.features = nn.Sequential(
            *block(in_chans, w), *block(w, w), pool(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), pool(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)
        init_weights(self)


def _zero_pad_shortcut(x: torch.Tensor, cout: int, stride: int) -> torch.Tensor:
    """Parameter-free shortcut (Madry WRN, ResNet option A): average-pool, then zero-pad channels."""
    if stride > 1:
        x = F.avg_pool2d(x, stride, stride)
    extra = cout - x.shape[1]
    if extra > 0:
        x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return x


class PreActUnit(nn.Module):
    """Madry's WRN unit: [BN, act] -> conv3x3(s) -> BN -> act -> conv3x3, plus a zero-pad shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, act: str, activate_before_residual: bool):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin, eps=1e-3), make_act(act)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout, eps=1e-3), make_act(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.cout, self.stride, self.abr = cout, stride, activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        short = a if self.abr else x
        out = self.conv2(self.act2(self.bn2(self.conv1(a))))
        if short.shape[1] != self.cout or self.stride > 1:
            short = _zero_pad_shortcut(short, self.cout, self.stride)
        return out + short


class WideResNet(ImageClassifier):
    """Madry's CIFAR wide ResNet (`wrn-32-10` is the paper's student and teacher): a 3x3 stem with 16
    channels, three stages of n pre-activation units of widths 16W/32W/64W, BN, act, global average pool.
    Global pooling makes it accept 32x32 and 64x64 inputs alike."""

    def __init__(self, norm: Normalize, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 units: int, widen: int, act: str = "leaky-relu", width: int = 0):
        super().__init__(norm)
        base = width or 16
        widths = [base * widen, 2 * base * widen, 4 * base * widen]
        cin = min(16, widths[0])  # Madry's 16-channel stem (narrower only when width makes stage 1 narrower)
        layers: list[nn.Module] = [nn.Conv2d(in_chans, cin, 3, 1, 1, bias=False)]
        for stage, (cout, stride) in enumerate(zip(widths, (1, 2, 2))):
            for i in range(units):
                layers.append(PreActUnit(cin, cout, stride if i == 0 else 1, act, stage == 0 and i == 0))
                cin = cout
        layers += [nn.BatchNorm2d(cin, eps=1e-3), make_act(act), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)


class BasicBlock(nn.Module):
    """Post-activation ResNet block (He et al.) with an option-A (parameter-free) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(cout), make_act(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), make_act(act)
        self.cout, self.stride = cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + _zero_pad_shortcut(x, self.cout, self.stride))


class CifarResNet(ImageClassifier):
    """He et al.'s CIFAR ResNet-(6n+2): resnet20/32/44/56/110, widths 16/32/64 (times width/16)."""

    def __init__(self, norm: Normalize, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 n: int, act: str = "relu", width: int = 0):
        super().__init__(norm)
        w = width or 16
        layers: list[nn.Module] = [nn.Conv2d(in_chans, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                   make_act(act)]
        cin = w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, act))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), make_act(act)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), make_act(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(x))
        short = self.shortcut(a) if self.shortcut is not None else x
        return self.conv2(self.act2(self.bn2(self.conv1(a)))) + short


class PreActResNet18(ImageClassifier):
    """PreAct ResNet-18 (He et al. 2016), the usual robust-training baseline on CIFAR."""

    def __init__(self, norm: Normalize, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 act: str = "relu", width: int = 0):
        super().__init__(norm)
        w = width or 64
        layers: list[nn.Module] = [nn.Conv2d(in_chans, w, 3, 1, 1, bias=False)]
        cin = w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
            for i in range(2):
                layers.append(PreActBlock(cin, cout, stride if i == 0 else 1, act))
                cin = cout
        layers += [nn.BatchNorm2d(cin), make_act(act), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)
