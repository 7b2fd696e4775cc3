"""RobustBench's model zoo (robustbench.github.io) as teachers: `robustbench:DATASET/THREAT/NAME`, e.g.
`robustbench:cifar10/Linf/Carmon2019Unlabeled`.

The architecture comes from the `robustbench` package (an optional extra: `pip install 'igam[robustbench]'`);
its weights from DIR/DATASET/THREAT/NAME.pt, RobustBench's own cache layout (`teacher_dir`, default
DATA_ROOT/robustbench), read with weights_only=True (no code runs; RobustBench itself would unpickle
with torch's default). Its input normalisation stays inside the network, as RobustBench defines it: the
network takes [0, 1] pixels. Nothing is downloaded here: a missing file is an error that says where to
put it (RobustBench's `load_model(..., model_dir=DIR)` downloads into that layout when online).

robustbench 1.1.1 does not import as published beside current packages; the two work-arounds live here
and nowhere else: it imports the module `autoattack` (installed as `pyautoattack`), and `pkg_resources`
(removed in setuptools 81, hence the extra pins setuptools<81).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from igam.errors import IgamError, suggest

SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "imagenet": (3, 224, 224)}
CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
THREATS = ("Linf", "L2", "corruptions")
INSTALL = "RobustBench teachers need the robustbench package: pip install 'igam[robustbench]'."


def parse_name(name: str) -> tuple[str, str, str]:
    """'robustbench:cifar10/Linf/NAME' -> ('cifar10', 'Linf', 'NAME').

    Raises:
        IgamError: for anything that is not DATASET/THREAT/NAME with a known dataset and threat model.
    """
    body = name.partition(":")[2]
    parts = body.split("/")
    if len(parts) != 3 or not all(parts):
        raise IgamError(f"'{name}': write robustbench:DATASET/THREAT/NAME, e.g. "
                        "robustbench:cifar10/Linf/Carmon2019Unlabeled.")
    dataset, threat, model = parts
    if dataset not in SHAPES:
        raise IgamError(f"'{name}': RobustBench dataset '{dataset}' is not one of {', '.join(SHAPES)}."
                        f"{suggest(dataset, SHAPES)}")
    if threat not in THREATS:
        raise IgamError(f"'{name}': RobustBench threat model '{threat}' is not one of {', '.join(THREATS)}."
                        f"{suggest(threat, THREATS)}")
    return dataset, threat, model


def _zoo() -> Any:
    """robustbench's table of models, imported with the two work-arounds (module docstring)."""
    try:
        import pyautoattack
    except ImportError:
        raise IgamError(INSTALL) from None
    sys.modules.setdefault("autoattack", pyautoattack)
    try:
        import warnings

        with warnings.catch_warnings():  # its pkg_resources import warns on every use
            warnings.simplefilter("ignore")
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as e:
        raise IgamError(f"{INSTALL} ({type(e).__name__}: {e})") from None
    return model_dicts, BenchmarkDataset, ThreatModel


def available() -> bool:
    """Whether the robustbench package imports here (with the work-arounds)."""
    try:
        _zoo()
    except IgamError:
        return False
    return True


def list_robustbench(dataset: str = "cifar10", threat: str = "Linf") -> list[str]:
    """The names RobustBench lists for a dataset and threat model (empty when robustbench is missing)."""
    try:
        zoo, Dataset, Threat = _zoo()
    except IgamError:
        return []
    return sorted(zoo[Dataset(dataset)][Threat(threat)])


def build_network(name: str) -> nn.Module:
    """The architecture of `robustbench:DATASET/THREAT/NAME`, randomly initialised (no weights read).

    Raises:
        IgamError: robustbench missing, or no such model in its zoo.
    """
    dataset, threat, model = parse_name(name)
    zoo, Dataset, Threat = _zoo()
    entries = zoo[Dataset(dataset)][Threat(threat)]
    if model not in entries:
        raise IgamError(f"RobustBench lists no {dataset}/{threat} model '{model}'.{suggest(model, entries)}")
    return entries[model]["model"]()


def weights_path(name: str, teacher_dir: str | Path) -> Path:
    """Where RobustBench keeps the weights of `name` under teacher_dir: DIR/DATASET/THREAT/NAME.pt."""
    dataset, threat, model = parse_name(name)
    return Path(teacher_dir) / dataset / threat / f"{model}.pt"


def download(name: str, teacher_dir: str | Path) -> Path:
    """Fetch the weights of `robustbench:DATASET/THREAT/NAME` into teacher_dir in RobustBench's layout,
    through RobustBench's own loader (needs internet; igam never downloads at training time). Returns the
    file's path.

    Raises:
        IgamError: robustbench missing, an unknown model, or the download failing.
    """
    dataset, threat, model = parse_name(name)
    _zoo()  # the work-arounds, before robustbench.utils imports what they cover
    from robustbench.utils import load_model

    try:
        load_model(model, model_dir=str(teacher_dir), dataset=dataset, threat_model=threat)
    except Exception as e:  # network, Google Drive quota, a renamed model ...
        raise IgamError(f"RobustBench could not fetch {name} ({type(e).__name__}: {e}).") from None
    return weights_path(name, teacher_dir)
