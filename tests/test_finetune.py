"""Fine-tuning (issue 13 sect. 5 and 7): a fine-tuned run records the network it trained (the adapted
teacher, not the student default small-cnn) in config.yaml, its run name, `igam info` and an experiment's
stage list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from igam.cli import main
from igam.config import Config, make_config
from igam.experiment import run_experiment
from igam.experiment.spec import load_experiment, stage_status
from igam.files import load_weights
from igam.runs import Run
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
