"""What a researcher expects (issue 25): igam.load / igam.benchmark, progress on long work, --checks reusing
eval.json, readable `igam info`, threads and progress=false on evaluate, dataset required for training,
warnings once, miniature pictures marked, adapter=auto explained, teacher_width, legends on every panel."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import igam
from igam import progress
from igam.api import InputRangeWarning, spec_folder
from igam.attacks import PGD, AutoAttack
from igam.cli import main
from igam.config import make_config
from igam.errors import IgamError
from igam.evaluate import evaluate_model, evaluate_run, masking_report, run_attack
from igam.files import save_weights
from igam.models import create_model, normalization_metadata
from igam.records import reusable_record
from igam.train import train

QUIET = dict(progress=False, tensorboard=False, threads=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run on synthetic 8x8 colour images."""
    out = tmp_path_factory.mktemp("runs")
    return train(make_config(overrides=dict(QUIET, dataset="synthetic:8x8x3:4", model="small-cnn", width=4,
                                            train_subset=128, test_subset=64, epochs=1, batch_size=32,
                                            eval_n=32, out_dir=str(out), name="tiny")), log=lambda *a: None)


class Constant(nn.Module):
    """Logits that always favour class 0: an attack never breaks an image of class 0, so every pass runs."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(k))
        with torch.no_grad():
            self.bias[0] = 10.0

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


# --------------------------------------------------------------------------------------------- progress
def test_progress_spans_cap_and_jump() -> None:
    with progress.enabled(True), progress.bar(10, "t") as prog:
        with prog.span(4):
            prog.tick(9)  # capped at the span's end
            assert prog.n == 4
        with prog.span(3):
            prog.tick(1)
        assert prog.n == 7  # the span ended early: the bar jumped to its end
        prog.tick(100)
        assert prog.n == 10


def test_run_attack_shows_a_bar_on_stderr_unless_switched_off(capsys) -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=4, in_chans=1, input_size=8, width=4).eval()
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 4, (12,))
    run_attack(model, x, y, "pgd5", eps=0.1, batch_size=6, label="my pgd5")
    err = capsys.readouterr().err
    assert "my pgd5" in err and "/16" in err  # 2 batches x (5 steps + a scoring pass + 2 predictions)
    with progress.enabled(False):
        run_attack(model, x, y, "pgd5", eps=0.1, batch_size=6, label="my pgd5")
    assert "my pgd5" not in capsys.readouterr().err


@pytest.mark.parametrize("attack", [PGD(Constant(), 0.1, 0.02, 7, restarts=2)])
def test_igam_attack_passes_bound_the_forward_passes(attack) -> None:
    calls = []
    handle = attack.model.register_forward_hook(lambda *_: calls.append(1))
    attack(torch.rand(5, 1, 4, 4), torch.zeros(5, dtype=torch.long))
    handle.remove()
    assert len(calls) == attack.passes(5)


@pytest.mark.parametrize("component", ["apgd-ce", "apgd-t", "fab-t", "square"])
def test_autoattack_component_bound_holds_when_nothing_breaks(component) -> None:
    """pyautoattack's forward passes of each component (nothing broken, so every pass runs) stay within
    the bar's share, and reach most of it: the ETA is neither exceeded nor wildly pessimistic."""
    model = Constant()
    atk = AutoAttack(model, 8 / 255, components=[component], n_iter=4, n_queries=12, batch_size=4)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    atk(torch.rand(10, 3, 4, 4), torch.zeros(10, dtype=torch.long))
    handle.remove()
    bound = atk.passes(10)
    assert 0.8 * bound <= len(calls) <= bound


# --------------------------------------------------------------------------------------------- --checks
def test_checks_reuse_records_of_the_same_images_and_settings(run) -> None:
    """A check attack that eval.json already holds for the same first images, eps and settings is taken
    from there (and said); it equals what running it again gives."""
    model = igam.load(run)
    data = igam.evaluate.test_images("synthetic:8x8x3:4", None, 64)
    lines: list[str] = []
    with progress.enabled(False):
        res = evaluate_model(model, data.x_test, data.y_test, ["clean", "fgsm", "pgd10"], batch_size=16,
                             checks=True, check_n=32, check_queries=5, log=lines.append)
        fresh = masking_report(model, data.x_test[:32], data.y_test[:32], sweeps=True, queries=5,
                               batch_size=16, records={})
    said = [s for s in lines if "reused eval.json's" in s]
    assert len(said) == 2 and any("check fgsm" in s for s in said) and any("check pgd10" in s for s in said)
    obs = {o["name"]: o for o in res["masking_checks"]["observations"]}
    fresh_obs = {o["name"]: o for o in fresh["observations"]}
    for name in ("check:fgsm", "check:pgd10"):
        assert obs[name]["accuracy"] == fresh_obs[name]["accuracy"] and obs[name]["n"] == 32
    # a record on batches that do not line up with the first 32 images is not reused
    other_batches = {"fgsm": {**res["fgsm"], "batch_size": 24}}
    assert reusable_record(other_batches, _fgsm(model), 32, 16, 0, "eval") is None
    assert reusable_record({"fgsm": res["fgsm"]}, _fgsm(model), 32, 16, 0, "eval") is not None


def _fgsm(model):
    from igam.attacks import FGSM

    return FGSM(model, 8 / 255)


# --------------------------------------------------------------------------------------------- load
def test_load_a_run_folder_with_its_metadata_and_a_range_warning_once(run) -> None:
    model = igam.load(run)
    info = model.igam_info
    assert not model.training and (info.kind, info.dataset, info.input_shape) == ("run", "synthetic:8x8x3:4",
                                                                                (3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.rand(2, 3, 8, 8))  # [0, 1]: no warning
    with pytest.warns(InputRangeWarning, match=r"\[0, 1\].*fed values in \[.*, 255\]"):
        model(torch.rand(2, 3, 8, 8) * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.rand(2, 3, 8, 8) * 255)  # once


def test_load_a_shipped_teacher_and_a_weights_file(tmp_path) -> None:
    teacher = igam.load("igam:mnist-linf-0.3")
    assert (teacher.igam_info.dataset, teacher.igam_info.eps, teacher.igam_info.num_classes) == ("mnist", 0.3,
                                                                                               10)
    net = create_model("madry-mnist", num_classes=4, in_chans=1, input_size=28, width=8, normalize="none")
    save_weights(net, tmp_path / "w.safetensors", normalization_metadata(net))
    loaded = igam.load(tmp_path / "w.safetensors", model="madry-mnist", classes=4, in_shape="1x28x28",
                       width=8, dataset="mnist:0,1,2,3")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), net.eval()(x)) and loaded.igam_info.dataset == "mnist:0,1,2,3"
    with pytest.raises(IgamError, match="teacher_width=W"):  # trained at width 8, named at the default
        igam.load(tmp_path / "w.safetensors", model="madry-mnist", classes=4, in_shape="1x28x28")


def test_teacher_width_reaches_the_finetuned_teacher(tmp_path) -> None:
    net = create_model("small-cnn", num_classes=4, in_chans=3, input_size=8, width=6, normalize="none")
    save_weights(net, tmp_path / "t.safetensors", normalization_metadata(net))
    ft = train(make_config(overrides=dict(
        QUIET, method="finetune", teacher=str(tmp_path / "t.safetensors"), teacher_model="small-cnn",
        teacher_classes=4, teacher_in_shape="3x8x8", teacher_width=6, teacher_dataset="none",
        dataset="synthetic:8x8x3:4", train_subset=64, test_subset=32, epochs=1, batch_size=32, eval_n=32,
        out_dir=str(tmp_path), name="ft")), log=lambda *a: None)
    assert json.loads((ft / "meta.json").read_text())["model"]["teacher"]["width"] == 6


# --------------------------------------------------------------------------------------------- benchmark
def test_benchmark_any_module_with_records_and_a_folder(run, tmp_path) -> None:
    model = create_model("small-cnn", num_classes=4, in_chans=3, input_size=8, width=4).eval()
    with pytest.raises(IgamError, match="needs dataset="):
        igam.benchmark(model, attacks=["clean"], n=8)
    with pytest.raises(IgamError, match="takes 3x8x8 images"):
        igam.benchmark(igam.load(run), dataset="synthetic:16x16x3:4", attacks=["clean"], n=8, progress=False)
    res = igam.benchmark(model, "synthetic:8x8x3:4", "8/255", ["clean", "fgsm", "pgd5"], n=32,
                         out=tmp_path / "b", progress=False)
    saved = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert set(res.records) == {"clean", "fgsm", "pgd5"}
    assert {"clean", "fgsm", "pgd5", "masking_checks"} <= set(saved)
    assert res.robust <= min(res.records["fgsm"]["accuracy"], res.records["pgd5"]["accuracy"])
    text = str(res)
    assert "| Model | Clean | FGSM | PGD5 |" in text and "headline:" in text and "masking checks" in text
    assert res.path == tmp_path / "b" / "eval.json"


def test_benchmark_of_a_run_folder_writes_its_eval_json(run) -> None:
    res = igam.benchmark(str(run), attacks=["clean", "fgsm"], n=16, progress=False, threads=1)
    assert res.path == run / "eval.json" and res.dataset == "synthetic:8x8x3:4"
    assert json.loads((run / "eval.json").read_text())["fgsm"]["n"] == 16


def test_evaluate_a_shipped_teacher_by_name(real_data_dir, tmp_path, capsys) -> None:
    """`igam evaluate igam:NAME` re-checks the certificate with the tool itself, into OUT/igam-NAME."""
    rc = main(["evaluate", "igam:mnist-linf-0.3", "--attacks", "clean,fgsm", "--n", "50", "--out-dir",
               str(tmp_path), "--data-dir", str(real_data_dir), "progress=false", "threads=1"])
    out, err = capsys.readouterr()
    assert rc == 0 and "| igam:mnist-linf-0.3 |" in out and "its certificate: clean 99.30" in out
    folder = spec_folder("igam:mnist-linf-0.3", tmp_path)
    assert folder.name == "igam-mnist-linf-0.3" and (folder / "eval.json").exists() and str(folder) in err
    assert main(["info", str(folder)]) == 0 and "| igam-mnist-linf-0.3 |" in capsys.readouterr().out


def test_evaluate_takes_threads_and_progress_false(run, capsys) -> None:
    assert main(["evaluate", str(run), "attacks=clean,fgsm", "n=16", "threads=1", "progress=false"]) == 0
    err = capsys.readouterr().err
    assert "pass/s" not in err and "fgsm" in err
    assert main(["evaluate", str(run), "--threads", "-1"]) == 2
    assert "must not be negative" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- info
def test_info_prints_tables_and_json_keeps_the_machine_form(run, capsys) -> None:
    with progress.enabled(False):
        evaluate_run(run, ["clean", "fgsm", "pgd5"], n=16)
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| Model | Clean | FGSM | PGD5 |" in out and "| tiny |" in out and "headline: tiny:" in out
    assert max(len(line) for line in out.splitlines()) < 400  # no one-line JSON dump
    assert main(["info", str(run), "--json"]) == 0
    assert "pgd5" in json.loads(capsys.readouterr().out)["eval"]
    assert main(["info", "igam:mnist-linf-0.3"]) == 0
    out = capsys.readouterr().out
    assert "| igam:mnist-linf-0.3 | 99.30 |" in out and "| sha256 |" in out and "{'" not in out


# --------------------------------------------------------------------------------------------- training
def test_training_needs_a_dataset(tmp_path, capsys) -> None:
    assert main(["train", "epochs=1", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "dataset= is required" in err and "dataset=synthetic" in err and not list(tmp_path.iterdir())
    bad = tmp_path / "x.yaml"
    bad.write_text("stages:\n  - name: a\n    config: {method: standard}\n")
    from igam.experiment import load_experiment

    with pytest.raises(IgamError, match="Stage 'a' .* has no dataset"):
        load_experiment(bad)


def test_a_weak_teacher_is_reported_once(run, tmp_path, capsys) -> None:
    from igam.teachers import frozen_teacher

    ft = train(make_config(overrides=dict(
        QUIET, method="finetune", teacher=str(run), dataset="synthetic:8x8x3:4", train_subset=64,
        test_subset=32, epochs=0.5, batch_size=32, eval_n=32, finetune_lr=0.01, out_dir=str(tmp_path),
        name="ft")),
        log=lambda *a: None)
    metrics = json.loads((ft / "metrics.json").read_text())
    metrics["final"]["clean_acc"] = 0.0  # as weak as can be
    (ft / "metrics.json").write_text(json.dumps(metrics))
    said: list[str] = []
    for _ in range(3):
        frozen_teacher(ft, (3, 8, 8), 4, log=said.append)
    assert len([s for s in said if "WARNING" in s]) == 1


def test_adapter_auto_says_what_it_chose(capsys) -> None:
    from igam.teachers import finetune_model

    said: list[str] = []
    body = create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28, width=4)
    finetune_model(body, (3, 32, 32), 10, "auto", log=said.append)
    assert said and "adapter=auto chose gray+crop for the 3x32x32 target and the 1x28x28 teacher" in said[0]
    said.clear()
    finetune_model(create_model("madry-mnist", num_classes=10, in_chans=1, input_size=28, width=4),
                   (3, 32, 32), 10, "gray+crop28", log=said.append)
    assert said == []


# --------------------------------------------------------------------------------------------- pictures
def test_miniature_pictures_say_smoke_test() -> None:
    from matplotlib.figure import Figure

    from igam.experiment.spec import MINIATURE_TAG, Experiment, mark_smoke_test

    for mini in (False, True):
        ax = Figure().add_subplot()
        ax.set_title("x")
        mark_smoke_test(ax, Experiment("e", Path("."), [], [], miniature=mini))
        texts = [t.get_text() for t in ax.texts]
        assert (ax.get_title() == "x" + MINIATURE_TAG and any("SMOKE TEST" in t for t in texts)) is mini


def test_every_landscape_panel_has_its_legend() -> None:
    import numpy as np

    from igam.report.landscape import Landscape, landscape_figure

    eps = np.linspace(-0.1, 0.1, 5)
    lands = [(f"run{i}", Landscape(eps, np.random.rand(5, 5), np.full((5, 5), i), 0, 3)) for i in range(3)]
    fig = landscape_figure(lands, ["a", "b", "c"])
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3


def test_evaluate_a_robustbench_name_without_its_weights_says_where_they_go(tmp_path, capsys) -> None:
    rc = main(["evaluate", "robustbench:cifar10/Linf/Standard", "--out-dir", str(tmp_path / "out"),
               "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and (
        "No weights for robustbench:cifar10/Linf/Standard" in err or "pip install" in err), err
    assert not (tmp_path / "out").exists()  # nothing written for a model that did not load
