"""Loss landscapes and decision regions around one test image, as in the paper's Fig. 7 (supplementary):
the cross-entropy and the predicted class on the plane x + e1 * sign(grad_x CE) + e2 * r, where r is a
random Rademacher (+-1) direction, over [-eps_max, eps_max]^2. Smooth, low surfaces and a wide true-class
region mean robustness; standard models show a steep rise and a nearby boundary along e1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.errors import IgamError
from igam.report.common import (
    class_colors,
    default_eps_max,
    load_test_images,
    run_labels,
    run_meta,
    save_figure,
)
from igam.report.gradients import check_same_input
from igam.runs import load_run_model
from igam.units import check_eps
from igam.utils import bn_mode


@dataclass
class Landscape:
    """Loss and predicted class on a grid: loss[i, j] at e2 = eps[i] (random), e1 = eps[j] (adversarial)."""

    eps: np.ndarray
    loss: np.ndarray
    pred: np.ndarray
    label: int
    num_classes: int


MAX_GRID = 401  # points per axis of a landscape grid


def check_grid(n: int) -> None:
    """Refuse a grid of fewer than 2 or more than MAX_GRID points per axis, before anything is allocated."""
    if not 2 <= n <= MAX_GRID:
        raise IgamError(f"The landscape grid needs 2 to {MAX_GRID} points per axis; got {n}. (A {MAX_GRID} x "
                        f"{MAX_GRID} grid is {MAX_GRID ** 2:,} forward passes, finer than the figure shows; "
                        f"--grid {min(max(n, 2), MAX_GRID)} fits.)")


def loss_landscape(model: nn.Module, x: torch.Tensor, y: int, eps_max: float, n: int = 21, seed: int = 0,
                   clamp: bool = True, batch_size: int = 256) -> Landscape:
    """Evaluate `model` (eval mode) on an n x n grid around one image x (CHW or 1CHW, [0,1]) with true
    label y, spanned by the gradient-sign direction and a Rademacher direction drawn with `seed`.
    With clamp=True every grid point is clipped to the valid image range [0, 1]."""
    check_grid(n)
    if not eps_max > 0:
        raise IgamError(f"eps_max={eps_max} must be positive.")
    x = x.detach().float().reshape(1, *x.shape[-3:])
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = x.to(device)
    target = torch.tensor([int(y)], device=device)
    with bn_mode(model, "eval"):
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xg)
            (g,) = torch.autograd.grad(F.cross_entropy(logits.float(), target), xg)
        num_classes = logits.shape[1]
        if int(y) >= num_classes:
            raise IgamError(f"Label {y} is outside the model's {num_classes} classes.")
        d_adv = g.sign()
        gen = torch.Generator().manual_seed(int(seed))
        d_rand = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).float().to(device)
        eps = np.linspace(-eps_max, eps_max, n)
        e = torch.tensor(eps, dtype=torch.float32, device=device)
        e2, e1 = torch.meshgrid(e, e, indexing="ij")  # rows: random direction, columns: adversarial
        coeff = torch.stack([e1.flatten(), e2.flatten()], 1)
        losses, preds = [], []
        with torch.no_grad():
            for i in range(0, len(coeff), batch_size):
                c = coeff[i:i + batch_size]
                xb = x + c[:, 0, None, None, None] * d_adv + c[:, 1, None, None, None] * d_rand
                if clamp:
                    xb = xb.clamp(0, 1)
                out = model(xb).float()
                losses.append(F.cross_entropy(out, target.expand(len(xb)), reduction="none").cpu())
                preds.append(out.argmax(1).cpu())
    return Landscape(eps, torch.cat(losses).view(n, n).numpy(), torch.cat(preds).view(n, n).numpy(), int(y),
                     int(num_classes))


def _decision_panel(ax, land: Landscape, class_names: list[str], legend: bool = True) -> None:
    colors = class_colors(max(land.num_classes, 1))
    rgb = colors[land.pred][..., :3]
    e = float(land.eps[-1])
    ax.imshow(rgb, origin="lower", extent=(-e, e, -e, e), interpolation="nearest", aspect="auto")
    true_region = (land.pred == land.label).astype(float)
    if true_region.any():  # hatch the true class's region, outline its border
        import matplotlib as mpl

        with mpl.rc_context({"hatch.color": (1, 1, 1, 0.6), "hatch.linewidth": 0.8}):
            ax.contourf(land.eps, land.eps, true_region, levels=[0.5, 1.5], colors="none", hatches=["//"])
    if 0 < true_region.sum() < true_region.size:
        ax.contour(land.eps, land.eps, true_region, levels=[0.5], colors="black", linewidths=1.8)
    ax.plot([0], [0], marker="*", markersize=13, color="white", markeredgecolor="black", linestyle="none")
    ax.axhline(0, color="white", lw=0.6, alpha=0.7)
    ax.axvline(0, color="white", lw=0.6, alpha=0.7)
    ax.set_xlabel(r"$\epsilon_1$: adversarial direction sign($\nabla_x$CE)")
    ax.set_ylabel(r"$\epsilon_2$: random direction ($\pm$1)")
    ax.set_title("Decision regions", fontsize=10)
    if legend:
        from matplotlib.patches import Patch

        present = [int(c) for c in np.unique(land.pred)]
        order = [land.label] + [c for c in present if c != land.label]
        handles = []
        for c in order[:12]:
            name = class_names[c] if c < len(class_names) else str(c)
            true = c == land.label
            handles.append(Patch(facecolor=colors[c], edgecolor="black" if true else "none", linewidth=1.5,
                                 hatch="//" if true else None, label=f"{name} (true)" if true else name))
        if len(order) > 12:
            handles.append(Patch(facecolor="white", label=f"... {len(order) - 12} more"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  title="predicted class", title_fontsize=8)


def _surface_panel(ax, land: Landscape) -> None:
    e1, e2 = np.meshgrid(land.eps, land.eps)
    ax.plot_surface(e1, e2, land.loss, cmap="viridis", linewidth=0.2, edgecolor=(0, 0, 0, 0.15),
                    antialiased=True, rstride=1, cstride=1)
    ax.set_xlabel(r"$\epsilon_1$ (adversarial)", labelpad=6)
    ax.set_ylabel(r"$\epsilon_2$ (random)", labelpad=6)
    ax.set_zlabel("cross-entropy", labelpad=6)
    ax.set_title(f"Loss surface (max {land.loss.max():.3g})", fontsize=10)
    ax.view_init(elev=28, azim=-128)
    ax.tick_params(labelsize=7)


FOOTNOTE = (r"$\bigstar$ clean test image.  $\epsilon_1$: along sign($\nabla_x$CE) (the FGSM direction); "
            r"$\epsilon_2$: along a random $\pm$1 direction; points clipped to [0, 1]; eval-mode model.  "
            "Hatched, black border: the true class's region.")


def landscape_figure(results: list[tuple[str, Landscape]], class_names: list[str], title: str = "",
                     subtitle: str = ""):
    """One run: loss surface and decision map side by side. Several runs: one column each (as Fig. 7),
    decision maps on top, loss surfaces below."""
    from matplotlib.figure import Figure

    if not results:
        raise IgamError("Nothing to plot: give at least one run.")
    k = len(results)
    if k == 1:
        W, H = 12.0, 5.6
        fig = Figure(figsize=(W, H))
        ax3 = fig.add_axes((0.0, 0.07, 0.46, 0.76), projection="3d")
        ax2 = fig.add_axes((0.54, 0.16, 0.28, 0.64))
        _surface_panel(ax3, results[0][1])
        _decision_panel(ax2, results[0][1], class_names)
    else:
        col, left, right = 5.6, 0.9, 0.3  # each column: a 3.3 in decision map and its own legend beside it
        W, H = left + col * k + right, 10.0
        fig = Figure(figsize=(W, H))
        for j, (name, land) in enumerate(results):
            ax2 = fig.add_axes(((left + j * col) / W, 0.55, 3.3 / W, 0.31))
            _decision_panel(ax2, land, class_names)  # every panel its legend: their classes differ
            ax2.set_title(name, fontsize=10, weight="bold")
            if j:
                ax2.set_ylabel("")
            ax3 = fig.add_axes(((left - 0.15 + j * col) / W, 0.05, (col - 1.6) / W, 0.42), projection="3d")
            _surface_panel(ax3, land)
    if title:
        fig.text(0.5, 1 - 0.1 / H, title, ha="center", va="top", fontsize=12, weight="bold")
    if subtitle:
        fig.text(0.5, 1 - 0.42 / H, subtitle, ha="center", va="top", fontsize=9.5)
    fig.text(0.5, 0.08 / H, FOOTNOTE, ha="center", va="bottom", fontsize=7.5, color="#444444")
    return fig


def run_landscapes(runs: list[str | Path], index: int, eps: float | str | None = None, n: int = 21,
                   seed: int = 0, data_dir: str | None = None, device: str = "cpu"):
    """Landscapes of saved runs around test image `index` of the first run's dataset, and the figure."""
    if not runs:
        raise IgamError("Give at least one run directory.")
    check_grid(n)
    resolved = [run_meta(r) for r in runs]
    dirs, metas = [d for d, _ in resolved], [m for _, m in resolved]
    check_same_input(dirs, metas, log=lambda s: print(s, file=sys.stderr))
    shape = metas[0]["data"]["shape"]
    eps_max = default_eps_max(shape) if eps in (None, "") else check_eps(eps, "eps")
    if eps_max <= 0:
        raise IgamError("--eps must be positive: it is the half-width of the plotted square.")
    sample = load_test_images(dirs[0], indices=[int(index)], data_dir=data_dir)
    label = int(sample.y[0])
    results = []
    for name, d in zip(run_labels(dirs), dirs):
        model = load_run_model(d, device)
        results.append((name, loss_landscape(model, sample.x[0], label, eps_max, n, seed)))
    cname = sample.class_names[label] if label < len(sample.class_names) else str(label)
    title = "Loss landscape and decision regions (cf. paper Fig. 7)"
    subtitle = (f"{sample.dataset} test image #{index}, true class: {cname}; "
                f"eps_max = {eps_max:.4g}, {n} x {n} grid, random direction seed {seed}")
    return results, landscape_figure(results, sample.class_names, title, subtitle)


def plot_run_landscape(runs: list[str | Path], index: int, eps: float | str | None = None, n: int = 21,
                       out: str | Path | None = None, pdf: bool = False, seed: int = 0,
                       data_dir: str | None = None, device: str = "cpu",
                       log: Callable[[str], None] | None = None) -> Path:
    """`igam landscape`: write the figure (default RUN/landscape-INDEX.png, ./landscape-INDEX.png for
    several runs)."""
    if out is None:
        out = (Path(runs[0]) if len(runs) == 1 else Path(".")) / f"landscape-{index}.png"
    _, fig = run_landscapes(runs, index, eps, n, seed, data_dir, device)
    return save_figure(fig, out, pdf=pdf)
