"""The common model interface: [0,1] NCHW input, normalisation inside, a uniform logit-layer API.

Every model is an :class:`ImageClassifier`: `forward(x) = forward_head(forward_features(x))`, and
`get_classifier()` / `reset_classifier(k)` give teacher fine-tuning (paper eq. 6) one way to swap the head.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from igam.errors import IgamError, unknown

ACTIVATIONS = ("relu", "leaky-relu", "softplus", "silu", "gelu")


def make_act(name: str) -> nn.Module:
    """relu | leaky-relu (slope 0.1, Madry's WRN) | softplus (beta 10, smooth ReLU) | silu | gelu."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky-relu":
        return nn.LeakyReLU(0.1)
    if name == "softplus":
        return nn.Softplus(beta=10.0)
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise unknown("activation", name, ACTIVATIONS)


class Normalize(nn.Module):
    """Input normalisation as the model's first layer (no clamping: gradients flow everywhere).

    dataset: (x - mean) / std per channel; per-image: TF per_image_standardization (Madry CIFAR teacher);
    l2: subtract the per-image mean, scale to unit L2 norm (official IGAM student); none: identity.
    """

    def __init__(self, mode: str = "dataset", mean: list[float] | None = None, std: list[float] | None = None,
                 channels: int = 3):
        super().__init__()
        if mode not in ("dataset", "none", "per-image", "l2"):
            raise unknown("normalisation", mode, ["dataset", "none", "per-image", "l2"])
        self.mode = mode
        mean = mean if mean is not None else [0.5] * channels
        std = std if std is not None else [0.25] * channels
        if len(mean) != channels or len(std) != channels:
            raise IgamError(f"Normalisation has {len(mean)} channel means for a {channels}-channel model.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dataset":
            return (x - self.mean) / self.std
        if self.mode == "per-image":
            n = x[0].numel()
            m = x.mean((1, 2, 3), keepdim=True)
            s = x.std((1, 2, 3), keepdim=True, unbiased=False).clamp_min(1.0 / n**0.5)
            return (x - m) / s
        if self.mode == "l2":
            z = x - x.mean((1, 2, 3), keepdim=True)
            return z * torch.rsqrt((z * z).sum((1, 2, 3), keepdim=True).clamp_min(1e-12))
        return x

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


NORMALIZE_METADATA = "igam.normalize"  # safetensors header key: {module path: Normalize mode}, as JSON


def normalization_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors header entry that records each Normalize layer's mode (its mean/std are buffers in
    the weights; the mode is not), e.g. {"igam.normalize": '{"normalize": "none"}'}; {} without one."""
    modes = {name: m.mode for name, m in model.named_modules() if isinstance(m, Normalize)}
    return {NORMALIZE_METADATA: json.dumps(modes, sort_keys=True)} if modes else {}


def apply_normalization_metadata(model: nn.Module, metadata: dict[str, str], prefix: str = "") -> list[str]:
    """Set each Normalize layer of `model` to the mode a file's header recorded for it (at `prefix` + its
    path when the file's names carried a wrapper prefix). Returns the layers changed, as 'path: mode'.

    Raises:
        IgamError: a header entry that is not the JSON object normalization_metadata writes, or names an
            unknown mode.
    """
    text = metadata.get(NORMALIZE_METADATA)
    if not text:
        return []
    try:
        modes = json.loads(text)
        assert isinstance(modes, dict)
    except (ValueError, AssertionError):
        raise IgamError(f"The weights file's '{NORMALIZE_METADATA}' header entry is not a JSON object of "
                        "normalisation modes; re-save the weights with igam.") from None
    changed = []
    for name, m in model.named_modules():
        if not isinstance(m, Normalize):
            continue
        mode = modes.get(prefix + name, modes.get(name))
        if mode is None or mode == m.mode:
            continue
        if mode not in ("dataset", "none", "per-image", "l2"):
            raise unknown("normalisation in the weights file's header", str(mode),
                          ["dataset", "none", "per-image", "l2"])
        m.mode = mode
        changed.append(f"{name}: {mode}")
    return changed


class ImageClassifier(nn.Module):
    """Base class: subclasses build `self.features` (normalised input -> pooled vector) and `self.fc`."""

    features: nn.Module
    fc: nn.Linear

    def __init__(self, normalize: Normalize):
        super().__init__()
        self.normalize = normalize

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f if pre_logits else self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def reset_classifier(self, num_classes: int) -> nn.Linear:
        """Replace the logit layer with a fresh one for `num_classes` classes (uniform init, bias 0,
        as the official new head)."""
        fc = nn.Linear(self.fc.in_features, num_classes).to(self.fc.weight.device)
        bound = (3.0 / self.fc.in_features) ** 0.5
        nn.init.uniform_(fc.weight, -bound, bound)
        nn.init.zeros_(fc.bias)
        self.fc = fc
        return fc


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, uniform-unit-scaling linears, BN gamma 1 beta 0 (Madry/IGAM)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = (3.0 / m.in_features) ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
