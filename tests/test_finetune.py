"""Fine-tuning (issue 13 sect. 5 and 7): a fine-tuned run records the network it trained (the adapted
teacher, not the student default small-cnn) in config.yaml, its run name, `igam info` and an experiment's
stage list; a foreign teacher file is checked on its own task (teacher_dataset) before fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from igam.cli import main
from igam.config import Config, make_config
from igam.errors import IgamError
from igam.experiment import run_experiment
from igam.experiment.spec import load_experiment, stage_status
from igam.files import load_weights
from igam.runs import Run
from igam.teacher_checks import EXPECTED_CLEAN, check_foreign_teacher
from igam.teachers import load_teacher
from igam.train import train

OWN = "synthetic:28x28x1:4"  # the teacher's own task
TARGET = "synthetic:32x32x3:4"
QUIET = {"progress": False, "tensorboard": False, "threads": 1}
SMALL = ["train_subset=64", "test_subset=32", "epochs=1", "batch_size=32", "eval_n=32", "progress=false",
         "tensorboard=false", "threads=1"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A madry-mnist teacher (not the student default small-cnn) trained a little on its own task."""
    out = tmp_path_factory.mktemp("teacher")
    return train(make_config(overrides={**QUIET, "dataset": OWN, "model": "madry-mnist",
                                        "train_subset": 512, "test_subset": 200, "epochs": 2,
                                        "batch_size": 32, "optimizer": "adam", "lr": 0.003,
                                        "weight_decay": 0, "eval_n": 200, "out_dir": str(out),
                                        "name": "teacher"}), log=lambda *a: None)


@pytest.fixture(scope="module")
def teacher_file(teacher_run: Path, tmp_path_factory) -> Path:
    """The teacher run's weights as a foreign file (as another library would hand it over)."""
    path = tmp_path_factory.mktemp("file") / "teacher.safetensors"
    save_file(load_weights(teacher_run / "model.safetensors"), str(path))
    return path


FILE_ARGS = ["teacher_model=madry-mnist", "teacher_classes=4", "teacher_in_shape=1x28x28",
             f"dataset={TARGET}", "adapter=gray+crop28"]


# --- (a) the model a fine-tuned run records -----------------------------------------------------------
def test_a_finetuned_run_records_the_adapted_teacher_not_the_student_default(teacher_run: Path,
                                                                            tmp_path: Path, capsys) -> None:
    assert Config().model == "small-cnn"  # the default that used to be recorded
    out = tmp_path / "runs"
    assert main(["finetune", f"teacher={teacher_run}", f"dataset={TARGET}", "adapter=gray+crop28",
                 f"out_dir={out}", *SMALL]) == 0
    (run_dir,) = out.iterdir()
    assert run_dir.name == f"finetune-adapted-madry-mnist-{TARGET.replace(':', '-')}-s0"
    run = Run(run_dir)
    assert run.config["model"] == run.meta["model"]["name"] == "adapted:madry-mnist"
    capsys.readouterr()
    assert main(["info", str(run_dir)]) == 0
    assert "model    adapted:madry-mnist" in capsys.readouterr().out
    # the recorded config is the config resumed with: no "changed settings" note about the model
    assert main(["finetune", f"teacher={teacher_run}", f"dataset={TARGET}", "adapter=gray+crop28",
                 f"out_dir={out}", "resume=true", *SMALL]) == 0
    assert "changed settings" not in capsys.readouterr().out


def test_a_finetuned_file_teacher_records_its_architecture(teacher_file: Path, tmp_path: Path) -> None:
    assert main(["finetune", f"teacher={teacher_file}", *FILE_ARGS, f"out_dir={tmp_path}", "name=ft",
                 *SMALL]) == 0
    assert Run(tmp_path / "ft").config["model"] == "adapted:madry-mnist"


def test_an_experiment_lists_and_keeps_the_finetuned_stage_by_its_real_model(tmp_path: Path) -> None:
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"""experiment: ftmodel
defaults: {{seed: 0, progress: false, tensorboard: false, threads: 1, eval_n: 32, train_subset: 64,
           test_subset: 32, batch_size: 32, epochs: 1}}
stages:
  - name: teacher
    config: {{method: standard, dataset: "{OWN}", model: madry-mnist, width: 4}}
  - name: teacher_ft
    row: FT
    config: {{method: finetune, teacher: "{{teacher}}", dataset: "{TARGET}", adapter: gray+crop28}}
evaluation:
  - {{attacks: [clean], n: 32}}
""")
    out = tmp_path / "out"
    lines: list[str] = []
    run_experiment(spec, out_dir=str(out), dry_run=True, log=lines.append)
    plan = "\n".join(lines)
    # before the teacher exists, its stage says what it will be
    assert "| teacher_ft | finetune | adapted:madry-mnist |" in plan and "small-cnn" not in plan
    lines.clear()
    run_experiment(spec, out_dir=str(out), log=lines.append)
    assert "igam run: teacher_ft: training (finetune, adapted:madry-mnist," in "\n".join(lines)
    assert Run(out / "teacher_ft").config["model"] == "adapted:madry-mnist"
    exp = load_experiment(spec, str(out))
    assert [stage_status(exp, st) for st in exp.stages] == ["done", "done"]  # not stale on the next run
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["model"], r["config"]["model"]) for r in rows if r["stage"] == "teacher_ft"] == [
        ("adapted:madry-mnist", "adapted:madry-mnist")]


# --- (b) a foreign teacher is checked on its own task ---------------------------------------------------
def _file_teacher(path: Path, **kw) -> torch.nn.Module:
    return load_teacher(path, "madry-mnist", 4, "1x28x28", **kw)


def test_a_foreign_teacher_is_measured_on_its_own_dataset(teacher_file: Path) -> None:
    said: list[str] = []
    acc = check_foreign_teacher(_file_teacher(teacher_file), str(teacher_file), OWN, log=said.append)
    assert acc is not None and acc >= 0.9  # the teacher learnt its task; measured, not assumed
    assert len(said) == 1 and f"{100 * acc:.1f}% clean accuracy on 200 {OWN} test images" in said[0]
    assert "WARNING" not in said[0]


def test_a_foreign_teacher_near_chance_is_refused_with_the_fixes(teacher_file: Path, tmp_path: Path) -> None:
    """A head that cannot tell classes apart (as weights read wrongly give): refused before training,
    with what to check and how to go on anyway; the run name is not left behind as `running`."""
    state = load_weights(teacher_file)
    state = {k: torch.zeros_like(v) if k.startswith("fc.") else v for k, v in state.items()}
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(IgamError, match="about chance") as e:
        check_foreign_teacher(_file_teacher(broken), str(broken), OWN, log=lambda s: None)
    msg = str(e.value)
    assert "teacher_normalize" in msg and "teacher_dataset=none" in msg
    assert "(25.0%)" in msg  # chance of 4 classes
    args = [f"teacher={broken}", *FILE_ARGS, f"out_dir={tmp_path}", *SMALL]
    assert main(["finetune", *args, f"teacher_dataset={OWN}", "name=refused"]) == 2
    assert Run(tmp_path / "refused").status != "running"
    assert main(["finetune", *args, "teacher_dataset=none", "name=anyway"]) == 0


def test_a_foreign_teacher_below_expectation_gets_a_warning(teacher_file: Path, monkeypatch) -> None:
    monkeypatch.setitem(EXPECTED_CLEAN, OWN, 1.01)  # no teacher reaches this
    said: list[str] = []
    check_foreign_teacher(_file_teacher(teacher_file), str(teacher_file), OWN, log=said.append)
    assert len(said) == 1 and "WARNING" in said[0] and "teacher_normalize" in said[0]


def test_an_unchecked_foreign_teacher_is_said_once_with_how_to_check(teacher_file: Path, tmp_path: Path,
                                                                    capsys) -> None:
    net = _file_teacher(teacher_file)
    said: list[str] = []
    assert check_foreign_teacher(net, str(teacher_file), "", log=said.append) is None
    assert len(said) == 1 and "not checked" in said[0] and "teacher_dataset=NAME" in said[0]
    said.clear()  # its dataset named but not at hand
    assert check_foreign_teacher(net, str(teacher_file), "mnist", tmp_path / "empty", log=said.append) is None
    assert len(said) == 1 and "not checked" in said[0] and "mnist" in said[0] and "not found" in said[0]
    said.clear()  # robustbench: names imply the dataset
    assert check_foreign_teacher(net, "robustbench:cifar10/Linf/X", "", tmp_path / "empty",
                                 log=said.append) is None
    assert len(said) == 1 and "cifar10" in said[0] and "not found" in said[0]
    said.clear()
    assert check_foreign_teacher(net, "robustbench:imagenet/Linf/X", "", log=said.append) is None
    assert len(said) == 1 and "no loader for imagenet" in said[0]
    assert check_foreign_teacher(net, str(teacher_file), "none", log=said.append) is None and len(said) == 1
    # through `igam finetune`: the note once, in the run's output
    capsys.readouterr()
    assert main(["finetune", f"teacher={teacher_file}", *FILE_ARGS, f"out_dir={tmp_path}", "name=ft",
                 *SMALL]) == 0
    assert capsys.readouterr().out.count("was not checked on its own task") == 1


@pytest.mark.parametrize("dataset, match", [
    ("cifar1O", "is not a dataset.*Did you mean 'cifar10'"),
    ("synthetic:32x32x3:4", "has 3x32x32 images; the teacher .* takes 1x28x28"),
    ("synthetic:28x28x1:5", "has 5 classes; the teacher .* has 4"),
])
def test_a_teacher_dataset_that_does_not_fit_is_refused(teacher_file: Path, dataset: str, match: str) -> None:
    with pytest.raises(IgamError, match=match):
        check_foreign_teacher(_file_teacher(teacher_file), str(teacher_file), dataset, log=lambda s: None)


def test_a_teacher_of_a_class_subset_is_checked_on_that_subset(teacher_file: Path) -> None:
    """teacher_dataset takes a class subset like every dataset name (cifar10:animals for a 6-class teacher);
    a whole dataset with more classes than the teacher suggests naming them, a misspelt subset is refused."""
    said: list[str] = []
    subset = f"{OWN}:0,1,2,3"  # the same four classes in the same order: the teacher's own task
    acc = check_foreign_teacher(_file_teacher(teacher_file), str(teacher_file), subset, log=said.append)
    assert acc is not None and acc >= 0.9 and f"200 {subset} test images" in said[0]
    with pytest.raises(IgamError, match=r"has 8 classes; the teacher .* has 4 \(a teacher of some of its "
                                        r"classes: name them, e.g. synthetic:28x28x1:8:0,1"):
        check_foreign_teacher(_file_teacher(teacher_file), str(teacher_file), "synthetic:28x28x1:8",
                              log=lambda s: None)
    with pytest.raises(IgamError, match="class 7 is out of range"):
        check_foreign_teacher(_file_teacher(teacher_file), str(teacher_file), f"{OWN}:0,1,2,7",
                              log=lambda s: None)
