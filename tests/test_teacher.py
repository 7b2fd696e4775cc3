"""Teachers: fine-tuning freezes the body and trains only the new head (eq. 6); clear errors for mismatches;
a warning for a non-robust teacher; foreign checkpoints load without unpickling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from igam.config import make_config
from igam.errors import IgamError
from igam.files import load_weights
from igam.objectives.finetune import build_finetune_model
from igam.runs import load_run_model
from igam.teacher_checks import check_teacher_robustness as check_robustness
from igam.teachers import frozen_teacher, load_teacher
from igam.train import train

BASE = dict(progress=False, tensorboard=False, eval_n=100, log_every=5, threads=1)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = make_config(
        overrides=dict(
            BASE,
            dataset="synthetic:28x28x1:4",
            model="small-cnn",
            width=4,
            epochs=0.5,
            optimizer="adam",
            lr=0.003,
            weight_decay=0,
            out_dir=str(out),
            name="src",
        )
    )
    return train(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def finetuned(source_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    cfg = make_config(
        overrides=dict(
            BASE,
            method="finetune",
            teacher=str(source_run),
            dataset="synthetic:32x32x3:5",
            adapter="gray+crop28",
            epochs=0.5,
            out_dir=str(out),
            name="ft",
        )
    )
    return train(cfg, log=lambda *a: None)


def test_finetuning_trains_only_the_new_head(source_run, finetuned):
    before = load_weights(source_run / "model.safetensors")
    after = load_weights(finetuned / "model.safetensors")
    body = {k.removeprefix("body."): v for k, v in after.items() if k.startswith("body.")}
    for k, v in before.items():
        if k.startswith("fc."):
            continue
        torch.testing.assert_close(body[k], v, rtol=0, atol=0)  # frozen exactly
    assert body["fc.weight"].shape == (5, before["fc.weight"].shape[1])  # a new 5-class head
    model = load_run_model(finetuned)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert model.adapter_spec == "gray+crop28"


def test_frozen_teacher_checks_shapes_and_classes(finetuned):
    t = frozen_teacher(finetuned, (3, 32, 32), 5)
    assert not any(p.requires_grad for p in t.parameters())
    with pytest.raises(IgamError, match="fine-tuned for inputs 3x32x32.*target data is 3x64x64"):
        frozen_teacher(finetuned, (3, 64, 64), 5)
    with pytest.raises(IgamError, match="5 classes, the target task has 10"):
        frozen_teacher(finetuned, (3, 32, 32), 10)


def test_igam_needs_a_finetuned_teacher(source_run):
    with pytest.raises(IgamError, match="not a fine-tuned teacher"):
        frozen_teacher(source_run, (1, 28, 28), 4)


def test_adapter_that_does_not_fit_names_the_shapes(source_run, tmp_path):
    cfg = make_config(
        overrides=dict(
            BASE,
            method="finetune",
            teacher=str(source_run),
            dataset="synthetic:32x32x3:5",
            adapter="resize",
            out_dir=str(tmp_path),
        )
    )
    spec = type("S", (), {"shape": (3, 32, 32), "num_classes": 5})()
    with pytest.raises(IgamError, match="3x32x32.*1x28x28"):
        build_finetune_model(cfg, spec)


def test_non_robust_teacher_gets_a_warning(source_run):
    lines: list[str] = []
    acc = check_robustness(source_run, n=100, log=lines.append)
    assert acc is not None and acc < 0.05
    assert lines and "not robust" in lines[0] and "method=pgd-at" in lines[0]


def test_foreign_checkpoints_need_their_architecture_and_load_safely(tmp_path):
    """A DataParallel-style checkpoint without normalisation buffers, as other libraries write them."""
    from igam.models import create_model

    src = create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28)
    path = tmp_path / "teacher.safetensors"
    save_file(
        {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("normalize.")}, str(path)
    )
    with pytest.raises(IgamError, match="teacher_model=NAME"):
        load_teacher(path)
    with pytest.raises(IgamError, match="does not fit"):
        load_teacher(path, "small-cnn", 10, "1x28x28")
    net = load_teacher(path, "madry-mnist", 10, "1x28x28")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(net.features(x), src.features(x))


def test_a_weak_fine_tuned_teacher_is_reported(tmp_path: Path) -> None:
    """A fine-tuned teacher whose recorded clean accuracy is below twice chance gets a warning that names
    it, its accuracy, chance and what to try; a good one gets none."""
    from igam.files import read_json, write_json
    from igam.teachers import WEAK_TEACHER

    src = tmp_path / "source"
    train(make_config(overrides={"dataset": "synthetic:28x28x1:4", "model": "madry-mnist", "width": 4,
                                 "train_subset": 64, "epochs": 1, "batch_size": 32, "out_dir": str(tmp_path),
                                 "name": "source", "progress": False, "tensorboard": False, "eval_n": 32}),
          log=lambda *a: None)
    ft = train(make_config(overrides={"method": "finetune", "teacher": str(src),
                                      "dataset": "synthetic:32x32x3:4", "adapter": "gray+crop28",
                                      "train_subset": 64, "epochs": 1, "batch_size": 32,
                                      "out_dir": str(tmp_path), "name": "ft", "progress": False,
                                      "tensorboard": False, "eval_n": 32}),
               log=lambda *a: None)
    metrics = read_json(ft / "metrics.json")
    for clean, warned in ((0.9 * WEAK_TEACHER / 4, True), (0.95, False)):
        metrics["final"]["clean_acc"] = clean
        write_json(ft / "metrics.json", metrics)
        said: list[str] = []
        frozen_teacher(ft, (3, 32, 32), 4, log=said.append)
        assert bool(said) == warned
        if warned:
            assert "fine-tuned teacher" in said[0] and "chance: 25.0%" in said[0] and "finetune_lr" in said[0]
