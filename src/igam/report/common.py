"""Shared pieces of the pictures: a headless matplotlib, run labels, test images, figure saving.

Figures are built with `matplotlib.figure.Figure` (no pyplot state), so nothing needs a display and no
figure outlives its function.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless by default; leave an interactive session's choice alone
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from igam.data import load_data  # noqa: E402
from igam.errors import IgamError  # noqa: E402
from igam.files import refuse_link, write_figure  # noqa: E402
from igam.runs import Run, resolve_run  # noqa: E402

DPI = 150


def save_figure(fig: Figure, path: str | Path, pdf: bool = False, dpi: int = DPI) -> Path:
    """Write `fig` as PNG at `path`, plus a PDF beside it on request (or when `path` ends in .pdf).
    The figure keeps its size: the PNG is exactly figsize * dpi pixels. Written with files.safe_write
    (beside, then renamed; a symbolic link at either path is refused)."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        path, pdf = path.with_suffix(".png"), True
    elif path.suffix.lower() != ".png":
        raise IgamError(f"Output '{path}' should end in .png (add --pdf for a PDF beside it).")
    if pdf:  # both refused before either is written when one of them is a link
        refuse_link(path.with_suffix(".pdf"))
    write_figure(fig, path, dpi=dpi, format="png", facecolor="white")
    if pdf:
        write_figure(fig, path.with_suffix(".pdf"), format="pdf", facecolor="white")
    return path


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for embedding in HTML)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png", facecolor="white")
    return buf.getvalue()


def run_labels(runs: list[Path]) -> list[str]:
    """Short names for runs: the directory name, or parent/name where two names clash."""
    names = [Path(r).name for r in runs]
    return [f"{Path(r).parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def class_colors(num_classes: int) -> np.ndarray:
    """One RGBA colour per class: tab10 / tab20 for up to 20 classes, evenly spaced hues beyond."""
    import matplotlib as mpl

    if num_classes <= 10:
        return mpl.colormaps["tab10"](np.arange(num_classes))
    if num_classes <= 20:
        return mpl.colormaps["tab20"](np.arange(num_classes))
    return mpl.colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))


def default_eps_max(shape: tuple[int, ...] | list[int]) -> float:
    """Twice the dataset's usual L-inf radius: 2 x 0.3 for 1-channel 28x28 (MNIST-like), else 2 x 8/255."""
    c, h, w = (int(v) for v in shape)
    return 0.6 if (c, h, w) == (1, 28, 28) else 16 / 255


@dataclass
class ImageSample:
    """Test images of a run's dataset: x float [0,1] NCHW, labels, their test-set indices, class names."""

    x: torch.Tensor
    y: torch.Tensor
    index: list[int]
    class_names: list[str]
    dataset: str


def run_meta(run: str | Path) -> tuple[Path, dict]:
    run_dir = resolve_run(run)
    return run_dir, Run(run_dir).meta


MAX_FIGURE_IMAGES = 64  # rows of a gradient grid


def load_test_images(run: str | Path, *, n: int | None = None, indices: list[int] | None = None,
                     seed: int = 0, data_dir: str | None = None) -> ImageSample:
    """n test images of a run's dataset drawn at random with `seed` (or the given test-set indices).

    Raises:
        IgamError: for n below 1 or above MAX_FIGURE_IMAGES (before the data are read), or an index outside
            the test set.
    """
    if indices is None and n is not None and n > MAX_FIGURE_IMAGES:
        raise IgamError(f"Asked for n={n} test images; a gradient grid shows one image per row, and more "
                        f"than {MAX_FIGURE_IMAGES} rows cannot be read (nor drawn in reasonable time and "
                        f"memory). Give --n {MAX_FIGURE_IMAGES} or fewer.")
    run_dir, meta = run_meta(run)
    dataset = meta["data"]["dataset"]
    arrays = load_data(dataset, data_dir or Run(run_dir).data_dir, False, 0, 0)
    total = len(arrays.x_test)
    if indices is None:
        if n is None or n < 1:
            raise IgamError(f"Asked for n={n} test images; give at least 1.")

        g = torch.Generator().manual_seed(int(seed))
        indices = torch.randperm(total, generator=g)[: min(n, total)].tolist()
    for i in indices:
        if not 0 <= int(i) < total:
            raise IgamError(f"Test image index {i} is out of range: '{dataset}' has {total} test images "
                            f"(indices 0-{total - 1}).")
    idx = torch.tensor([int(i) for i in indices], dtype=torch.long)
    names = list(meta["data"].get("class_names") or arrays.class_names)
    return ImageSample(arrays.x_test[idx].float().div(255), arrays.y_test[idx].long(), idx.tolist(), names,
                       dataset)


def image_hwc(x: torch.Tensor) -> np.ndarray:
    """One CHW image in [0,1] as HWC (RGB) or HW (grey) for imshow."""
    a = x.detach().float().cpu().clamp(0, 1).numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
