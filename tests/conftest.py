"""Shared test set-up.

- One torch thread per process: the suite runs as `pytest -n 2` (pytest-xdist) on a 2-core machine, so each
  worker (and each `python -m igam` subprocess a test starts) gets one thread.
- `SLOWER`: the factor every timeout allows for a busy machine.
- `real_data_dir`: the folder with the real mnist.npz ($IGAM_DATA, else ../shared/data beside the repo);
  tests that need it skip with the reason when it is absent. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The suite passes on a machine this many times slower than a quiet 2-core one (a shared machine under
# load): a subprocess's timeout is its quiet-machine bound times SLOWER, and the Makefile's --timeout is
# about SLOWER times the slowest test's quiet time (every test is under 3 minutes on a quiet machine).
SLOWER = 3


def real_data_root(required: str = "mnist.npz") -> Path | None:
    """The first of $IGAM_DATA and ../shared/data (relative to the repo) that holds `required`."""
    candidates = [os.environ.get("IGAM_DATA"), str(REPO.parent / "shared" / "data")]
    for cand in candidates:
        if cand and (Path(cand) / required).is_file():
            return Path(cand)
    return None


def _skip_reason(required: str) -> str:
    return (f"real data absent: no {required} in $IGAM_DATA ({os.environ.get('IGAM_DATA') or 'unset'}) or in "
            f"{REPO.parent / 'shared' / 'data'}")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder holding the real mnist.npz; the test is skipped (with the reason) when there is none."""
    root = real_data_root("mnist.npz")
    if root is None:
        pytest.skip(_skip_reason("mnist.npz"))
    return root


@pytest.fixture(scope="session")
def real_cifar_dir() -> Path:
    """Folder holding the real cifar10.npz; skipped (with the reason) when there is none."""
    root = real_data_root("cifar10.npz")
    if root is None:
        pytest.skip(_skip_reason("cifar10.npz"))
    return root


# one tiny real run (synthetic 16x16 grey images, 4 classes, width-4 small-cnn, 2 steps): made once per test
# process by `tiny_run`; tests that change or damage it work on a copy (`copy_run`)
TINY_RUN = {"dataset": "synthetic:16x16x1:4", "model": "small-cnn", "width": "4", "train_subset": "64",
            "test_subset": "32", "batch_size": "32", "epochs": "1", "progress": "false",
            "tensorboard": "false", "eval_n": "32", "threads": "1"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of `TINY_RUN` (seconds); do not change it: copy it with `copy_run`."""
    from igam.config import make_config
    from igam.train import train

    out = tmp_path_factory.mktemp("tiny")
    cfg = make_config(overrides={**TINY_RUN, "out_dir": str(out), "name": "tiny"})
    return train(cfg, log=lambda *a: None)


def copy_run(run: Path, where: Path, name: str = "r") -> Path:
    """A copy of run folder `run` at where/name."""
    import shutil

    dst = Path(where) / name
    shutil.copytree(run, dst)
    return dst
