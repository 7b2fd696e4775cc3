"""Experiments as code: every paper config parses, dry-runs and runs in miniature; stages are reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from igam.cli import main
from igam.errors import IgamError
from igam.experiment import evaluate_experiment, format_plan, load_experiment, run_experiment, stage_status
from igam.runs import Run

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "experiments" / "paper").glob("*.yaml"))
ALL = PAPER + sorted((ROOT / "experiments" / "cpu").glob("*.yaml")) + sorted(
    (ROOT / "experiments" / "gpu").glob("*.yaml"))
QUICK = ROOT / "src" / "igam" / "demo_configs" / "demo-quick.yaml"


def test_the_paper_files_are_all_there():
    names = {p.stem.split("-")[0] for p in PAPER}
    assert names == {"table1", "table2", "table3", "table4", "table5", "fig5"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_experiment_parses_and_dry_runs(path, tmp_path, capsys):
    exp = load_experiment(path, out_dir=str(tmp_path))
    assert exp.stages and exp.evaluation
    plan = format_plan(exp)
    assert all(f"| {s.name} |" in plan for s in exp.stages)
    assert "todo" in plan and "estimated training time" in plan
    rows = [s for s in exp.stages if s.row]
    assert rows, "an experiment must name at least one results row"
    if path in PAPER and "sweep" not in path.stem and "fig5" not in path.stem:
        assert any(s.paper for s in rows), "paper files state the paper's numbers next to the rows"
    assert main(["run", str(path), "--dry-run", "--out-dir", str(tmp_path)]) == 0
    assert "stages left" in capsys.readouterr().out


def test_dry_run_with_only_counts_only_the_chosen_stages(tmp_path, capsys):
    """`--dry-run --only a,b` lists the other stages as skipped and estimates the chosen ones alone."""
    path = ROOT / "experiments" / "cpu" / "mnist-to-cifar10.yaml"
    exp = load_experiment(path, out_dir=str(tmp_path))
    full = format_plan(exp)
    chosen = format_plan(exp, only=["standard", "igam"])
    assert f"stages left: {len(exp.stages)};" in full
    assert "stages left: 2;" in chosen
    assert chosen.count("skipped (--only)") == len(exp.stages) - 2
    assert main(["run", str(path), "--dry-run", "--only", "standard,igam", "--out-dir", str(tmp_path)]) == 0
    assert "stages left: 2;" in capsys.readouterr().out


def test_dry_run_counts_only_the_evaluations_still_to_do(tmp_path, capsys):
    """The plan's evaluation lines count the stages whose evaluation is still to do, not every row stage:
    an evaluated experiment has none left; a stage whose eval.json lost a result (or its masking checks)
    is to do again; a stage whose config changed is retrained, so evaluated afresh."""
    student = ("{method: standard, dataset: 'synthetic:8x8x3:4', model: small-cnn, width: 4, epochs: 1, "
               "train_subset: 64, test_subset: 32, batch_size: 32, progress: false, tensorboard: false, "
               "threads: 1, eval_n: 16}")
    path = tmp_path / "e.yaml"
    path.write_text(f"stages:\n  - {{name: a, row: A, config: {student}}}\n"
                    f"  - {{name: b, row: B, config: {student}}}\n"
                    "evaluation:\n  - {attacks: [clean, fgsm], n: 16}\n"
                    "  - {attacks: [clean], n: 16, rows: [b], checks: true, check_n: 16}\n")
    out = tmp_path / "out"
    exp = load_experiment(path, out_dir=str(out))
    before = format_plan(exp)
    assert "evaluation: clean, fgsm on 16 test images, still to do for 2 of 2 stages" in before
    assert "evaluation: clean on 16 test images, still to do for 1 of 1 stages (b)" in before
    run_experiment(path, out_dir=str(out), log=lambda *a: None)
    assert main(["run", str(path), "--out-dir", str(out), "--dry-run"]) == 0
    done = capsys.readouterr().out
    assert "clean, fgsm on 16 test images, still to do for 0 of 2 stages" in done
    assert "clean on 16 test images, still to do for 0 of 1 stages" in done
    assert "estimated evaluation time left: 0m00s" in done
    ev = json.loads((out / "a" / "eval.json").read_text())
    del ev["fgsm"]
    (out / "a" / "eval.json").write_text(json.dumps(ev))
    ev = json.loads((out / "b" / "eval.json").read_text())
    del ev["masking_checks"]
    (out / "b" / "eval.json").write_text(json.dumps(ev))
    partly = format_plan(exp)
    assert "clean, fgsm on 16 test images, still to do for 1 of 2 stages" in partly
    assert "clean on 16 test images, still to do for 1 of 1 stages (b)" in partly
    changed = format_plan(load_experiment(path, out_dir=str(out), overrides={"seed": 1}))
    assert "clean, fgsm on 16 test images, still to do for 2 of 2 stages" in changed


def test_only_with_unknown_empty_or_unready_stages_is_refused_before_anything_runs(tmp_path, capsys):
    """`--only` names stages: an unknown one (a typo) or none at all is an error, not a silent no-op (or,
    for an empty value, the whole experiment); a stage whose teacher is neither done nor chosen is refused
    before any training (the dry run says so under its plan); names are stripped."""
    path = ROOT / "experiments" / "cpu" / "animals-to-vehicles.yaml"
    out = tmp_path / "exp"
    run = ["run", str(path), "--out-dir", str(out)]
    for only, said in (("techer_ft", "'techer_ft' is not a stage of cpu-animals-to-vehicles. Did you mean "
                                     "'teacher_ft'?"),
                       ("", "--only names no stage"), (" , ", "--only names no stage"),
                       ("igam", "stage 'igam' needs stage 'teacher_ft', which is neither done nor in --only. "
                                "Add what it needs (--only teacher_ft,igam)")):
        assert main([*run, "--only", only]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    assert not out.exists()  # refused before the out_dir was made
    assert main([*run, "--dry-run", "--only", "igam"]) == 0  # an estimate, with what would stop the run
    captured = capsys.readouterr().out
    assert "| igam | igam |" in captured
    assert "WARNING: without --dry-run this plan would stop before training: --only: stage 'igam' needs" in (
        captured)
    assert main([*run, "--dry-run", "--only", " teacher_ft ,igam"]) == 0
    assert "stages left: 2;" in capsys.readouterr().out


def test_results_only_without_any_run_is_an_error_and_makes_no_folder(tmp_path, capsys) -> None:
    out = tmp_path / "nothing"
    path = ROOT / "experiments" / "cpu" / "animals-to-vehicles.yaml"
    assert main(["run", str(path), "--out-dir", str(out), "--results-only"]) == 2
    err = capsys.readouterr().err
    assert "no stage of cpu-animals-to-vehicles has run" in err and "Traceback" not in err
    assert not out.exists()


def test_an_interrupted_igam_run_says_rerun_not_resume_true(tmp_path, capsys, monkeypatch) -> None:
    import igam.experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(igam.experiment, "run_experiment", interrupted)
    path = ROOT / "experiments" / "cpu" / "animals-to-vehicles.yaml"
    assert main(["run", str(path), "--out-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "rerun the same `igam run` command to resume" in err and "resume=true" not in err


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_every_paper_experiment_runs_in_miniature(path, tmp_path, monkeypatch):
    if "sweep" in path.stem:  # tables 4/5 use table 3's fine-tuned teacher: make a miniature one first
        t3 = ROOT / "experiments" / "paper" / "table3-to-cifar100.yaml"
        run_experiment(
            t3,
            out_dir=str(tmp_path / "t3"),
            miniature=True,
            only=["teacher_cifar10", "teacher_cifar10_ft"],
            log=lambda *a: None,
        )
        monkeypatch.setenv("IGAM_C10_TEACHER_FT", str(tmp_path / "t3" / "teacher_cifar10_ft"))
    out = run_experiment(path, out_dir=str(tmp_path / "exp"), miniature=True, log=lambda *a: None)
    exp = load_experiment(path, out_dir=str(out), miniature=True)
    assert all(stage_status(exp, s) == "done" for s in exp.stages)
    table = (out / "results.md").read_text()
    for s in exp.stages:
        if s.row:
            assert f"| {s.row} |" in table
    assert (out / "results.json").exists()


def test_a_miniature_without_out_dir_stays_out_of_the_real_runs_folder():
    real = load_experiment(QUICK).out_dir
    assert load_experiment(QUICK, miniature=True).out_dir == real.with_name(real.name + "-miniature")
    assert load_experiment(QUICK, out_dir="somewhere", miniature=True).out_dir == Path("somewhere")


def test_a_miniature_says_so_on_every_row_it_prints(tmp_path):
    """`--miniature` trains a PGD-7 row with 2 steps on synthetic data: results.md (and the report made
    from it) label each row and curve "(miniature)" and say what a miniature is, rather than show "PGD-7"
    as if it had run as written."""
    path = tmp_path / "e.yaml"
    path.write_text("description: PGD-7 against the standard student.\nstages:\n"
                    "  - {name: std, row: Standard, curve: Standard, config: {method: standard}}\n"
                    "  - {name: pgd7, row: PGD-7, config: {method: pgd-at, steps: 7}}\n"
                    "evaluation:\n  - {attacks: [clean, fgsm, pgd20], n: 1000}\n")
    defaults = {"dataset": "cifar10", "threads": 1}
    assert [s.row for s in load_experiment(path, overrides=defaults).stages] == ["Standard", "PGD-7"]
    exp = load_experiment(path, out_dir=str(tmp_path / "out"), overrides=defaults, miniature=True)
    assert [(s.row, s.curve) for s in exp.stages] == [("Standard (miniature)", "Standard (miniature)"),
                                                      ("PGD-7 (miniature)", "")]
    out = run_experiment(path, out_dir=str(tmp_path / "out"), overrides=defaults, miniature=True,
                         log=lambda *a: None)
    assert Run(out / "pgd7").config["steps"] == 2
    table = (out / "results.md").read_text()
    assert "| PGD-7 (miniature) |" in table and "| Standard (miniature) |" in table
    assert "| PGD-7 |" not in table
    assert "at most 0.25 epochs and 2 PGD steps" in table and "not results" in table
    assert "PGD-7 against the standard student." in table


def test_finished_stages_are_reused_and_changed_ones_rerun(tmp_path):
    logs: list[str] = []
    run_experiment(QUICK, out_dir=str(tmp_path), log=logs.append)
    assert not any("reused" in line for line in logs)
    logs.clear()
    run_experiment(QUICK, out_dir=str(tmp_path), log=logs.append)
    assert sum("done, reused" in line for line in logs) == 4
    logs.clear()
    run_experiment(QUICK, out_dir=str(tmp_path), overrides={"seed": 1}, log=logs.append)
    assert sum("config changed" in line for line in logs) == 4
    assert len(list(tmp_path.glob("*.stale-*"))) == 4


def test_a_folder_spelled_relative_or_absolute_is_the_same_folder(tmp_path, monkeypatch):
    """data_dir=/abs/data and, from /abs, data_dir=data name one folder: the finished stages are reused,
    not moved aside as stale and trained again; another folder still counts as a change."""
    (tmp_path / "data").mkdir()
    out = str(tmp_path / "exp")
    run_experiment(QUICK, out_dir=out, overrides={"data_dir": str(tmp_path / "data")}, log=lambda *a: None)
    monkeypatch.chdir(tmp_path)
    logs: list[str] = []
    run_experiment(QUICK, out_dir=out, overrides={"data_dir": "data"}, log=logs.append)
    assert sum("done, reused" in line for line in logs) == 4 and not list(Path(out).glob("*.stale-*"))
    exp = load_experiment(QUICK, out_dir=out, overrides={"data_dir": "elsewhere"})
    assert {stage_status(exp, s) for s in exp.stages} == {"stale"}


def test_bad_experiment_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "defaults: {dataset: cifar10}\nstages:\n  - name: a\n    config: {method: standard, lr: 0.1}\n"
        "  - name: b\n    config: {method: finetune, teacher: '{c}'}\n"
    )
    with pytest.raises(IgamError, match="refers to '\\{c\\}'"):
        load_experiment(bad)
    bad.write_text("stages:\n  - name: a\n    config: {methd: standard}\n")
    with pytest.raises(IgamError, match="Did you mean 'method'"):
        load_experiment(bad)
    bad.write_text("stagez: []\n")
    with pytest.raises(IgamError, match="stages"):
        load_experiment(bad)


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| Standard |" in out and "| IGAM |" in out
    assert (tmp_path / "results.md").exists()


def test_matched_clean_interpolates_inside_each_curve_only():
    from igam.experiment import curve_points, matched_clean

    def row(stage, curve, clean, pgd20):
        return {"stage": stage, "row": "", "curve": curve, "accuracy": {"clean": clean, "pgd20": pgd20}}

    results = {"rows": [row("a1", "A", 30, 20), row("a2", "A", 40, 10), row("b1", "B", 35, 5),
                        row("b2", "B", 45, 1), {**row("std", "", 50, 0), "row": "Standard"}]}
    pts = curve_points(results, "pgd20")
    assert pts["A"] == [(30, 20, "a1"), (40, 10, "a2")] and pts["Standard"] == [(50, 0, "std")]
    grid, matched = matched_clean(pts, levels=4)
    assert grid == [30.0, 35.0, 40.0, 45.0]  # across both curves' clean ranges; single points left out
    assert set(matched) == {"A", "B"}
    assert matched["A"] == [20.0, 15.0, 10.0, None]  # linear between points, None outside (no extrapolation)
    assert matched["B"] == [None, 5.0, 3.0, 1.0]
    # the levels stay inside the measured range: whole numbers from ceil(lowest) to floor(highest)
    grid, _ = matched_clean({"A": [(24.2, 9, "a"), (36.6, 3, "b")]}, levels=3)
    assert grid == [25.0, 30.0, 36.0]


def test_evaluation_runs_on_the_device_of_the_stage(tmp_path, monkeypatch):
    """`igam run ... device=cuda` evaluates its rows on the GPU too, not on evaluate_run's default CPU."""
    import torch

    import igam.experiment.stages as runner

    stage = ("stages:\n  - name: s\n    row: S\n    config: {method: standard, dataset: 'synthetic:8x8x3:4', "
             "model: small-cnn, width: 4, epochs: 1, train_subset: 64, batch_size: 32, progress: false, "
             "tensorboard: false, eval_n: 16}\n")
    path = tmp_path / "e.yaml"
    path.write_text(stage)
    run_experiment(path, out_dir=str(tmp_path / "out"), log=lambda *a: None)  # trains (no evaluation block)
    path.write_text(stage + "evaluation:\n  - {attacks: [clean], n: 16}\n")
    seen = []
    monkeypatch.setattr(runner, "evaluate_run", lambda run, attacks, **kw: seen.append(kw["device"]))
    monkeypatch.setattr(runner, "resolve_device", lambda name="auto": torch.device(name))  # no GPU here
    for device in ("cuda", "cpu"):
        exp = load_experiment(path, out_dir=str(tmp_path / "out"), overrides={"device": device})
        evaluate_experiment(exp, log=lambda *a: None)
    assert seen == ["cuda", "cpu"]


def test_only_evaluates_only_the_chosen_stages(tmp_path):
    """`igam run --only standard` trains and evaluates `standard` alone, even when other row stages of the
    file are finished but not yet evaluated."""
    run_experiment(QUICK, out_dir=str(tmp_path), log=lambda *a, **k: None)
    for name in ("standard", "igam"):
        (tmp_path / name / "eval.json").unlink()
    run_experiment(QUICK, out_dir=str(tmp_path), only=["standard"], log=lambda *a, **k: None)
    assert (tmp_path / "standard" / "eval.json").exists()
    assert not (tmp_path / "igam" / "eval.json").exists()
