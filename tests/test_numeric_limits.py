"""Issue 24, classes 4 and 6: every number igam reads goes through one validation wherever it comes from
(command line, --config file, experiment file, a run's config.yaml), YAML files never give a key twice, and
sizes that cannot be allocated or finished are refused before any work, naming a value that fits. Each
bad input is one `igam: error:` line (exit 2), never a traceback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from igam.cli import main
from igam.config import Config, make_config
from igam.errors import IgamError
from igam.experiment.spec import load_experiment
from igam.files import read_yaml
from igam.sweeps import parse_eps_sweep

TINY = ["dataset=synthetic:8x8x3:4", "model=small-cnn", "width=4", "train_subset=64", "test_subset=32",
        "batch_size=32", "epochs=1", "progress=false", "tensorboard=false", "eval_n=32", "threads=1"]


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit 2 with one `igam: error:` line and no traceback; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("igam: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# class 4: non-finite and odd values, from every source
NON_FINITE = [("epochs", ".inf"), ("lr", ".nan"), ("lr", "1.0e+999"), ("momentum", ".nan"),
              ("batch_size", ".inf"), ("weight_decay", "-.inf"), ("kd_sigma", ".nan"),
              ("lr", "1" + "0" * 400),  # a YAML integer too large for a float
              ("lr_milestones", "[0.5, .nan]"), ("eps", ".nan"), ("noise", ".inf"), ("lambda_diff", ".inf")]


@pytest.mark.parametrize("key,value", NON_FINITE)
def test_non_finite_values_in_a_config_file_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         key: str, value: str) -> None:
    """`epochs: .inf` was an OverflowError traceback; `lr: .nan`, `lr: 1.0e+999` and `momentum: .nan` started
    a run that the update guard stopped blaming "the update"."""
    f = tmp_path / "c.yaml"
    f.write_text(f"{key}: {value}\n")
    args = [a for a in TINY if not a.startswith(f"{key}=")]  # (the command line would override the file)
    line = _cli_error(capsys, ["train", "--config", str(f), f"out_dir={tmp_path}", *args], key)
    assert "finite" in line or "number" in line
    assert not any(tmp_path.glob("*/meta.json"))  # refused before any run folder


@pytest.mark.parametrize("key,value", [("epochs", "inf"), ("lr", "nan"), ("lr", "1e999"),
                                       ("momentum", "-inf"),
                                       ("lr", float("nan")), ("epochs", float("inf")), ("lr", 10**400)])
def test_non_finite_values_from_the_command_line_and_the_api_name_the_key(key: str, value: object) -> None:
    with pytest.raises(IgamError, match=f"{key}=.*not a finite number"):
        make_config(overrides={key: value})
    with pytest.raises(IgamError, match=f"{key}=.*not a finite number"):
        Config().replace(**{key: value})


def test_non_finite_values_in_an_experiment_file_name_the_stage_and_key(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("stages:\n  - name: a\n    config: {method: standard, epochs: .inf}\n")
    with pytest.raises(IgamError, match="Stage 'a': epochs=inf is not a finite number"):
        load_experiment(f)
    f.write_text("defaults: {lr: .nan}\nstages:\n  - name: a\n    config: {method: standard}\n")
    with pytest.raises(IgamError, match="lr=nan is not a finite number"):
        load_experiment(f)


@pytest.mark.parametrize("text,key,lines", [
    ("lr: 0.1\nepochs: 2\nlr: 0.5\n", "lr", (1, 3)),
    ("epochs: 1\nepochs: 1\n", "epochs", (1, 2)),  # the same value twice is still a mistake to point at
    ("{a: 1, a: 2}\n", "a", (1, 1)),
])
def test_duplicate_keys_in_a_config_file_are_an_error_naming_key_and_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture, text: str, key: str, lines: tuple[int, int]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    _cli_error(capsys, ["train", "--config", str(f), f"out_dir={tmp_path}", *TINY[:2]],
               f"gives the key '{key}' twice (line {lines[0]} and line {lines[1]})")


def test_duplicate_keys_anywhere_in_an_experiment_file_are_an_error(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("stages:\n  - name: a\n    config:\n      method: standard\n      lr: 0.1\n      lr: 0.2\n")
    with pytest.raises(IgamError, match=r"gives the key 'lr' twice \(line 5 and line 6\)"):
        load_experiment(f)
    f.write_text("out_dir: x\nstages:\n  - {name: a, config: {method: standard}}\nout_dir: y\n")
    with pytest.raises(IgamError, match=r"gives the key 'out_dir' twice \(line 1 and line 4\)"):
        load_experiment(f)


def test_a_merge_key_may_be_overridden_and_a_runs_config_with_a_duplicate_is_refused(tmp_path: Path) -> None:
    """YAML's merge (`<<: *base`) followed by an explicit key is an override, not a duplicate."""
    f = tmp_path / "m.yaml"
    f.write_text("base: &b {lr: 1, epochs: 2}\nx:\n  <<: *b\n  lr: 3\n")
    assert read_yaml(f, "File")["x"] == {"lr": 3, "epochs": 2}
    f.write_text("lr: 1\nlr: 2\n")
    with pytest.raises(IgamError, match="The run's config file .* gives the key 'lr' twice"):
        read_yaml(f, "The run's config file")


# ranges of the numeric keys: each reason is in the message
@pytest.mark.parametrize("key,value,needle", [
    ("momentum", 1.9, "momentum=1.9 must be below 1"), ("momentum", 1.0, "must be below 1"),
    ("momentum", -0.1, "must not be negative"), ("weight_decay", 5.0, "is more than 1"),
    ("lr_gamma", 0.0, "lr_gamma=0.0 must be positive"), ("lr_gamma", 2.0, "would raise lr"),
    ("grad_clip", 1e-30, "grad_clip=1e-30 must be at least 0.001"), ("fd_step", 2.0, "is more than 1"),
    ("steps", 100000, "is more than 1000"), ("epochs", 1e9, "is more than 1e+06"),
    ("batch_size", 2**30, "cannot be held in memory"), ("noise", "5", "larger than 1"),
    ("lambda_diff", "-1", "lambda_diff=-1 must not be negative"), ("free_replays", 10**6, "more than 1000"),
])
def test_out_of_range_values_are_refused_with_the_range_and_why(key: str, value: object, needle: str) -> None:
    with pytest.raises(IgamError, match="Choose a value in|larger than 1|must not be negative") as e:
        make_config(overrides={key: value})
    assert needle in str(e.value)


def test_every_default_lies_in_its_range_and_off_values_pass() -> None:
    from igam.config import RANGES

    cfg = Config()
    for key, r in RANGES.items():
        v = getattr(cfg, key)
        assert math.isfinite(v) and (r.off == v or (r.lo < v if r.lo_open else r.lo <= v)), key
    assert make_config(overrides={"grad_clip": 0, "momentum": 0.99}).momentum == 0.99


# ---------------------------------------------------------------------------------------------
# class 6: sizes, refused before any allocation with a value that fits
def test_threads_beyond_a_multiple_of_the_cpus_is_refused_before_the_run_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    args = [a for a in TINY if not a.startswith("threads")]
    _cli_error(capsys, ["train", *args, f"out_dir={tmp_path}", "name=t", "threads=100000"],
               "threads=100000", "2 CPU(s)", "Use threads=2", "at most 8")
    assert not (tmp_path / "t").exists()
    assert torch.get_num_threads() < 100000


def test_a_synthetic_dataset_too_large_to_make_is_refused_with_its_size(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """synthetic:512x512x16 asked 16.7 GB of images (84 GB while made) before train_subset applied."""
    def no_alloc(*a, **k):
        raise AssertionError("allocated before refusing")

    monkeypatch.setattr("igam.data.sources.torch.randn", no_alloc)
    args = [a for a in TINY if not a.startswith("dataset")]
    _cli_error(capsys, ["train", *args, "dataset=synthetic:512x512x16:10", "train_subset=10",
                        f"out_dir={tmp_path}", "name=s"], "GB to make", "synthetic:115x115x16:10")
    assert not (tmp_path / "s").exists()


def test_synthetic_images_do_not_depend_on_how_they_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Made a chunk at a time to bound memory, the images are exactly those made at once."""
    from igam.data import sources

    for name in ("synthetic:9x7x2:3", "synthetic:16x16x3:4"):
        monkeypatch.setattr(sources, "SYNTHETIC_CHUNK", 10**9)
        whole = sources.make_synthetic(name, n_train=300, n_test=70)
        monkeypatch.setattr(sources, "SYNTHETIC_CHUNK", 7)
        chunked = sources.make_synthetic(name, n_train=300, n_test=70)
        assert torch.equal(whole.x_train, chunked.x_train) and torch.equal(whole.x_test, chunked.x_test)
        assert torch.equal(whole.y_train, chunked.y_train)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("limits")
    assert main(["train", *TINY, f"out_dir={out}", "name=r"]) == 0
    return out / "r"


@pytest.mark.parametrize("argv,needles", [
    (["landscape", "RUN", "--index", "0", "--grid", "100000"], ["2 to 401 points", "--grid 401"]),
    (["gradients", "RUN", "--n", "100000"], ["n=100000", "--n 64 or fewer"]),
    (["report", "RUN", "--n", "100000"], ["--n=100000", "--n 64 or fewer"]),
    (["evaluate", "RUN", "--attacks", "pgd1000000000", "--n", "2"], ["up to 10000 steps", "pgd10000x1"]),
    (["evaluate", "RUN", "--attacks", "pgd10x100000", "--n", "2"], ["100 restarts", "pgd10x100"]),
    (["evaluate", "RUN", "--attacks", "square10000000000", "--n", "2"], ["up to 1,000,000"]),
    (["evaluate", "RUN", "--attacks", "fgsm", "--checks", "--check-queries", "100000000", "--n", "2"],
     ["--check-queries asks for 100000000"]),
])
def test_sizes_of_figures_and_attacks_are_refused_before_any_work(
        small_run: Path, capsys: pytest.CaptureFixture, argv: list[str], needles: list[str]) -> None:
    eval_json = small_run / "eval.json"
    before = eval_json.read_bytes() if eval_json.exists() else None
    _cli_error(capsys, [str(small_run) if a == "RUN" else a for a in argv], *needles)
    assert (eval_json.read_bytes() if eval_json.exists() else None) == before


def test_an_eps_sweep_and_an_experiment_sweep_have_bounded_lengths(tmp_path: Path) -> None:
    from igam.experiment.spec import MAX_STAGES
    from igam.sweeps import MAX_SWEEP

    radii = ",".join(f"{i}/1000" for i in range(1, MAX_SWEEP + 2))
    with pytest.raises(IgamError, match=f"{MAX_SWEEP + 1} radii"):
        parse_eps_sweep(radii, (3, 32, 32))
    assert len(parse_eps_sweep(",".join(radii.split(",")[:MAX_SWEEP]), (3, 32, 32))) == MAX_SWEEP
    f = tmp_path / "exp.yaml"
    values = ", ".join(str(1 + i) for i in range(40))
    f.write_text(f"stages:\n  - name: a\n    config: {{method: standard}}\n    sweep: {{seed: [{values}], "
                 f"width: [{values}]}}\n")
    with pytest.raises(IgamError, match=f"makes 1,600 stages \\(40 x 40 values\\).*up to {MAX_STAGES}"):
        load_experiment(f)
