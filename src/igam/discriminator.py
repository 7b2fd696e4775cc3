"""The gradient discriminator f_disc (paper 4.2.1, Appendix A; official `IgamConvDiscriminatorModel`).

N x [conv 4x4 stride 2 'SAME' (bias) -> BatchNorm (eps 1e-3) -> LeakyReLU 0.1], flatten, linear -> one
logit: log-odds that a gradient map came from the teacher. (The official code uses 2 softmax outputs;
a 2-way softmax is a sigmoid of the logit difference, so one logit is the same family of functions.)
Appendix A: 4 layers 8-16-32-64 (Tiny-ImageNet teacher) or 5 layers 16-32-64-128-256 (MNIST/CIFAR).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def zero_mean_l2(g: torch.Tensor) -> torch.Tensor:
    """Official preprocessing: subtract each map's mean, scale to unit L2 norm with TF's clamp of the
    squared norm at 1e-12 (not F.normalize, whose clamp is on the norm)."""
    g = g - g.mean((1, 2, 3), keepdim=True)
    return g * torch.rsqrt((g * g).sum((1, 2, 3), keepdim=True).clamp_min(1e-12))


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding for a strided conv: output ceil(H/s), extra padding at the bottom/right.
    (For 32x32 inputs this equals padding=1; for 28x28 views it keeps 5 layers possible: 28-14-7-4-2-1.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


class GradientDiscriminator(nn.Module):
    def __init__(
        self, in_shape: tuple[int, int, int], layers: int = 5, channels: int = 16, input_norm: str = "none"
    ):
        super().__init__()
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for i in range(layers):
            cout = channels * 2**i
            blocks += [SameConv2d(c, cout, 4, 2), nn.BatchNorm2d(cout, eps=1e-3), nn.LeakyReLU(0.1)]
            c = cout
        self.features = nn.Sequential(*blocks, nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(2, *in_shape)).shape[1]
        self.head = nn.Linear(n, 1)
        self.input_norm = input_norm
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (16 * m.out_channels)) ** 0.5)
                nn.init.zeros_(m.bias)
        bound = (3.0 / n) ** 0.5
        nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.zeros_(self.head.bias)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of 'this gradient map came from the teacher'."""
        if self.input_norm == "zero-mean-l2":
            g = zero_mean_l2(g)
        return self.head(self.features(g)).squeeze(1)
