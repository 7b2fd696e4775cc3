"""Evaluation of runs: accuracy under named attacks, written to RUN/eval.json.

This version knows `clean`; attack presets (fgsm, pgdK, autoattack, square) come from igam.attacks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from igam.data import load_data
from igam.errors import unknown
from igam.runs import read_json, resolve_run, write_json


def evaluate_attack(model: nn.Module, x, y, attack: str, spec=None, batch_size: int = 500, seed: int = 0,
                    bn: str = "eval") -> float:
    """Accuracy in [0, 1] of `model` on uint8 images x under a named attack."""
    from igam.train import accuracy

    if attack == "clean":
        return accuracy(model, x, y, batch_size, bn)
    raise unknown("attack", attack, ["clean"])


def evaluate_run(run: str | Path, attacks: list[str], n: int = 10000, batch_size: int = 500, seed: int = 0,
                 bn: str = "eval", data_dir: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Evaluate a run on the first n test images of its dataset; results merge into RUN/eval.json."""
    from igam.train import load_run_model

    run_dir = resolve_run(run)
    meta = read_json(run_dir / "meta.json")
    arrays = load_data(meta["data"]["dataset"], data_dir or data_dir_of(run_dir), False, 0, n)
    model = load_run_model(run_dir, device)
    results: dict[str, Any] = {}
    for name in attacks:
        t0 = time.time()
        acc = evaluate_attack(model, arrays.x_test, arrays.y_test, name, None, batch_size, seed, bn)
        results[name] = {"accuracy": acc, "n": len(arrays.x_test), "seed": seed, "bn": bn,
                         "time_s": round(time.time() - t0, 2)}
    path = run_dir / "eval.json"
    merged = read_json(path) if path.exists() else {}
    merged.update(results)
    write_json(path, merged)
    return results


def data_dir_of(run_dir: Path) -> str | None:
    """The data root a run was trained from (its config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.exists() else {}
    return (cfg or {}).get("data_dir") or None
