"""`igam demo`: the main job. (Foundation version: standard training of a small model.)"""

from __future__ import annotations

from pathlib import Path

from igam.config import make_config
from igam.data import default_data_dir
from igam.train import train


def demo(out_dir: str = "runs/demo", data_dir: str | None = None, quick: bool = False) -> Path:
    root = Path(data_dir) if data_dir else default_data_dir()
    real = (root / "mnist.npz").exists()
    dataset = "mnist" if real else "synthetic:28x28x1:10"
    print(f"igam demo: using {'real MNIST from ' + str(root) if real else 'the synthetic task (no MNIST found)'}")
    cfg = make_config(overrides=dict(dataset=dataset, data_dir=str(root), model="madry-mnist", out_dir=out_dir,
                                     epochs=0.2 if quick else 1, train_subset=2000 if quick else 0,
                                     test_subset=500 if quick else 0, lr=0.01, name="standard-mnist",
                                     progress=not quick))
    return train(cfg)
