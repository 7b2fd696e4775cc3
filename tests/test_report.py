"""Pictures and reports (igam.report): gradient grids (paper Figs. 1, 4), loss landscapes (Fig. 7),
training curves and the self-contained HTML report, on tiny runs trained on the fly."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igam.cli import main
from igam.config import make_config
from igam.errors import IgamError
from igam.models import create_model
from igam.report import (
    gradient_grid,
    input_gradients,
    loss_landscape,
    plot_curves,
    scale_gradients,
    write_report,
)
from igam.report.common import DPI, default_eps_max, load_test_images
from igam.report.curves import plan_panels
from igam.report.gradients import gradient_figure, grid_figsize
from igam.report.html import markdown
from igam.runs import load_run_model, read_log
from igam.train import train

DATASET = "synthetic:16x16x3:4"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny finished runs: different architectures and seeds, same data."""
    root = tmp_path_factory.mktemp("runs")
    out = []
    for name, model, seed in (("std-a", "small-cnn", 0), ("std-b", "small-cnn-bn", 1)):
        cfg = make_config(overrides=dict(dataset=DATASET, model=model, width=8, epochs=0.3, out_dir=str(root),
                                         name=name, seed=seed, progress=False, eval_n=100, tensorboard=False,
                                         log_every=2, threads=1))
        out.append(train(cfg, log=lambda *a, **k: None))
    return out[0], out[1]


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def check_png(path: Path, min_bytes: int = 5000) -> np.ndarray:
    assert path.exists() and path.stat().st_size > min_bytes, path
    return png_pixels(path)


def fake_igam_run(src: Path, dst: Path) -> Path:
    """A copy of a run whose logs carry the IGAM columns and a robust-accuracy column, plus an eval.json."""
    shutil.copytree(src, dst)
    keys = ["step", "ce", "acc", "l_adv", "l_diff", "disc_loss", "disc_acc_student", "disc_acc_teacher",
            "cos_js_jt", "js_norm", "jt_norm", "lr", "epoch"]
    with open(dst / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for s in range(1, 11):
            w.writerow([s, 1.5 / s, 0.1 * s, 0.7, 0.5 / s, 1.3, 0.6, 0.55, 0.1 * s, 0.01, 0.003, 0.1, s / 10])
    with open(dst / "eval_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "clean_acc", "pgd10_acc"])
        w.writerows([[5, 0.5, 0.4, 0.1], [10, 1.0, 0.6, 0.2]])
    (dst / "eval.json").write_text(json.dumps({
        "clean": {"accuracy": 0.61, "n": 100, "seed": 0, "bn": "eval", "eps": None, "time_s": 0.1,
                  "attack": {"attack": "clean"}},
        "pgd10": {"accuracy": 0.2, "n": 100, "seed": 0, "bn": "eval", "eps": 8 / 255, "time_s": 1.0,
                  "attack": {"attack": "pgd", "steps": 10, "step_size": 2 / 255, "restarts": 1}},
        "masking_checks": {"passed": False, "failed": ["gradients"], "eps": 8 / 255, "check_n": 100,
                           "checks": {"fgsm_vs_pgd": {"passed": True, "detail": "within noise"},
                                      "gradients": {"passed": False, "detail": "<b>zero</b> gradients"},
                                      "eps_monotone": {"passed": None, "detail": "not run"}},
                           "observations": [{"name": "pgd10", "eps": 8 / 255, "accuracy": 0.2}]}}))
    meta = json.loads((dst / "meta.json").read_text())
    meta["method"] = "igam"
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


# ---------------------------------------------------------------------------------------------
# gradients (Figs. 1, 4)
def test_input_gradients_match_autograd_and_leave_model_alone():
    torch.manual_seed(0)
    model = create_model("small-cnn-bn", num_classes=4, in_chans=3, input_size=16, width=4).train()
    x, y = torch.rand(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    g, pred = input_gradients(model, x, y)
    model.eval()
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(xr), y, reduction="sum").backward()
    assert torch.allclose(g, xr.grad, atol=1e-6)
    assert pred.shape == (5,)
    model.zero_grad(set_to_none=True)
    model.train()
    input_gradients(model, x, y)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_scale_gradients_symmetric_around_grey():
    g = torch.tensor([[[[-2.0, 0.0], [1.0, 4.0]]]])
    s = scale_gradients(g, percentile=100)
    assert torch.allclose(s, torch.tensor([[[[0.25, 0.5], [0.625, 1.0]]]]))
    assert float(scale_gradients(torch.zeros(1, 3, 4, 4)).unique()) == 0.5
    s = scale_gradients(torch.randn(3, 3, 8, 8), percentile=90)
    assert s.min() >= 0 and s.max() <= 1
    with pytest.raises(IgamError, match="percentile"):
        scale_gradients(g, percentile=0)


def test_gradient_grid_library_pictures_differ_per_model(runs, tmp_path):
    sample = load_test_images(runs[0], n=4, seed=0)
    assert sample.x.shape == (4, 3, 16, 16) and float(sample.x.min()) >= 0 and float(sample.x.max()) <= 1
    pics = []
    for i, run in enumerate(runs):
        path = gradient_grid({"model": load_run_model(run)}, sample.x, sample.y, sample.class_names,
                             tmp_path / f"g{i}.png", indices=sample.index)
        pix = check_png(path)
        w, h = grid_figsize(4, ["model"], True, "Input gradients (cf. paper Figs. 1 and 4)",
                            "x" * 200)  # the footnote wraps the same way for the same width
        assert abs(pix.shape[1] - w * DPI) <= 1  # matplotlib truncates to whole pixels
        assert abs(pix.shape[0] - round(h * DPI)) <= 2 * DPI  # footnote height is estimated above
        pics.append(pix)
    assert pics[0].shape == pics[1].shape and (pics[0] != pics[1]).any()


def test_gradient_grid_grey_and_sizes(tmp_path):
    torch.manual_seed(0)
    models = {f"m{i}": create_model("small-cnn", num_classes=3, in_chans=1, input_size=12, width=4)
              for i in range(3)}
    x, y = (torch.rand(2, 1, 12, 12) * 255).to(torch.uint8), torch.tensor([0, 2])
    fig = gradient_figure(models, x, y, ["zero", "one", "two"], title=None)
    w, h = fig.get_size_inches()
    path = gradient_grid(models, x, y, ["zero", "one", "two"], tmp_path / "grey.png", title=None, pdf=True)
    pix = check_png(path, 2000)
    assert abs(pix.shape[0] - h * DPI) <= 1 and abs(pix.shape[1] - w * DPI) <= 1
    assert path.with_suffix(".pdf").stat().st_size > 1000
    wider = gradient_figure({**models, "m3": models["m0"]}, x, y, ["zero", "one", "two"], title=None)
    taller = gradient_figure(models, x.repeat(2, 1, 1, 1), y.repeat(2), ["zero", "one", "two"], title=None)
    assert wider.get_size_inches()[0] > w and taller.get_size_inches()[1] > h
    with pytest.raises(IgamError, match="share their classes"):
        gradient_figure(models, x, torch.tensor([0, 5]), ["a"] * 6)


def test_gradients_cli(runs, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["gradients", str(runs[0]), str(runs[1]), "--n", "3", "--out", str(out), "--pdf",
                 "--seed", "1"]) == 0
    check_png(out)
    assert out.with_suffix(".pdf").exists()
    assert main(["gradients", str(runs[0]), "--out", str(tmp_path / "g.jpg")]) == 2


def test_gradients_refuse_different_input_shapes(runs, tmp_path, capsys):
    grey = shutil.copytree(runs[0], tmp_path / "grey-run")
    meta = json.loads((grey / "meta.json").read_text())
    meta["data"]["shape"] = [1, 16, 16]
    (grey / "meta.json").write_text(json.dumps(meta))
    assert main(["gradients", str(runs[0]), str(grey), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "different input shapes" in err and "3x16x16" in err and "1x16x16" in err


# ---------------------------------------------------------------------------------------------
# landscape (Fig. 7)
def test_default_eps_max():
    assert default_eps_max((1, 28, 28)) == 0.6
    assert default_eps_max([3, 32, 32]) == pytest.approx(16 / 255)


def test_loss_landscape_grid(runs):
    model = load_run_model(runs[0])
    sample = load_test_images(runs[0], indices=[7])
    land = loss_landscape(model, sample.x[0], int(sample.y[0]), eps_max=0.05, n=5)
    assert land.loss.shape == land.pred.shape == (5, 5) and land.num_classes == 4
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(sample.x), sample.y)
    assert land.loss[2, 2] == pytest.approx(float(ce), rel=1e-4)  # the centre is the clean image
    assert land.loss[2, -1] >= land.loss[2, 2] - 1e-6  # the gradient-sign direction raises the loss
    with pytest.raises(IgamError):
        loss_landscape(model, sample.x[0], 0, eps_max=0.0)


def test_landscape_cli_one_and_two_runs(runs, tmp_path):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["landscape", str(runs[0]), "--index", "3", "--grid", "7", "--out", str(one)]) == 0
    assert main(["landscape", str(runs[0]), str(runs[1]), "--index", "3", "--grid", "7", "--eps", "8/255",
                 "--out", str(two)]) == 0
    p1, p2 = check_png(one, 20000), check_png(two, 20000)
    assert abs(p1.shape[0] - 5.6 * DPI) <= 1 and abs(p1.shape[1] - 12 * DPI) <= 1
    assert p2.shape != p1.shape
    other = tmp_path / "other.png"
    assert main(["landscape", str(runs[1]), "--index", "3", "--grid", "7", "--out", str(other)]) == 0
    p3 = check_png(other, 20000)
    assert p3.shape == p1.shape and (p3 != p1).any()
    assert main(["landscape", str(runs[0]), "--index", "100000", "--out", str(tmp_path / "x.png")]) == 2


# ---------------------------------------------------------------------------------------------
# curves
def test_curves_only_present_columns(runs, tmp_path):
    std = plan_panels([read_log(runs[0])], [read_log(runs[0], "eval_log.csv")])
    titles = [p.title for p in std]
    assert "Training cross-entropy" in titles and not any("Discriminator" in t for t in titles)
    fake = fake_igam_run(runs[0], tmp_path / "igam-fake")
    panels = plan_panels([read_log(fake)], [read_log(fake, "eval_log.csv")])
    cols = {c for p in panels for c in p.columns}
    assert {"l_adv", "l_diff", "disc_loss", "disc_acc_student", "eval:clean_acc", "eval:pgd10_acc"} <= cols
    one = check_png(plot_curves([fake], tmp_path / "c1.png"))
    both = check_png(plot_curves([runs[0], runs[1], fake], tmp_path / "c3.png", pdf=True))
    assert (tmp_path / "c3.pdf").exists() and one.shape != both.shape


# ---------------------------------------------------------------------------------------------
# HTML report
def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    assert "<link" not in text and "<script" not in text and "@import" not in text
    srcs = re.findall(r'src="([^"]{0,30})', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_report_of_a_run(runs, tmp_path):
    run = fake_igam_run(runs[1], tmp_path / "igam-run")
    path = write_report(run, log=lambda s: None)
    assert path == run / "report.html"
    text = path.read_text()
    assert_self_contained(text)
    pngs = embedded_pngs(text)
    assert len(pngs) == 2 and all(p[:8] == b"\x89PNG\r\n\x1a\n" and len(p) > 5000 for p in pngs)
    for needle in ("Evaluation", "PGD10", "20.00", "Gradient-masking checks", "Training curves",
                   "Input gradients", "Configuration", "small-cnn-bn", "&lt;b&gt;zero&lt;/b&gt;"):
        assert needle in text, needle
    assert "<b>zero</b>" not in text  # text from files is escaped


def test_report_of_an_experiment_and_cli(runs, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    for r in runs:
        shutil.copytree(r, exp / r.name)
    fake_igam_run(runs[0], exp / "igam-fake")
    unfinished = shutil.copytree(runs[1], exp / "unfinished")
    (unfinished / "model.safetensors").unlink()
    Image.new("RGB", (40, 30), "white").save(exp / "tradeoff.png")
    (exp / "results.md").write_text("# Results\n\n| Model | PGD10 |\n|---|---|\n| igam | 20.0 ± 1.0 |\n")
    out = tmp_path / "exp-report.html"
    assert main(["report", str(exp), "--out", str(out), "--n", "3"]) == 0
    text = out.read_text()
    assert_self_contained(text)
    assert len(embedded_pngs(text)) == 3  # tradeoff.png, overlaid curves, one gradient grid of all runs
    assert "tradeoff.png" in text
    for needle in ("std-a", "std-b", "igam-fake", "20.0 ± 1.0", "1/2 passed", "Runs",
                   "No model.safetensors yet for: unfinished"):
        assert needle in text, needle
    assert main(["report", str(runs[0]), "--no-gradients"]) == 0
    assert len(embedded_pngs((runs[0] / "report.html").read_text())) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(IgamError, match="neither a run directory"):
        write_report(tmp_path / "empty")
    with pytest.raises(IgamError, match=r"\.html"):
        write_report(runs[0], tmp_path / "report.txt")


def test_markdown_subset():
    html = markdown("# T\n\nsome `code` and **bold** <x>\n\n| a | b |\n|---|---:|\n| 1 | x |\n\n"
                    "- one\n- two\n")
    assert '<h3 id="t">T</h3>' in html and "<code>code</code>" in html and "<strong>bold</strong>" in html
    assert "&lt;x&gt;" in html and "<x>" not in html and ">1</td>" in html and html.count("<li>") == 2


def test_model_info_json_in_robustbench_format(tmp_path: Path) -> None:
    """RobustBench's model-info record from eval.json: every key RobustBench's files carry, percentages with
    two decimals, eps as k/255, `reported` the paper's figure (null here; igam's worst case apart),
    autoattack_acc only from the reference AutoAttack, additional_data from the teacher chain."""
    from igam.files import read_json, write_json
    from igam.report.modelinfo import model_info, write_model_info

    run = tmp_path / "r"
    run.mkdir()
    write_json(run / "meta.json", {"status": "finished", "method": "igam", "seed": 0,
                                   "model": {"name": "resnet20", "num_classes": 10, "in_chans": 3,
                                             "input_size": [32, 32]},
                                   "data": {"dataset": "cifar10", "shape": [3, 32, 32], "num_classes": 10}})
    with pytest.raises(IgamError, match="no eval.json"):
        model_info(run)
    eps = 8 / 255
    ev = {"clean": {"accuracy": 0.9123, "n": 500},
          "pgd20": {"accuracy": 0.41, "n": 500, "eps": eps, "attack": {"attack": "pgd"}},
          "fgsm": {"accuracy": 0.55, "n": 500, "eps": eps, "attack": {"attack": "fgsm"}},
          "pgd20@eps=4/255": {"accuracy": 0.6, "n": 500, "eps": 4 / 255}}
    write_json(run / "eval.json", ev)
    info = model_info(run)
    assert (info["clean_acc"], info["reported"], info["eps"], info["autoattack_acc"]) == ("91.23", None,
                                                                                         "8/255", None)
    assert info["igam"]["worst_case_acc"] == "41.00"  # (fgsm's bits are absent: the lowest accuracy)
    assert "pgd20" in info["footnote"] and "autoattack_acc is null" in info["footnote"]
    robustbench_keys = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
                        "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}
    assert robustbench_keys <= set(info)
    ev["autoattack"] = {"accuracy": 0.385, "n": 500, "eps": eps,
                        "attack": {"library": "pyautoattack", "version": "standard"}}
    write_json(run / "eval.json", ev)
    path = write_model_info(run, name="my-igam")
    info = read_json(path)
    assert (info["name"], info["autoattack_acc"], info["igam"]["worst_case_acc"]) == ("my-igam", "38.50",
                                                                                     "38.50")
    assert model_info(run, reported=40.1)["reported"] == "40.10"  # the paper's figure, when given
    assert info["additional_data"] is False  # no teacher
    # an IGAM student of a teacher fine-tuned from the shipped MNIST teacher: robustness from other data
    ft = tmp_path / "ft"
    ft.mkdir()
    write_json(ft / "meta.json", {"status": "finished", "method": "finetune",
                                  "teacher": "igam:mnist-linf-0.3",
                                  "model": {"name": "madry-mnist", "num_classes": 10, "in_chans": 1,
                                            "input_size": [28, 28]},
                                  "data": {"dataset": "cifar10", "shape": [3, 32, 32], "num_classes": 10}})
    meta = read_json(run / "meta.json")
    write_json(run / "meta.json", {**meta, "teacher": str(ft)})
    info = model_info(run)
    assert info["additional_data"] is True
    assert info["igam"]["teacher_chain"] == [str(ft), "igam:mnist-linf-0.3"]
    assert "from the teacher igam:mnist-linf-0.3" in info["footnote"]
    assert "trained on mnist" in info["footnote"]
    assert model_info(run, additional_data=False)["additional_data"] is False
