"""Teachers shipped inside the package (issue 14 item 7): `teacher=igam:NAME` loads offline, the weights
match their certificate, a damaged file is refused, `igam models` / `igam info` show the certificate, and
the certificate's clean accuracy is reproduced on the real test images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from igam.attacks import STRONG_PGD
from igam.cli import main
from igam.data import load_data
from igam.errors import IgamError
from igam.evaluate import run_attack
from igam.models import shipped
from igam.teachers import load_teacher

MNIST = "igam:mnist-linf-0.3"


def test_the_mnist_teacher_ships_with_a_complete_certificate() -> None:
    assert "mnist-linf-0.3" in shipped.list_shipped()
    cert = shipped.certificate(MNIST)
    assert cert["dataset"] == "mnist" and cert["threat"] == "Linf" and cert["eps"] == pytest.approx(0.3)
    assert set(cert["accuracy"]) >= {"clean", STRONG_PGD, "autoattack"}
    assert cert["n"] >= 1000
    assert cert["accuracy"]["autoattack"] <= cert["accuracy"][STRONG_PGD] <= cert["accuracy"]["clean"]
    assert "igam train" in cert["command"] and cert["train_minutes"] <= 60
    size_mb = (shipped.WEIGHTS_DIR / "mnist-linf-0.3.safetensors").stat().st_size / 1e6
    assert size_mb < 10, f"a shipped teacher should be a few MB, not {size_mb:.1f}"


@pytest.mark.parametrize("name", shipped.list_shipped())
def test_every_shipped_teacher_loads_and_its_certificate_is_complete(name: str) -> None:
    cert = shipped.certificate(name)
    acc = cert["accuracy"]
    assert acc["autoattack"] <= acc[STRONG_PGD] <= acc["clean"] and cert["n"] >= 1000
    net = load_teacher(f"igam:{name}")
    model = cert["model"]
    x = torch.rand(2, model["in_chans"], *model["input_size"])
    assert net(x).shape == (2, model["num_classes"])
    assert (shipped.WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 10e6


def test_igam_name_loads_offline_as_a_teacher() -> None:
    net = load_teacher(MNIST)
    x = torch.rand(4, 1, 28, 28)
    out = net(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert not net.training


def test_unknown_name_lists_the_shipped_teachers() -> None:
    with pytest.raises(IgamError, match="mnist-linf-0.3"):
        load_teacher("igam:mnist-linf-0.1")


def test_damaged_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS_DIR, copy)
    data = bytearray((copy / "mnist-linf-0.3.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the last tensor
    (copy / "mnist-linf-0.3.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", copy)
    with pytest.raises(IgamError, match="does not match its certificate"):
        load_teacher(MNIST)


def test_models_and_info_show_the_certificate(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    line = next(t for t in listing.splitlines() if MNIST in t)
    assert "autoattack" in line and "eps 0.3" in line
    assert main(["info", MNIST]) == 0
    info = capsys.readouterr().out
    assert "command" in info and "sha256" in info


def test_a_teacher_name_given_as_a_run_says_what_to_do(capsys: pytest.CaptureFixture) -> None:
    """A verb that takes only runs (`igam gradients igam:NAME`) explains that a shipped or RobustBench teacher
    is not a run: where its certified figures are and how to use it; an unknown name lists those there are.
    (`igam evaluate igam:NAME` evaluates it: tests/test_ux.py.)"""
    assert main(["gradients", MNIST, "--n", "5"]) == 2
    err = capsys.readouterr().err
    assert "is a teacher, not a run directory" in err and f"igam info {MNIST}" in err
    assert f"igam finetune teacher={MNIST} dataset=TARGET" in err and "Traceback" not in err
    assert main(["gradients", "robustbench:cifar10/Linf/Standard"]) == 2
    assert "is a teacher, not a run directory" in capsys.readouterr().err
    assert main(["evaluate", "igam:nope"]) == 2
    err = capsys.readouterr().err
    assert "Shipped teachers:" in err and "igam:mnist-linf-0.3" in err


def test_foreign_teacher_keys_with_a_shipped_teacher_are_refused(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """teacher_model / teacher_dataset / ... describe a weights file; a shipped teacher (or a run) records its
    own, so giving them is a mistake to report, not to ignore silently."""
    rc = main(["finetune", f"teacher={MNIST}", "teacher_model=resnet20", "teacher_dataset=cifar10",
               "dataset=synthetic", "train_subset=32", "epochs=1", "progress=false", "tensorboard=false",
               f"out_dir={tmp_path}", "name=ft"])
    err = capsys.readouterr().err
    assert rc == 2 and "teacher_model and teacher_dataset are for a teacher weights file" in err
    assert f"teacher={MNIST} is a shipped teacher" in err and "Drop teacher_model and teacher_dataset" in err
    rc = main(["finetune", f"teacher={MNIST}", "teacher_dir=/nonexistent", "dataset=synthetic",
               "train_subset=32", "epochs=1", "progress=false", "tensorboard=false", f"out_dir={tmp_path}",
               "name=ft2"])
    err = capsys.readouterr().err
    assert rc == 2 and "teacher_dir is for a teacher weights file (teacher_dir: for a robustbench:" in err


def test_finetune_from_a_shipped_teacher(tmp_path: Path) -> None:
    """The shipped body is frozen and gets a new head for a synthetic 32x32 RGB task."""
    rc = main(["finetune", f"teacher={MNIST}", "dataset=synthetic", "adapter=gray+crop28",
               "train_subset=32", "test_subset=32", "epochs=1", "batch_size=16", "eval_n=16",
               "progress=false", "tensorboard=false", f"out_dir={tmp_path}", "name=ft"])
    assert rc == 0
    from igam.runs import Run

    meta = Run.open(tmp_path / "ft").meta
    assert meta["model"]["teacher"] == shipped.certificate(MNIST)["model"]


def test_the_certificate_is_reproduced_on_real_mnist(real_data_dir: Path) -> None:
    """Clean accuracy on the certificate's own first n test images, recomputed here (PGD-100x3 and
    AutoAttack take minutes; their reproduction is the command in the certificate)."""
    cert = shipped.certificate(MNIST)
    data = load_data("mnist", real_data_dir, False, 0, cert["n"])
    rec = run_attack(load_teacher(MNIST), data.x_test, data.y_test, "clean")
    assert rec["accuracy"] == pytest.approx(cert["accuracy"]["clean"], abs=0.002)
