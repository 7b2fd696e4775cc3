"""Divergence never looks like success, and a run folder belongs to one process (issue 13, sections 1-2;
docs/RELIABILITY.md). Tiny synthetic runs: each test takes a few seconds."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SLOWER
from safetensors.torch import load_file, save_file

from igam.cli import main
from igam.config import make_config
from igam.errors import IgamError, NonFiniteOutputs
from igam.evaluate import accuracy, evaluate_run, masking_report, run_attack
from igam.files import read_json
from igam.models import create_model
from igam.objectives import OBJECTIVES, register_objective
from igam.objectives.base import Metrics, Objective
from igam.runs import load_latest_state, read_log
from igam.train import train

TINY = dict(dataset="synthetic:8x8x3:4", model="small-cnn-bn", width=4, train_subset=256, test_subset=64,
            batch_size=32, epochs=2, lr=0.05, progress=False, tensorboard=False, eval_every=1, eval_n=64,
            checkpoint_every=3, log_every=1, keep_checkpoints=3)
CLI = [f"{k}={v}" for k, v in TINY.items()]


def tiny(tmp_path: Path, name: str, **kw: Any):
    return make_config(overrides={**TINY, "out_dir": str(tmp_path), "name": name, **kw})


def quiet(*_: Any, **__: Any) -> None:
    pass


class Interrupted(Exception):
    pass


class Boosted(Objective):
    """Cross-entropy times `boost` from step `boost_from` on: a finite loss and gradient whose SGD update
    explodes the weights at the usual lr. `poison_at`: after that step's update, BatchNorm statistics become
    NaN (finite weights, non-finite outputs). `raise_at`: interrupt the run there."""

    boost, boost_from, poison_at, raise_at = 1.0, 10**9, -1, -1

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             step: int) -> tuple[torch.Tensor, Metrics, None]:
        if step == type(self).raise_at:
            raise Interrupted
        ce = F.cross_entropy(model(x), y)
        scale = type(self).boost if step >= type(self).boost_from else 1.0
        return ce * scale, {"ce": ce.detach()}, None

    def after_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, aux: Any) -> Metrics:
        if step == type(self).poison_at:
            for name, b in model.named_buffers():
                if name.endswith("running_mean"):
                    b.fill_(float("nan"))
        return {}


METHOD = "test-divergence-boosted"
if METHOD not in OBJECTIVES:
    register_objective(METHOD)(lambda cfg, model, spec, device: Boosted())


@pytest.fixture(autouse=True)
def _reset() -> None:
    Boosted.boost, Boosted.boost_from, Boosted.poison_at, Boosted.raise_at = 1.0, 10**9, -1, -1


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# 1. divergence
def test_an_exploding_update_is_rejected_and_the_advised_lower_lr_resume_finishes(tmp_path: Path) -> None:
    """Finite loss, finite gradient (x 1e12 from step 5), an update that explodes the weights: rejected, the
    run stops with the last good checkpoint (step 3) and no model. Following the advice (lower lr, resume)
    finishes."""
    Boosted.boost, Boosted.boost_from = 1e12, 5
    cfg = tiny(tmp_path, "boom", method=METHOD)
    with pytest.raises(IgamError, match=r"Training stopped: the update made the weights "
                                        r"(explode|non-finite).* at step 5 \(update rejected\)\. "
                                        r"The last good state \(step 3\) is checkpointed .*lower lr.*"
                                        r"then resume=true"):
        train(cfg, log=quiet)
    run = tmp_path / "boom"
    assert read_json(run / "meta.json")["status"] == "stopped" and not (run / "model.safetensors").exists()
    state = load_latest_state(run, log=quiet)
    assert state is not None and state["step"] == 3 and finite_state(state["model"])
    messages: list[str] = []
    train(cfg.replace(resume=True, lr=1e-14), log=messages.append)  # the message's advice
    assert any("resumed" in m and "at step 3/16" in m for m in messages)
    meta = read_json(run / "meta.json")
    assert meta["status"] == "finished"
    assert finite_state(load_file(str(run / "model.safetensors")))


def test_lr_1e30_exits_non_zero_keeps_the_earlier_model_and_evaluate_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished run, resumed for more epochs at lr=1e30: exit 2, status stopped, the earlier
    model.safetensors untouched; `igam evaluate` then warns that the weights are an earlier finish's, records
    the status, and prints how many images it really used."""
    out = [f"out_dir={tmp_path}", "name=r"]
    assert main(["train", *CLI, *out, "epochs=1"]) == 0
    weights = (tmp_path / "r" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", *CLI, *out, "epochs=2", "lr=1e30", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "Training stopped: the update made the weights" in err and "at step 8" in err
    assert read_json(tmp_path / "r" / "meta.json")["status"] == "stopped"
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == weights
    assert main(["evaluate", str(tmp_path / "r"), "--n", "5000", "--attacks", "clean"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: run" in captured.err and "status 'stopped'" in captured.err
    assert "1000 test images (all of the test set; --n 5000 asked for more)" in captured.out
    assert "WARNING: r: status stopped" in captured.out
    rec = read_json(tmp_path / "r" / "eval.json")["clean"]
    assert rec["run_status"] == "stopped" and rec["n"] == 1000
    assert main(["train", *CLI, *out, "epochs=2", "resume=true"]) == 0  # lower lr again: finishes
    assert read_json(tmp_path / "r" / "meta.json")["status"] == "finished"


def test_a_model_with_non_finite_outputs_at_the_end_is_stopped_not_finished(tmp_path: Path) -> None:
    Boosted.poison_at = 15  # the last step: BatchNorm statistics become NaN
    with pytest.raises(IgamError, match=r"Training stopped: the model's outputs are non-finite at step 16 \("
                                        r"The model gives non-finite .NaN/Inf. outputs on 64 of 64 images.*"
                                        r"The last good state \(step 15\)"):
        train(tiny(tmp_path, "nanout", method=METHOD), log=quiet)
    assert read_json(tmp_path / "nanout" / "meta.json")["status"] == "stopped"
    assert not (tmp_path / "nanout" / "model.safetensors").exists()
    state = load_latest_state(tmp_path / "nanout", log=quiet)
    assert state is not None and finite_state(state["model"])  # only good states are checkpointed


def test_a_nan_model_is_an_error_in_evaluation_never_an_accuracy(tmp_path: Path) -> None:
    model = create_model("small-cnn", num_classes=4, in_chans=3, input_size=8, width=4).eval()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    x, y = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.arange(8) % 4
    for attack in ("clean", "fgsm", "pgd5"):
        with pytest.raises(NonFiniteOutputs, match="non-finite .NaN/Inf. outputs on 8 of 8 images"):
            run_attack(model, x, y, attack, eps="8/255")
    with pytest.raises(NonFiniteOutputs):
        accuracy(model, x, y)
    with pytest.raises(NonFiniteOutputs):  # not "gradient masking"
        masking_report(model, x, y, eps="8/255", sweeps=False)
    # a run whose weights are NaN: `igam evaluate` names the run, exit 2
    run = train(tiny(tmp_path, "nanrun", epochs=0.25), log=quiet)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in load_file(str(run / "model.safetensors")).items()}
    save_file(nan, str(run / "model.safetensors"))
    with pytest.raises(IgamError, match=rf"Run '{run}' gives non-finite"):
        evaluate_run(run, ["clean", "pgd5"], n=16)


@pytest.mark.parametrize("setting, message", [
    ({"fd_step": 0}, "fd_step=0 is below 1e-06"), ({"fd_step": 1e-9}, "every finite-difference IGAM step"),
    ({"lr": 0}, "lr=0 makes every training step a no-op"), ({"finetune_lr": 0.0}, "finetune_lr=0"),
    ({"pixel_scale": 0}, "pixel_scale=0 divides every input gradient by 0")])
def test_settings_that_make_every_step_a_no_op_are_refused(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(IgamError, match=message):
        make_config(overrides=setting)


# ---------------------------------------------------------------------------------------------
# 2. one process per run folder; records survive a resume
HOLD = """
import sys, time
from igam.runs import Run
lock = Run(sys.argv[1]).lock()
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_folder_is_locked_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for cfg in (tiny(tmp_path, "c"), tiny(tmp_path, "c", resume=True)):
            with pytest.raises(IgamError, match=rf"Run directory '{run}' is in use by pid {holder.pid} "
                                                r"on .* Wait for it to finish \(or stop it\)"):
                train(cfg, log=quiet)
        assert not (run / "meta.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30 * SLOWER)
    messages: list[str] = []
    train(tiny(tmp_path, "c", epochs=0.25), log=messages.append)  # the OS released the dead one's lock
    assert any(f"took over the lock of {run} from pid {holder.pid}" in m for m in messages), messages
    assert (run / ".lock").read_text() == ""  # released cleanly: nothing to take over next time


def test_a_resume_after_the_last_checkpoint_keeps_the_records(tmp_path: Path) -> None:
    """resume=true on a finished run: the train block of metrics.json and the eval log stay as they were
    (the final evaluation's row is replaced, not duplicated)."""
    run = train(tiny(tmp_path, "done"), log=quiet)
    metrics, evals = read_json(run / "metrics.json"), read_log(run, "eval_log.csv")
    assert metrics["train"]
    train(tiny(tmp_path, "done", resume=True), log=quiet)
    assert read_json(run / "metrics.json") == metrics
    assert read_log(run, "eval_log.csv") == evals


def test_the_log_window_resumes_exactly(tmp_path: Path) -> None:
    """log_every=4 with a checkpoint at step 6 and an interrupt at step 7: the row of step 8 after the
    resume averages the same 4 steps as an uninterrupted run (the open window is in the checkpoint)."""
    ref = train(tiny(tmp_path, "ref", method=METHOD, log_every=4), log=quiet)
    Boosted.raise_at = 7
    cfg = tiny(tmp_path, "cut", method=METHOD, log_every=4)
    with pytest.raises(Interrupted):
        train(cfg, log=quiet)
    Boosted.raise_at = -1
    train(cfg.replace(resume=True), log=quiet)
    keys = ("step", "ce", "grad_norm", "skipped_steps")
    assert [{k: r[k] for k in keys} for r in read_log(tmp_path / "cut")] == [
        {k: r[k] for k in keys} for r in read_log(ref)]
    assert read_json(tmp_path / "cut" / "metrics.json")["final"] == read_json(ref / "metrics.json")["final"]


@pytest.mark.parametrize("entry", ["checkpoints", "log.csv", "tb"])
def test_a_symlink_in_a_run_folder_is_refused(tmp_path: Path, entry: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ckpt-000000001.pt").write_bytes(b"not ours")
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    (run / entry).symlink_to(outside if entry != "log.csv" else outside / "ckpt-000000001.pt")
    for cfg in (tiny(tmp_path / "runs", "s"), tiny(tmp_path / "runs", "s", resume=True)):
        with pytest.raises(IgamError, match=rf"'{run / entry}' is a symbolic link .*never through links"):
            train(cfg, log=quiet)
    assert sorted(p.name for p in outside.iterdir()) == ["ckpt-000000001.pt"]
    assert (outside / "ckpt-000000001.pt").read_bytes() == b"not ours"


def test_weights_files_have_the_permissions_of_the_other_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        run = train(tiny(tmp_path, "perm", epochs=0.25), log=quiet)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((run / "meta.json").stat().st_mode)
    assert mode == 0o644
    assert stat.S_IMODE((run / "model.safetensors").stat().st_mode) == mode
