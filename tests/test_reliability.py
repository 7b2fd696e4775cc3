"""Crash-proof training: runs killed with SIGKILL (in `python -m igam train` subprocesses) and resumed with
resume=true end with exactly the weights of an uninterrupted run. Kill points are set deterministically with
IGAM_TEST_KILL_AT=POINT:N (igam.runs.kill_point; docs/RELIABILITY.md); one test kills at a random moment."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SLOWER
from safetensors.torch import load_file

from igam.cli import main
from igam.config import make_config
from igam.files import read_json
from igam.runs import read_log
from igam.train import train

ARGS = ["dataset=synthetic:8x8x3:4", "model=small-cnn-bn", "width=4", "train_subset=256", "test_subset=64",
        "batch_size=32", "epochs=2", "lr=0.05", "progress=false", "tensorboard=false", "eval_every=1",
        "eval_n=64", "checkpoint_every=3", "log_every=1", "augment=crop-flip", "noise=4/255", "threads=1",
        "keep_checkpoints=3"]
KILLED = -signal.SIGKILL


def igam_train(out: Path, name: str, *extra: str, kill_at: str | None = None,
               args: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IGAM_TEST_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kill_at:
        env["IGAM_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "igam", "train", *(ARGS if args is None else args), f"out_dir={out}",
           f"name={name}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300 * SLOWER)


def same_weights(a: Path, b: Path, file: str = "model.safetensors") -> list[str]:
    """Names of the tensors that differ between two runs' weight files (empty: bit-identical)."""
    wa, wb = load_file(str(a / file)), load_file(str(b / file))
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every crash test is compared with."""
    out = tmp_path_factory.mktemp("ref")
    r = igam_train(out, "ref")
    assert r.returncode == 0, r.stderr
    return out / "ref"


def test_killed_again_and_again_then_resumed_is_bit_identical(tmp_path: Path, reference: Path) -> None:
    """One run, SIGKILLed at four different points (with a checkpoint corrupted on disk between two of the
    restarts), resumed each time: it ends with the reference's weights, losses and metrics."""
    run = tmp_path / "crashy"
    ck = run / "checkpoints"

    # A: killed between steps (after step 5; the last checkpoint is step 3)
    r = igam_train(tmp_path, "crashy", kill_at="step:5")
    assert r.returncode == KILLED, r.stderr
    assert sorted(p.name for p in ck.glob("*.pt")) == ["ckpt-000000003.pt"]

    # B: resumed at 3; killed between writing checkpoint 6 and its checksum sidecar
    r = igam_train(tmp_path, "crashy", "resume=true", kill_at="checkpoint-sidecar:1")
    assert r.returncode == KILLED and "resumed" in r.stdout + r.stderr and "at step 3/16" in r.stdout
    assert (ck / "ckpt-000000006.pt").exists() and not (ck / "ckpt-000000006.json").exists()

    # C: the unfinished checkpoint 6 is reported and skipped; killed half-way through writing checkpoint 8
    r = igam_train(tmp_path, "crashy", "resume=true", kill_at="checkpoint-write:2")
    out = r.stdout + r.stderr
    assert r.returncode == KILLED
    assert "checkpoint ckpt-000000006.pt is unusable (its sidecar ckpt-000000006.json is missing" in out
    assert "at step 3/16" in out
    assert list(ck.glob(".ckpt-000000008.pt.*.tmp")), "the half-written checkpoint is a temp file"
    assert not (ck / "ckpt-000000008.pt").exists()

    # D: checkpoint 6 rots on disk; the resume detects it by checksum and falls back to 3; killed while
    #    writing the final weights
    data = bytearray((ck / "ckpt-000000006.pt").read_bytes())
    data[len(data) // 3] ^= 0x55
    (ck / "ckpt-000000006.pt").write_bytes(bytes(data))
    r = igam_train(tmp_path, "crashy", "resume=true", kill_at="weights-write:1")
    out = r.stdout + r.stderr
    assert r.returncode == KILLED
    assert ("checkpoint ckpt-000000006.pt is unusable (checksum mismatch: the file is truncated or "
            "corrupted); trying the previous one.") in out
    assert "at step 3/16" in out and not list(ck.glob(".*.tmp"))
    assert not (run / "model.safetensors").exists() and read_json(run / "meta.json")["status"] == "running"

    # E: resumed from the final checkpoint: finishes
    r = igam_train(tmp_path, "crashy", "resume=true")
    assert r.returncode == 0, r.stderr
    assert "at step 16/16" in r.stdout
    assert same_weights(reference, run) == []
    assert [x["ce"] for x in read_log(run)] == [x["ce"] for x in read_log(reference)]
    assert read_json(run / "metrics.json")["final"] == read_json(reference / "metrics.json")["final"]
    # resumed after its last in-loop checkpoint: the train block is kept, the final evaluation not doubled
    train_block = {k: v for k, v in read_json(run / "metrics.json")["train"].items() if k != "images_per_s"}
    assert train_block == {k: v for k, v in read_json(reference / "metrics.json")["train"].items()
                           if k != "images_per_s"}
    assert [x["step"] for x in read_log(run, "eval_log.csv")] == [x["step"] for x in read_log(reference,
                                                                                             "eval_log.csv")]
    assert read_json(run / "meta.json")["status"] == "finished"
    assert not list(run.rglob(".*.tmp"))


def test_killed_at_a_random_moment_then_resumed_is_bit_identical(tmp_path: Path, reference: Path) -> None:
    """SIGKILL from outside at a random moment after a random step has been logged (anywhere: a step, an
    evaluation, a checkpoint or log write), then resume: same weights as the reference."""
    seed = time.time_ns() % 10**6
    rng = random.Random(seed)
    target, delay = rng.randint(1, 15), rng.uniform(0, 0.05)
    env = {k: v for k, v in os.environ.items() if k != "IGAM_TEST_KILL_AT"}
    cmd = [sys.executable, "-m", "igam", "train", *ARGS, f"out_dir={tmp_path}", "name=victim"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, t0 = tmp_path / "victim" / "log.csv", time.time()
    try:
        while proc.poll() is None and time.time() - t0 < 120 * SLOWER:
            if log.exists() and any(r.get("step", 0) >= target for r in read_log(tmp_path / "victim")):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait(timeout=60 * SLOWER)
    assert proc.returncode in (0, KILLED), (seed, proc.stderr.read() if proc.stderr else "")
    r = igam_train(tmp_path, "victim", "resume=true")
    assert r.returncode == 0, (seed, r.stderr)
    assert same_weights(reference, tmp_path / "victim") == [], f"random kill (seed {seed}, step {target})"


def test_corrupted_final_weights_are_rebuilt_by_resume(tmp_path: Path, reference: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "rot"
    shutil.copytree(reference, run)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(["info", str(run)]) == 0  # info reads metadata only
    assert main(["evaluate", str(run), "--n", "8"]) == 2
    assert "is not a valid safetensors file" in capsys.readouterr().err
    r = igam_train(tmp_path, "rot", "resume=true")
    assert r.returncode == 0 and same_weights(reference, run) == []


# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("igam.objectives.igam") is None,
                    reason="the IGAM objective (igam.objectives.igam) is not in this checkout")
def test_igam_killed_inside_a_discriminator_step_then_resumed_is_bit_identical(tmp_path: Path) -> None:
    """method=igam with a discriminator update after every student step. IGAM_TEST_KILL_AT=optimizer-step:N
    counts every optimizer.step() of the process: the student's is odd, the discriminator's even, so
    optimizer-step:12 dies inside the discriminator update of step 6 (after its optimizer step, before it
    returns; the last checkpoint is at step 4, the end of epoch 1). The resumed run matches the
    uninterrupted one in student and discriminator weights."""
    base = dict(dataset="synthetic:8x8x3:4", width=4, train_subset=128, test_subset=32, batch_size=32,
                progress=False, tensorboard=False, eval_every=0, eval_n=32, out_dir=str(tmp_path))
    teacher = train(make_config(overrides={**base, "model": "small-cnn", "name": "teacher", "epochs": 1}),
                    log=lambda *a: None)
    tuned = train(make_config(overrides={**base, "method": "finetune", "teacher": str(teacher),
                                         "name": "tuned", "epochs": 1, "adapter": "identity"}),
                  log=lambda *a: None)
    args = [f"{k}={v}" for k, v in base.items() if k != "out_dir"] + [
        "method=igam", f"teacher={tuned}", "model=small-cnn", "epochs=2", "disc_every=1",
        "checkpoint_every=3", "log_every=1", "threads=1", "lambda_diff=1", "lambda_adv=1"]
    r = igam_train(tmp_path, "igam-ref", args=args)
    assert r.returncode == 0, r.stderr
    r = igam_train(tmp_path, "igam-cut", args=args, kill_at="optimizer-step:12")
    assert r.returncode == KILLED, r.stderr
    assert [x["step"] for x in read_log(tmp_path / "igam-cut")][-1] == 5  # died within the 6th step
    r = igam_train(tmp_path, "igam-cut", "resume=true", args=args)
    assert r.returncode == 0, r.stderr
    assert "at step 4/8" in r.stdout
    assert same_weights(tmp_path / "igam-ref", tmp_path / "igam-cut") == []
    assert same_weights(tmp_path / "igam-ref", tmp_path / "igam-cut", "objective.safetensors") == []
    assert any("disc_loss" in row for row in read_log(tmp_path / "igam-cut"))
