"""`igam demo`: the main job. A complete, real transfer end to end (robust teacher -> fine-tuned teacher ->
IGAM student and a standard student -> evaluation -> results table and report), in minutes on a CPU.

It uses MNIST and CIFAR-10 from the data root when present (as mnist.npz / cifar10.npz or torchvision's
layout), downloads them when download is possible, and otherwise runs the synthetic task, saying which.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from igam.data import default_data_dir, load_arrays
from igam.errors import IgamError
from igam.experiment import run_experiment


def _find_data(root: Path) -> str:
    """'real' when MNIST and CIFAR-10 load from root (downloaded if the network allows), else 'synthetic'."""
    try:
        for name in ("mnist", "cifar10"):
            load_arrays(name, root, download=True)
        return "real"
    except IgamError:
        return "synthetic"


def demo(out_dir: str = "runs/demo", data_dir: str | None = None, quick: bool = False, log=print) -> Path:
    root = Path(data_dir) if data_dir else default_data_dir()
    kind = "quick" if quick else _find_data(root)
    if kind == "real":
        log(f"igam demo: real MNIST and CIFAR-10 from {root}")
    elif kind == "synthetic":
        log(
            f"igam demo: MNIST/CIFAR-10 not found in {root} and not downloadable; using the synthetic task "
            "(put mnist.npz and cifar10.npz there, or pass --data-dir, for the real transfer)"
        )
    os.environ.setdefault("IGAM_DATA", str(root))
    spec = resources.files("igam.demo_configs") / f"demo-{kind}.yaml"
    with resources.as_file(spec) as path:
        exp_dir = run_experiment(
            path, out_dir=out_dir, overrides={"data_dir": str(root)} if kind == "real" else None, log=log
        )
    log("")
    log((exp_dir / "results.md").read_text())
    report = exp_dir / "report.html"
    log(
        f"igam demo: runs in {exp_dir}/, table in {exp_dir / 'results.md'}"
        + (f", report in {report}" if report.exists() else "")
    )
    return exp_dir
