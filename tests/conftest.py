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
