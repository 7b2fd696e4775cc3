"""Input-gradient grids, as in the paper's Figs. 1, 4 and 6: test images in the first column, then each
model's gradient of the cross-entropy at the true label w.r.t. the [0,1] input, for the same images.

Robust models give salient gradients that resemble the image; standard models give noisy ones (Fig. 1).
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.report.common import ImageSample, image_hwc, load_test_images, run_labels, run_meta, save_figure
from igam.runs import load_run_model
from igam.utils import bn_mode

# layout of the grid, in inches
CELL, GAP, LEFT, RIGHT = 1.25, 0.08, 1.15, 0.12
PRED_ROW = 0.22
TITLE_PT, FOOT_PT, COL_PT, ROW_PT, PRED_PT = 10.5, 7.5, 9.0, 9.0, 7.5


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d CE(model(x), y) / dx per image (summed loss, so each image's gradient is its own, unscaled) and
    the predicted classes; eval-mode BatchNorm, float32, parameters' .grad untouched."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = x.detach().to(device, torch.float32).requires_grad_(True)
    y = y.to(device).long()
    with bn_mode(model, "eval"), torch.enable_grad():
        logits = model(x)
        if logits.ndim != 2 or int(y.max()) >= logits.shape[1]:
            raise IgamError(f"The model gives {tuple(logits.shape)} logits but the labels go up to "
                            f"{int(y.max())}; the models of one gradient grid must share their classes.")
        (g,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x)
    return g.detach().cpu(), logits.argmax(1).detach().cpu()


def scale_gradients(g: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """Per-image symmetric scaling to [0,1] around 0: 0.5 + 0.5 * clip(g / s, -1, 1), where s is the
    `percentile` of |g| over the image's pixels and channels (100: max |g|). Zero stays mid-grey."""
    if not 0 < percentile <= 100:
        raise IgamError(f"percentile={percentile} must lie in (0, 100]; 100 scales by the largest |g|.")
    flat = g.detach().float().abs().flatten(1)
    s = torch.quantile(flat, percentile / 100, dim=1) if percentile < 100 else flat.amax(1)
    s = torch.where(s > 0, s, torch.ones_like(s)).view(-1, *([1] * (g.ndim - 1)))
    return (g / s).clamp(-1, 1) * 0.5 + 0.5


def _wrap(text: str, width_in: float, fontsize: float) -> list[str]:
    """Lines of `text` that fit `width_in` inches at `fontsize` points (DejaVu Sans ~0.6 em per char)."""
    chars = max(12, int(width_in * 72 / (0.6 * fontsize)))
    return [line for para in text.split("\n") for line in (textwrap.wrap(para, chars) or [""])]


def _footnote(percentile: float, grey: bool) -> str:
    scale = "the largest |g|" if percentile >= 100 else f"the {percentile:g}th percentile of |g|"
    return (f"Columns 2+: gradient g of the cross-entropy at the true label w.r.t. the input, per image "
            f"scaled symmetrically by {scale} (mid-grey = 0){'' if grey else ', RGB channels as colour'}.")


def _col_title(name: str) -> list[str]:
    return textwrap.wrap(name, 18, break_on_hyphens=True)[:3] or [""]


def _head_height(title: str | None, width: float) -> float:
    return len(_wrap(title, width - 0.2, TITLE_PT)) * TITLE_PT * 1.3 / 72 + 0.14 if title else 0.05


def grid_figsize(n_images: int, model_names: list[str], predictions: bool = True, title: str | None = None,
                 footnote: str = "") -> tuple[float, float]:
    """Figure size (inches) of a grid of n_images rows and 1 + len(model_names) columns."""
    cols = 1 + len(model_names)
    w = LEFT + cols * CELL + (cols - 1) * GAP + RIGHT
    col_lines = max(len(_col_title(m)) for m in ["Image", *model_names])
    foot = len(_wrap(footnote, w - 0.2, FOOT_PT)) * FOOT_PT * 1.4 / 72 + 0.12 if footnote else 0.0
    h = (_head_height(title, w) + col_lines * COL_PT * 1.3 / 72 + 0.1
         + n_images * (CELL + (PRED_ROW if predictions else GAP)) + foot)
    return round(w, 4), round(h, 4)


def gradient_figure(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, class_names: list[str],
                    *, indices: list[int] | None = None, percentile: float = 99.0, predictions: bool = True,
                    title: str | None = "Input gradients (cf. paper Figs. 1 and 4)"):
    """The grid as a matplotlib Figure (see `gradient_grid`)."""
    from matplotlib.figure import Figure

    if not models:
        raise IgamError("A gradient grid needs at least one model.")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise IgamError(f"Images must be N x C x H x W with C = 1 or 3; got shape {tuple(x.shape)}.")
    if len(x) != len(y) or len(x) == 0:
        raise IgamError(f"Got {len(x)} images and {len(y)} labels; give the same, non-zero number of each.")
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    grads, preds = {}, {}
    for name, model in models.items():
        try:
            g, p = input_gradients(model, x, y)
        except RuntimeError as e:
            raise IgamError(f"Model '{name}' cannot take images of shape {tuple(x.shape[1:])} "
                            f"({str(e).splitlines()[0][:160]}).") from None
        grads[name], preds[name] = scale_gradients(g, percentile), p

    n, grey = len(x), x.shape[1] == 1
    foot = _footnote(percentile, grey)
    W, H = grid_figsize(n, list(models), predictions, title, foot)
    fig = Figure(figsize=(W, H))
    row_h = CELL + (PRED_ROW if predictions else GAP)
    if title:
        fig.text(0.5, 1 - 0.08 / H, "\n".join(_wrap(title, W - 0.2, TITLE_PT)), ha="center", va="top",
                 fontsize=TITLE_PT, weight="bold", linespacing=1.2)
    col_lines = max(len(_col_title(m)) for m in ["Image", *models])
    top = H - _head_height(title, W) - col_lines * COL_PT * 1.3 / 72 - 0.1
    names = ["Image", *models]
    for j, name in enumerate(names):
        cx = (LEFT + j * (CELL + GAP) + CELL / 2) / W
        fig.text(cx, (top + 0.05) / H, "\n".join(_col_title(name)), ha="center", va="bottom", fontsize=COL_PT,
                 weight="bold" if j == 0 else "normal")
    for i in range(n):
        yb = top - i * row_h - CELL
        cls = int(y[i])
        cname = class_names[cls] if cls < len(class_names) else str(cls)
        rlabel = "\n".join(textwrap.wrap(cname, 14)[:2]) + (f"\n#{indices[i]}" if indices is not None else "")
        fig.text((LEFT - 0.08) / W, (yb + CELL / 2) / H, rlabel, ha="right", va="center", fontsize=ROW_PT)
        for j, name in enumerate(names):
            ax = fig.add_axes([(LEFT + j * (CELL + GAP)) / W, yb / H, CELL / W, CELL / H])
            img = x[i] if j == 0 else grads[name][i]
            ax.imshow(image_hwc(img), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_linewidth(0.4)
                s.set_color("#888888")
            if predictions and j > 0:
                p = int(preds[name][i])
                pname = class_names[p] if p < len(class_names) else str(p)
                ok = p == cls
                ax.text(0.5, -0.03, f"pred: {pname[:16]}", transform=ax.transAxes, ha="center", va="top",
                        fontsize=PRED_PT, color="#1a7f37" if ok else "#c62828")
    fig.text(0.5, 0.06 / H, "\n".join(_wrap(foot, W - 0.2, FOOT_PT)), ha="center", va="bottom",
             fontsize=FOOT_PT, color="#444444", linespacing=1.25)
    return fig


def gradient_grid(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, class_names: list[str],
                  path: str | Path, *, indices: list[int] | None = None, percentile: float = 99.0,
                  predictions: bool = True, title: str | None = "Input gradients (cf. paper Figs. 1 and 4)",
                  pdf: bool = False) -> Path:
    """Write a grid like the paper's Figs. 1 and 4: images (float [0,1] or uint8 NCHW, labels y) in the
    first column, then one column of input gradients per model (name -> network taking [0,1] NCHW),
    each scaled per image (`scale_gradients`); colour for RGB, grey for 1-channel. Returns the PNG path
    (a PDF lies beside it when pdf=True)."""
    fig = gradient_figure(models, x, y, class_names, indices=indices, percentile=percentile,
                          predictions=predictions, title=title)
    return save_figure(fig, path, pdf=pdf)


def check_same_input(runs: list[Path], metas: list[dict], log: Callable[[str], None] | None = None) -> None:
    """All runs of one grid must take the same input shape (and, ideally, the same dataset)."""
    shapes = {tuple(m["data"]["shape"]) for m in metas}
    if len(shapes) > 1:
        listing = ", ".join(f"{r.name}: {'x'.join(map(str, m['data']['shape']))}"
                            for r, m in zip(runs, metas))
        raise IgamError(f"The runs take different input shapes ({listing}); one gradient grid shows the same "
                        "test images to every model. Make one grid per input shape.")
    datasets = {m["data"]["dataset"] for m in metas}
    if len(datasets) > 1 and log is not None:
        log(f"igam: note: the runs were trained on different datasets ({', '.join(sorted(datasets))}); "
            f"using the test images and labels of '{metas[0]['data']['dataset']}'.")


def sample_for_runs(runs: list[str | Path], n: int = 8, seed: int = 0, data_dir: str | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[list[Path], ImageSample]:
    """Resolve runs, check they share an input shape, and draw n test images of the first run's dataset."""
    if not runs:
        raise IgamError("Give at least one run directory.")
    resolved = [run_meta(r) for r in runs]
    dirs, metas = [d for d, _ in resolved], [m for _, m in resolved]
    check_same_input(dirs, metas, log)
    return dirs, load_test_images(dirs[0], n=n, seed=seed, data_dir=data_dir)


def run_gradient_figure(runs: list[str | Path], n: int = 8, seed: int = 0, data_dir: str | None = None,
                        device: str = "cpu", percentile: float = 99.0,
                        log: Callable[[str], None] | None = None):
    """The gradient grid of saved runs as a Figure (n test images of the first run's data, drawn with
    `seed`)."""
    dirs, sample = sample_for_runs(runs, n, seed, data_dir, log)
    models = {label: load_run_model(d, device) for label, d in zip(run_labels(dirs), dirs)}
    title = f"Input gradients (cf. paper Figs. 1, 4)\n{sample.dataset} test images"
    return gradient_figure(models, sample.x, sample.y, sample.class_names, indices=sample.index,
                           percentile=percentile, title=title)


def plot_run_gradients(runs: list[str | Path], out: str | Path | None = None, n: int = 8, seed: int = 0,
                       data_dir: str | None = None, pdf: bool = False, device: str = "cpu",
                       percentile: float = 99.0) -> Path:
    """`igam gradients`: the grid for saved runs, written to `out` (default: RUN/gradients.png for one run,
    ./gradients.png for several)."""
    if out is None:
        out = Path(runs[0]) / "gradients.png" if len(runs) == 1 else Path("gradients.png")
    fig = run_gradient_figure(runs, n, seed, data_dir, device, percentile,
                              log=lambda s: print(s, file=sys.stderr))
    return save_figure(fig, out, pdf=pdf)


__all__ = ["gradient_figure", "gradient_grid", "grid_figsize", "input_gradients", "plot_run_gradients",
           "run_gradient_figure", "scale_gradients"]
