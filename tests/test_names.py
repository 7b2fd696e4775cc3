"""Issue 24, class 2: run and stage names are single folder names inside out_dir. '..', '.', paths,
separators, control characters, blank and absurdly long names are refused with one error before anything
is written; out_dir may be any folder the user names, and nothing is written outside it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_RUN

from igam.cli import main

BAD_NAMES = ["..", ".", "../../y", "../y", "a/b", "a\\b", "/abs", "x\x00y", "line\nbreak", " ", "x" * 300,
             "a/../b",
             # (a field report: accepted, though some file systems drop the dot or space, or the name only
             # looks like a path)
             "foo.", "x ", " x", "\uff46\uff0fx", "a\u2215b"]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    line = next(ln for ln in err.splitlines() if ln.startswith("igam: error:"))
    for n in needles:
        assert n in line, line
    return line


def _tiny(**kw: str) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY_RUN, "epochs": "0.25", **kw}.items()]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("verb", ["train", "finetune", "transfer"])
def test_a_run_name_that_is_no_folder_name_is_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, verb: str, name: str) -> None:
    here = tmp_path / "cwd" / "deeper"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)  # the default out_dir (runs) is relative to it
    for extra in ({}, {"out_dir": str(tmp_path / "o" / "x")}):
        _error(capsys, [verb, *_tiny(name=name, **extra)], "name=")
    assert _files(tmp_path) == ["cwd", "cwd/deeper"], "something was written"


def test_the_issue_cases_write_nothing_outside_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys) -> None:
    """`name=..` wrote config, weights and checkpoints into out_dir's parent (the current directory with
    the default out_dir); `name=../../y` a run outside out_dir; `name=.` made out_dir the run; `name=a/b`
    nested silently."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    for name, needle in (("..", "folder above out_dir"), ("../../y", "separator"), (".", "out_dir itself"),
                         ("a/b", "separator")):
        _error(capsys, ["train", *_tiny(out_dir="o/x", name=name)], needle)
        _error(capsys, ["train", *_tiny(name=name)], needle)
    assert _files(tmp_path) == ["o"]


def test_a_name_from_a_config_file_is_checked_the_same(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: ../escape\n")
    _error(capsys, ["train", "--config", str(cfg), *_tiny(out_dir=str(tmp_path / "o"))], "name=")
    assert _files(tmp_path) == ["c.yaml"]


def test_any_out_dir_works_and_the_run_stays_inside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert main(["train", *_tiny(out_dir="a/../b/c", name="ok.run-1=x")]) == 0
    capsys.readouterr()
    assert (tmp_path / "b" / "c" / "ok.run-1=x" / "model.safetensors").is_file()
    assert {p.parts[0] for p in Path(".").rglob("*")} == {"a", "b"}


def test_the_default_name_is_one_folder_even_for_paths_in_the_dataset(tmp_path: Path, capsys) -> None:
    import numpy as np

    data = tmp_path / "d" / "sub\\dir.npz"  # a backslash is a separator on Windows
    data.parent.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8), y_train=np.arange(64) % 2,
             x_test=rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8), y_test=np.arange(16) % 2)
    out = tmp_path / "runs"
    assert main(["train", *_tiny(dataset=f"npz:{data}", out_dir=str(out))]) == 0, capsys.readouterr().err
    (run,) = out.iterdir()
    assert (run / "meta.json").is_file() and "\\" not in run.name and "/" not in run.name


def test_a_run_folder_that_is_a_link_out_of_out_dir_is_refused(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(elsewhere)
    _error(capsys, ["train", *_tiny(out_dir=str(tmp_path / "runs"), name="r")], "symbolic link", "out_dir")
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# stage names in experiment files: the stage's run folder is out_dir/NAME
STAGES = """out_dir: {out}
defaults: {{dataset: "synthetic:16x16x1:4", model: small-cnn, width: 4, train_subset: 64, test_subset: 16,
           batch_size: 32, epochs: 0.25, progress: false, tensorboard: false, eval_n: 16, threads: 1}}
stages:
  - name: {name}
    config: {{method: standard}}
"""


@pytest.mark.parametrize("name", ['".."', '"."', '"../escape"', '"a/b"', '"a\\\\b"', '""', '" "', "null",
                                  '"x\\0y"', "[a, b]", '"' + "n" * 300 + '"', "true"])
@pytest.mark.parametrize("dry", [True, False])
def test_a_stage_name_that_is_no_folder_name_is_refused(tmp_path: Path, capsys, name: str, dry: bool) -> None:
    spec = tmp_path / "exp" / "e.yaml"
    spec.parent.mkdir()
    spec.write_text(STAGES.format(out=tmp_path / "exp" / "out", name=name))
    _error(capsys, ["run", str(spec), *(["--dry-run"] if dry else [])], "stage 1", "name")
    assert _files(tmp_path) == ["exp", "exp/e.yaml"]


def test_a_sweep_that_makes_a_bad_stage_name_is_refused(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "e.yaml"
    spec.write_text(STAGES.format(out=tmp_path / "out", name="s").replace(
        "    config: {method: standard}", "    config: {method: standard}\n    sweep: {init_from: ['"
        + "p" * 250 + "']}"))
    _error(capsys, ["run", str(spec), "--dry-run"], "stage 's'", "characters long")
    assert _files(tmp_path) == ["e.yaml"]


def test_swept_values_with_separators_stay_in_one_folder(tmp_path: Path, capsys) -> None:
    from igam.experiment.spec import load_experiment

    spec = tmp_path / "e.yaml"
    spec.write_text(STAGES.format(out=tmp_path / "out", name="s").replace(
        "    config: {method: standard}", "    config: {method: standard}\n    sweep: {data_dir: ['a/b', "
        "'c\\d', '..']}"))
    exp = load_experiment(spec)
    assert [st.name for st in exp.stages] == ["s-data_dir=a_b", "s-data_dir=c_d", "s-data_dir=__"]
    assert all((exp.out_dir / st.name).parent == exp.out_dir for st in exp.stages)


def test_a_numeric_stage_name_is_its_folder(tmp_path: Path) -> None:
    from igam.experiment.spec import load_experiment

    spec = tmp_path / "e.yaml"
    spec.write_text(STAGES.format(out=tmp_path / "out", name="2020"))
    assert [st.name for st in load_experiment(spec).stages] == ["2020"]


def test_name_errors_say_what_to_do(capsys, tmp_path: Path) -> None:
    line = _error(capsys, ["train", *_tiny(out_dir=str(tmp_path), name="a/b")], "name=")
    assert "out_dir=" in line and "one folder name" in line


@pytest.mark.parametrize("override,needle", [("out_dir=a\x00b", "NUL"), ("data_dir=d\x00", "NUL"),
                                             ("out_dir=" + "d" * 5000, "too long")])
def test_an_out_dir_no_file_system_takes_is_one_clear_error(tmp_path: Path, monkeypatch, capsys,
                                                            override: str, needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    _error(capsys, ["train", *_tiny(), override], needle)
    _error(capsys, ["evaluate", str(tmp_path / ("r" * 5000))], "too long")
    assert _files(tmp_path) == []


def test_a_damaged_training_log_is_reported_not_silently_drawn(tiny_run, tmp_path: Path, capsys) -> None:
    """A field report: `igam report RUN` with a garbled log.csv wrote report.html, exit 0, without a word."""
    from conftest import copy_run

    run = copy_run(tiny_run, tmp_path)
    (run / "log.csv").write_bytes(b"step,loss\n1,abc,\x00\x01garbage\n")
    rc = main(["report", str(run), "--no-gradients"])
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err
    assert f"'{run / 'log.csv'}' holds" in err and "damaged" in err, err
