"""Issue 24, class 5: a run that drifts slowly to nonsense, or never trains, does not end `finished`.

The update guard (GROWTH_LIMIT, one step) missed drifts of many small steps: `momentum=1.9 lr=0.5` ended
`finished` with a training loss of 1e8. The drift rules compare the weights' norm and the training loss
with the run's own early values; a run whose weights never moved is stopped too; each stop names its rule
in the error and in meta.json (docs/RELIABILITY.md, section 3). Tiny synthetic runs, seconds each."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from igam.config import Config, make_config
from igam.errors import IgamError
from igam.files import read_json
from igam.guard import GROWTH_LIMIT, StateGuard
from igam.objectives import OBJECTIVES, register_objective
from igam.objectives.base import Objective
from igam.runs import load_latest_state
from igam.train import train

TINY = dict(dataset="synthetic:16x16x3:4", model="small-cnn", train_subset=64, test_subset=64, batch_size=32,
            epochs=8, progress=False, tensorboard=False, eval_n=64, threads=1)


def quiet(*_: Any, **__: Any) -> None:
    pass


def unchecked(tmp_path: Path, name: str, **kw: Any) -> Config:
    """A Config built without validation: the settings the range table now refuses (momentum 1.9) still
    reach the training loop through the Python API, so the loop's own guard must hold."""
    return dataclasses.replace(make_config(overrides={**TINY, "out_dir": str(tmp_path), "name": name}), **kw)


class Interruptible(Objective):
    """Plain cross-entropy (the base Objective), interrupted at step `raise_at`."""

    raise_at = -1

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
        if step == type(self).raise_at:
            raise KeyboardInterrupt
        return super().loss(model, x, y, step)


METHOD = "test-slow-divergence"
if METHOD not in OBJECTIVES:
    register_objective(METHOD)(lambda cfg, model, spec, device: Interruptible())


def test_momentum_beyond_1_is_refused_by_the_config() -> None:
    with pytest.raises(IgamError, match=r"momentum=1.9 must be below 1: SGD momentum .* Choose a value in "
                                        r"\[0, 1\)"):
        make_config(overrides={"momentum": 1.9, "lr": 0.5, "epochs": 8})


def test_a_slow_drift_that_used_to_finish_is_stopped_and_names_its_rule(tmp_path: Path) -> None:
    """momentum=1.9 lr=0.5 (grad_clip=1 keeps every single step below the 100x explosion limit): the loss
    grows by orders of magnitude over a few steps. Before the drift rules this ended `finished`."""
    cfg = unchecked(tmp_path, "drift", momentum=1.9, lr=0.5, grad_clip=1.0)
    with pytest.raises(IgamError, match=r"Training stopped: the training loss drifted: .* more than 1000x .* "
                                        r"\(Guard rule: loss-drift"):
        train(cfg, log=quiet)
    meta = read_json(tmp_path / "drift" / "meta.json")
    assert meta["status"] == "stopped" and meta["stop_rule"] == "loss-drift" and "drifted" in meta["stopped"]
    assert not (tmp_path / "drift" / "model.safetensors").exists()
    state = load_latest_state(tmp_path / "drift", log=quiet)  # the kept checkpoint is from before the drift
    if state is not None:
        assert state["guard"]["loss_count"] >= 0 and state["step"] < 16


def test_the_drift_decision_survives_an_interruption_exactly(tmp_path: Path) -> None:
    """The guard's early values and open loss window are in every checkpoint: a run interrupted before the
    drift fires and resumed stops at the same step with the same numbers as the uninterrupted one (a
    log window that spans the interruption, log_every=1000)."""
    kw = dict(method=METHOD, momentum=1.9, lr=0.5, grad_clip=1.0, log_every=1000, checkpoint_every=1)
    with pytest.raises(IgamError) as whole:
        train(unchecked(tmp_path, "whole", **kw), log=quiet)
    Interruptible.raise_at = 4
    try:
        with pytest.raises(KeyboardInterrupt):
            train(unchecked(tmp_path, "cut", **kw), log=quiet)
    finally:
        Interruptible.raise_at = -1
    assert load_latest_state(tmp_path / "cut", log=quiet)["step"] == 4
    with pytest.raises(IgamError) as resumed:
        train(unchecked(tmp_path, "cut", resume=True, **kw), log=quiet)
    assert "drifted" in str(whole.value)
    assert str(resumed.value).replace("/cut", "/whole") == str(whole.value)


def test_the_weight_drift_rule_catches_growth_no_single_step_would() -> None:
    """2x per step never trips the 100x one-step limit; 11 doublings pass 1000x the start."""
    from igam.guard import DRIFT_LIMIT, RULES

    net = nn.Linear(8, 8)
    guard = StateGuard(net)
    fired, doublings = None, 0
    while fired is None and doublings < 20:
        with torch.no_grad():
            net.weight.mul_(2.0)
            net.bias.mul_(2.0)
        doublings += 1
        fired = guard.after_update()
    assert GROWTH_LIMIT > 2.0 and fired is not None and fired.rule == "weight-drift", fired
    assert 2**doublings > DRIFT_LIMIT and 2 ** (doublings - 1) <= DRIFT_LIMIT * 1.5
    assert "the run's start" in fired.message
    assert set(RULES) >= {"weight-drift", "loss-drift", "never-moved", "explosion"}


def test_a_tiny_grad_clip_is_refused_and_a_run_whose_weights_never_move_is_stopped(tmp_path: Path) -> None:
    """grad_clip=1e-30 ended `finished` without training; a learning rate too small to move any float32
    weight did too."""
    with pytest.raises(IgamError, match="grad_clip=1e-30 must be at least 0.001"):
        make_config(overrides={"grad_clip": 1e-30})
    cfg = make_config(overrides={**TINY, "epochs": 1, "lr": 1e-12, "out_dir": str(tmp_path), "name": "still"})
    with pytest.raises(IgamError, match=r"never changed in 2 applied updates .*never-moved"):
        train(cfg, log=quiet)
    meta = read_json(tmp_path / "still" / "meta.json")
    assert meta["status"] == "stopped" and meta["stop_rule"] == "never-moved"
    assert not (tmp_path / "still" / "model.safetensors").exists()


def test_a_healthy_run_passes_every_rule(tmp_path: Path) -> None:
    cfg = make_config(overrides={**TINY, "lr": 0.05, "out_dir": str(tmp_path), "name": "ok"})
    train(cfg, log=quiet)
    assert read_json(tmp_path / "ok" / "meta.json")["status"] == "finished"
