"""Input adapters (paper 4.3, eq. 15): differentiable affine maps x' = A x + b from the target task's input
to the teacher's input, so the teacher's input gradient can be taken w.r.t. the *target* input (eq. 17).

Specs are strings, composed with '+', applied left to right:
    identity          no change
    gray              channel average (RGB -> 1-channel teacher, Table 1)
    rgb               repeat a 1-channel input to 3 channels
    resize[N]         bilinear resize to the teacher's size (or N); an exact 2x down-size is 2x2 average
                      pooling (4.3.1)
    crop[N]           centre crop (4.3.2); the discriminator sees gradients cropped the same way
    pad[N]            centre zero padding (4.3.3)
    random-pad[N]     zero padding at a random placement per batch (centre at evaluation)
    transpose-conv    a learned 3x3 stride-2 transposed convolution (exactly x2 up-size, no N), trained
                      with the teacher's new logit layer (Table 2); initialised as x2 linear up-sampling
                      (a [0.5, 1, 0.5] tent: the last row and column start at half intensity) of the
                      channel average when it has fewer output channels (3 -> 1: grey), else of input
                      channel o mod C for output channel o
    auto              gray/rgb as needed, then resize (or crop when the target is larger by a non-integer
                      factor)
e.g. `gray+crop28` maps CIFAR-10 (3x32x32) to an MNIST teacher (1x28x28).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError, unknown

Shape = tuple[int, int, int]  # C, H, W
STEPS = ("identity", "gray", "rgb", "resize", "crop", "pad", "random-pad", "transpose-conv")


class Step(nn.Module):
    """One adapter step: maps shape `in_shape` to `out_shape`."""

    learned = False

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def disc_view(self, g: torch.Tensor) -> torch.Tensor:
        """How gradients in this step's input space are shown to the discriminator (crop crops)."""
        return g


class Identity(Step):
    def forward(self, x):
        return x


class Gray(Step):
    def forward(self, x):
        return x.mean(1, keepdim=True)


class RGB(Step):
    def forward(self, x):
        return x.expand(-1, 3, -1, -1)


class Resize(Step):
    """Bilinear resize; an exact 2x (or kx) down-size is k x k average pooling, as in paper 4.3.1."""

    def forward(self, x):
        (h, w), (oh, ow) = self.in_shape[1:], self.out_shape[1:]
        if h % oh == 0 and w % ow == 0 and h // oh == w // ow and h > oh:
            return F.avg_pool2d(x, h // oh)
        return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)


class Crop(Step):
    """Centre crop; gradients shown to the discriminator are cropped the same way (paper 4.3.2)."""

    def _window(self) -> tuple[int, int, int, int]:
        (h, w), (oh, ow) = self.in_shape[1:], self.out_shape[1:]
        top, left = (h - oh) // 2, (w - ow) // 2
        return top, left, oh, ow

    def forward(self, x):
        t, l, oh, ow = self._window()
        return x[:, :, t : t + oh, l : l + ow]

    def disc_view(self, g):
        return self.forward(g)


class Pad(Step):
    """Centre zero padding (paper 4.3.3)."""

    def offsets(self) -> tuple[int, int]:
        (h, w), (oh, ow) = self.in_shape[1:], self.out_shape[1:]
        return (oh - h) // 2, (ow - w) // 2

    def forward(self, x):
        (h, w), (oh, ow) = self.in_shape[1:], self.out_shape[1:]
        top, left = self.offsets()
        return F.pad(x, (left, ow - w - left, top, oh - h - top))


class RandomPad(Pad):
    """Zero padding at a random placement, one placement per batch while training; centred in eval mode."""

    def offsets(self) -> tuple[int, int]:
        (h, w), (oh, ow) = self.in_shape[1:], self.out_shape[1:]
        if not self.training:
            return (oh - h) // 2, (ow - w) // 2
        top = int(torch.randint(0, oh - h + 1, ()))
        left = int(torch.randint(0, ow - w + 1, ()))
        return top, left


class TransposeConv(Step):
    """A learned 3x3 stride-2 transposed convolution (x2 up-size), initialised as x2 linear up-sampling
    (module docstring): of the average of the input channels i = o mod C_out for output channel o when it
    has fewer output channels than input channels (3 -> 1: the grey channel average, like `gray`), else of
    input channel o mod C_in (1 -> 3: repeated, like `rgb`)."""

    learned = True

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__(in_shape, out_shape)
        cin, cout = in_shape[0], out_shape[0]
        self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        with torch.no_grad():
            tent = torch.tensor([0.5, 1.0, 0.5])
            self.conv.weight.zero_()
            for o in range(cout):
                if cout < cin:  # average the input channels that fold onto o (3 -> 1: grey)
                    sources = range(o, cin, cout)
                    for i in sources:
                        self.conv.weight[i, o] = torch.outer(tent, tent) / len(sources)
                else:
                    self.conv.weight[o % cin, o] = torch.outer(tent, tent)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def _parse(token: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"([a-z-]+?)(\d+)?", token.strip().lower())
    if not m:
        raise IgamError(f"Cannot read adapter step '{token}'; write e.g. gray+crop28 or resize.")
    name, size = m.group(1), m.group(2)
    if name not in STEPS:
        raise unknown("adapter", name, STEPS + ("auto",))
    return name, int(size) if size else None


class Adapter(nn.Module):
    """A chain of steps from the target input shape to the teacher input shape."""

    def __init__(self, spec: str, steps: list[Step]):
        super().__init__()
        self.spec = spec
        self.steps = nn.ModuleList(steps)

    @property
    def learned(self) -> bool:
        return any(s.learned for s in self.steps)

    @property
    def in_shape(self) -> Shape:
        return self.steps[0].in_shape

    @property
    def out_shape(self) -> Shape:
        return self.steps[-1].out_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.steps:
            x = s(x)
        return x

    def disc_view(self, g: torch.Tensor) -> torch.Tensor:
        """A target-space gradient map as the discriminator sees it (cropped for crop adapters)."""
        for s in self.steps:
            if isinstance(s, Crop):
                g = s.disc_view(g)
        return g


def auto_spec(target: Shape, teacher: Shape) -> str:
    """The adapter `auto` means from target (C, H, W) to teacher (C, H, W): gray (3 -> 1 channels) or rgb
    (1 -> 3), then crop when the target is larger by a non-integer factor (4.3.2), else resize (4.3.1:
    an exact down-size is average pooling; for a smaller target the paper found resizing slightly better
    than padding, Table 2). Padding (4.3.3) is never automatic: ask for it, e.g. rgb+pad.

    Raises:
        IgamError: for channel counts no step converts (neither 3 -> 1 nor 1 -> 3).
    """
    parts = []
    if target[0] != teacher[0]:
        if (target[0], teacher[0]) == (3, 1):
            parts.append("gray")
        elif (target[0], teacher[0]) == (1, 3):
            parts.append("rgb")
        else:
            raise IgamError(
                f"No automatic adapter from {target[0]} to {teacher[0]} channels; the target is "
                f"{_fmt(target)} and the teacher expects {_fmt(teacher)}."
            )
    if target[1:] != teacher[1:]:
        (h, w), (th, tw) = target[1:], teacher[1:]
        bigger = h >= th and w >= tw
        exact = bigger and h % th == 0 and w % tw == 0 and h // th == w // tw
        parts.append("crop" if bigger and not exact else "resize")
    return "+".join(parts) or "identity"


def auto_reason(target: Shape, teacher: Shape) -> str:
    """Why `auto` picks `auto_spec(target, teacher)`, in one sentence for the run's log, e.g. 'adapter=auto
    chose gray+crop for the 3x32x32 target and the 1x28x28 teacher: gray averages the 3 channels into 1;
    crop cuts the centre 28x28 (the target is larger, not by a whole factor; paper 4.3.2)'."""
    spec = auto_spec(target, teacher)
    why = []
    for step in spec.split("+"):
        if step == "gray":
            why.append("gray averages the 3 channels into 1")
        elif step == "rgb":
            why.append("rgb repeats the single channel 3 times")
        elif step == "crop":
            why.append(f"crop cuts the centre {teacher[1]}x{teacher[2]} (the target is larger, not by a "
                       "whole factor; paper 4.3.2)")
        elif step == "resize":
            bigger = target[1] >= teacher[1] and target[2] >= teacher[2]
            why.append(f"resize scales to {teacher[1]}x{teacher[2]} (" + (
                "an exact down-size: average pooling; paper 4.3.1" if bigger else
                "a smaller target: the paper found resizing slightly better than padding, Table 2") + ")")
        else:
            why.append("the shapes already agree")
    return (f"adapter=auto chose {spec} for the {_fmt(target)} target and the {_fmt(teacher)} teacher: "
            + "; ".join(why) + ". Set adapter=... to choose another.")


def _fmt(s: Shape) -> str:
    return "x".join(str(v) for v in s)


def _other_examples(target: Shape, teacher: Shape) -> str:
    """More adapters that fit this direction of transfer, for error messages."""
    colour = {(3, 1): "gray+", (1, 3): "rgb+"}.get((target[0], teacher[0]), "")
    if target[1:] == teacher[1:]:
        return ""
    smaller = target[1] <= teacher[1] and target[2] <= teacher[2]
    return f" (or {colour}pad / {colour}random-pad)" if smaller else f" (or {colour}crop{teacher[1]})"


def build_adapter(spec: str, target: Shape, teacher: Shape) -> Adapter:
    """Build the adapter `spec` from target input shape (C,H,W) to teacher input shape; clear errors on
    shapes that do not fit."""
    target, teacher = tuple(int(v) for v in target), tuple(int(v) for v in teacher)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = auto_spec(target, teacher)
    tokens = [t for t in spec.split("+") if t.strip()]
    steps: list[Step] = []
    shape = target
    for i, token in enumerate(tokens):
        name, size = _parse(token)
        last_spatial = not any(
            _parse(t)[0] in ("resize", "crop", "pad", "random-pad", "transpose-conv") for t in tokens[i + 1 :]
        )
        c, h, w = shape
        if name == "identity":
            out, step = shape, Identity
        elif name == "gray":
            out, step = (1, h, w), Gray
        elif name == "rgb":
            if c != 1:
                raise IgamError(f"Adapter step 'rgb' needs a 1-channel input, got {_fmt(shape)}.")
            out, step = (3, h, w), RGB
        elif name == "transpose-conv":
            if size is not None:
                raise IgamError(f"Adapter step '{token}': transpose-conv takes no size, it always doubles "
                                "the height and width; write transpose-conv, and resize/crop/pad after it if "
                                "the teacher needs another size.")
            oc = teacher[0] if last_spatial else c
            out, step = (oc, 2 * h, 2 * w), TransposeConv
        else:
            if size is not None:
                oh = ow = size
            elif last_spatial:
                oh, ow = teacher[1:]
            else:
                raise IgamError(
                    f"Adapter step '{token}' needs a size (e.g. {name}28) when another spatial "
                    "step follows it."
                )
            if name == "crop" and (oh > h or ow > w):
                raise IgamError(
                    f"Adapter '{spec}': cannot crop {_fmt(shape)} to {oh}x{ow}; crop only "
                    f"shrinks. Use pad or resize to reach the teacher's {_fmt(teacher)}."
                )
            if name in ("pad", "random-pad") and (oh < h or ow < w):
                raise IgamError(
                    f"Adapter '{spec}': cannot pad {_fmt(shape)} to {oh}x{ow}; padding only "
                    f"grows. Use crop or resize to reach the teacher's {_fmt(teacher)}."
                )
            if name == "crop" and steps and any(isinstance(s, Resize | Pad | TransposeConv) for s in steps):
                raise IgamError(
                    f"Adapter '{spec}': put crop before any resize/pad step, so the "
                    "discriminator's cropped view lines up with the target image."
                )
            out = (c, oh, ow)
            step = {"resize": Resize, "crop": Crop, "pad": Pad, "random-pad": RandomPad}[name]
        steps.append(step(shape, out))
        shape = out
    if shape != teacher:
        raise IgamError(
            f"Adapter '{spec}' maps the target input {_fmt(target)} to {_fmt(shape)}, but the "
            f"teacher expects {_fmt(teacher)}. Try adapter={auto_spec(target, teacher)}"
            f"{_other_examples(target, teacher)}."
        )
    return Adapter(spec, steps or [Identity(target, target)])
