"""Robustness curves (`igam evaluate --eps-sweep`), per-class accuracy in eval.json, RobustBench's admission
checks (deterministic forward, non-zero gradients, no optimisation at inference) and their place in the
report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igam.attacks.admission import ADMISSION_CHECKS, admission_checks
from igam.attacks.checks import CHECKS, Observation, run_checks
from igam.cli import main
from igam.errors import IgamError
from igam.evaluate import masking_report
from igam.models import create_model
from igam.records import per_class_accuracy
from igam.runs import Run
from igam.sweeps import parse_eps_sweep

SWEEP = "1/255,2/255,4/255,8/255,16/255"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny finished run on synthetic 3x8x8 data with 4 classes (colour conventions: eps 8/255, large eps
    64/255); trained enough that its accuracy falls gradually over the sweep."""
    from igam.config import make_config
    from igam.train import train

    out = tmp_path_factory.mktemp("curves")
    return train(make_config(overrides={
        "dataset": "synthetic:8x8x3:4", "model": "small-cnn", "width": 4, "epochs": 3, "train_subset": 256,
        "batch_size": 32, "eval_n": 16, "lr": 0.01, "optimizer": "adam", "progress": False,
        "tensorboard": False, "out_dir": str(out), "name": "tiny"}), log=lambda *a: None)


def _copy(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _wrap_loaded_model(monkeypatch, wrapper) -> None:
    """Runs load their model wrapped in `wrapper` (a defence that breaks an admission or masking rule)."""
    real = Run.load_model
    monkeypatch.setattr(Run, "load_model", lambda self, device="cpu": wrapper(real(self, device)))


# ---------------------------------------------------------------------------------------------
# models that break RobustBench's admission rules
class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


class Dropout(Wrapped):  # dropout left on at inference: random
    def forward(self, x):
        return self.inner(F.dropout(x, 0.3, training=True))


class Noise(Wrapped):  # Gaussian noise on the input: random
    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


class Quantised(Wrapped):  # input rounded to 5 grey levels: zero input gradients everywhere
    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class Detached(Wrapped):  # the input detached from the graph: no input gradient at all
    def forward(self, x):
        return self.inner(x.detach())


class Purify(Wrapped):  # gradient descent on the input inside forward (a purification defence)
    def forward(self, x):
        with torch.enable_grad():
            delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(3):
                energy = -torch.logsumexp(self.inner(x.detach() + delta), 1).sum()
                g, = torch.autograd.grad(energy, delta)
                delta = (delta - 0.01 * g.sign()).detach().requires_grad_(True)
        return self.inner(x + delta.detach())  # differentiable in x (as BPDA would attack it)


class Adapt(Wrapped):  # test-time adaptation (TENT): entropy minimisation on every batch
    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.opt = torch.optim.SGD(self.inner.parameters(), lr=0.1)

    def forward(self, x):
        with torch.enable_grad():
            p = self.inner(x).softmax(1)
            self.opt.zero_grad()
            (-(p * p.clamp_min(1e-12).log()).sum(1).mean()).backward()
            self.opt.step()
        return self.inner(x)


class GradAware(Wrapped):  # another function when differentiated than when scored
    def forward(self, x):
        out = self.inner(x)
        return out * 1e-3 if x.requires_grad else out


def _zoo_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_chans=3, input_size=16, width=1)


CASES = [  # (wrapper, the checks it must fail, those it may fail too)
    (None, set(), set()),
    (Dropout, {"deterministic"}, set()),
    (Noise, {"deterministic"}, set()),
    (GradAware, {"deterministic"}, set()),
    (Quantised, {"gradients"}, set()),
    (Detached, {"gradients"}, set()),
    (Purify, {"no_inference_optimisation"}, set()),
    (Adapt, {"no_inference_optimisation"}, {"deterministic"}),  # its output changes unless the steps vanish
]


@pytest.mark.parametrize("wrapper, fails, may_fail", CASES,
                         ids=[c[0].__name__ if c[0] else "zoo" for c in CASES])
def test_admission_checks_fail_exactly_the_broken_rule(wrapper, fails, may_fail) -> None:
    """A plain zoo model (resnet20, with BatchNorm buffers) passes RobustBench's three rules; each defence
    fails the rule it breaks, and only that one. The checks leave the model's parameters and buffers as
    they were."""
    model = _zoo_model()
    if wrapper is not None:
        model = wrapper(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, 3, 16, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    mc = masking_report(model, x, y, sweeps=False)
    checks = mc["checks"]
    assert set(checks) == set(CHECKS)
    rules = {"gradients", *ADMISSION_CHECKS}
    failed = {k for k in rules if checks[k]["passed"] is False}
    assert fails <= failed <= fails | may_fail, {k: checks[k] for k in rules}
    assert all(checks[k]["passed"] is True for k in rules - failed)
    assert set(mc["failed"]) == failed and mc["passed"] is (not failed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = admission_checks(model, x)  # the checks alone, as masking_report runs them
    assert {k: v["passed"] for k, v in again.items()} == {k: checks[k]["passed"] for k in ADMISSION_CHECKS}
    after = model.state_dict()  # even a model that adapts is put back as it was
    assert all(torch.equal(before[k], after[k]) for k in before)
    if wrapper is Purify:
        assert "torch.autograd.grad" in checks["no_inference_optimisation"]["detail"]
    if wrapper is Adapt:
        assert "changed" in checks["no_inference_optimisation"]["detail"]
        assert checks["no_inference_optimisation"]["changed"]
    if wrapper is GradAware:
        assert "autograd on" in checks["deterministic"]["detail"]
    if wrapper in (Dropout, Noise):
        det = checks["deterministic"]
        assert det["max_diff"] > 0 and "autoattack-rand" in det["detail"]


def test_a_failing_admission_check_is_a_warning_and_strict_exits_1(run_dir, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    run = _copy(run_dir, tmp_path)
    _wrap_loaded_model(monkeypatch, Dropout)
    assert main(["evaluate", str(run), "--attacks", "clean", "--n", "16"]) == 0
    captured = capsys.readouterr()
    assert "masking checks: FAIL: deterministic" in captured.out
    assert "WARNING" in captured.err and "FAIL deterministic" in captured.err and "admission" in captured.err
    mc = json.loads((run / "eval.json").read_text())["masking_checks"]
    assert mc["checks"]["deterministic"]["passed"] is False and mc["failed"] == ["deterministic"]
    assert mc["checks"]["no_inference_optimisation"]["passed"] is True
    assert main(["evaluate", str(run), "--attacks", "clean", "--n", "16", "--strict"]) == 1


# ---------------------------------------------------------------------------------------------
# robustness curves
def test_eps_sweep_writes_the_curve_json_png_and_prints_its_table(run_dir, tmp_path, capsys) -> None:
    run = _copy(run_dir, tmp_path)
    rc = main(["evaluate", str(run), "--attacks", "clean,pgd10,fgsm", "--eps-sweep", SWEEP, "--n", "96",
               "--batch-size", "48"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "| Model | eps | PGD10 | FGSM | worst case (PGD10, FGSM) |" in captured.out
    assert "| copy | 0 (clean) |" in captured.out and "| copy | 16/255 |" in captured.out
    assert "below 64/255" in captured.out  # the sweep stops short of the large eps: said, not judged
    curve = json.loads((run / Run.CURVE).read_text())
    radii = [v for _, v in parse_eps_sweep(SWEEP, (3, 8, 8))]
    assert curve["eps"] == [0.0, *radii] and curve["eps_text"] == ["0", *SWEEP.split(",")]
    assert [c["attack"] for c in curve["curves"]] == ["pgd10", "fgsm", "worst case"]
    ev = json.loads((run / "eval.json").read_text())
    for c in curve["curves"]:
        assert [p["eps"] for p in c["points"]] == curve["eps"]  # one point per eps, clean at 0
        assert c["points"][0]["accuracy"] == ev["clean"]["accuracy"]
    pgd = [p["accuracy"] for p in curve["curves"][0]["points"]]
    assert all(b <= a for a, b in zip(pgd, pgd[1:])), pgd  # non-increasing in eps
    assert pgd[-1] < pgd[0], "the sweep should bite on this model"
    for t, v in zip(curve["eps_text"][1:], radii):
        assert ev[f"pgd10@eps={t}"]["eps"] == pytest.approx(v)
        point = curve["curves"][0]["points"][radii.index(v) + 1]
        assert point["key"] == f"pgd10@eps={t}" and point["accuracy"] == ev[point["key"]]["accuracy"]
    worst = curve["curves"][2]["points"]
    for i, p in enumerate(worst):  # per image over both attacks: never above either
        assert p["accuracy"] <= min(c["points"][i]["accuracy"] for c in curve["curves"][:2])
    assert curve["checks"]["eps_monotone"]["passed"] is True
    assert curve["checks"]["large_eps_zero"]["passed"] is None
    import matplotlib.image as mpimg

    img = mpimg.imread(run / Run.CURVE_PNG)  # a real picture: lines in several colours, not a blank canvas
    assert img.ndim == 3 and len(torch.from_numpy(img[..., :3].reshape(-1, 3)).unique(dim=0)) > 20


def test_per_class_accuracy_is_consistent_with_the_overall_accuracy(run_dir, tmp_path) -> None:
    from igam.evaluate import evaluate_run

    run = _copy(run_dir, tmp_path)
    res = evaluate_run(run, ["clean", "pgd10"], n=96, batch_size=96, eps_sweep="2/255,8/255")
    records = {k: r for k, r in res.items() if k not in ("masking_checks", "eps_sweep")}
    assert set(records) == {"clean", "pgd10@eps=2/255", "pgd10@eps=8/255"}
    for key, rec in records.items():
        pc = rec["per_class"]
        assert len(pc["accuracy"]) == len(pc["count"]) == 4 and sum(pc["count"]) == rec["n"] == 96
        present = [(a, c) for a, c in zip(pc["accuracy"], pc["count"]) if c]
        assert sum(round(a * c) for a, c in present) == round(rec["accuracy"] * 96), key  # correct images
        assert sum(a * c for a, c in present) / 96 == pytest.approx(rec["accuracy"], rel=1e-6), key
        assert pc["mean"] == pytest.approx(sum(a for a, _ in present) / len(present))
        assert pc["worst"] == min(a for a, _ in present) == pc["accuracy"][pc["worst_class"]]
        assert pc["worst"] <= rec["accuracy"] <= max(a for a, _ in present)
        assert pc["classes"] == ["class0", "class1", "class2", "class3"]
    saved = json.loads((run / "eval.json").read_text())
    assert saved["pgd10@eps=8/255"]["per_class"] == records["pgd10@eps=8/255"]["per_class"]


def test_per_class_accuracy_counts_each_class_and_refuses_foreign_labels() -> None:
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    ok = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    pc = per_class_accuracy(ok, y, num_classes=4, class_names=["a", "b", "c", "d"])
    assert pc["count"] == [2, 3, 0, 1] and pc["accuracy"][2] is None  # a class without images has none
    assert pc["accuracy"][0] == 0.5 and pc["accuracy"][1] == pytest.approx(2 / 3) and pc["accuracy"][3] == 1.0
    assert pc["worst_class"] == 0 and pc["mean"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    with pytest.raises(IgamError, match="outside the 3 classes"):
        per_class_accuracy(ok, y, num_classes=3)
    with pytest.raises(IgamError, match="one per image"):
        per_class_accuracy(ok[:3], y)


def test_large_in_the_sweep_catches_masking_that_small_radii_miss(run_dir, tmp_path, monkeypatch,
                                                                 capsys) -> None:
    """Quantised inputs leave PGD without a gradient: accuracy stays put at every radius. Up to 16/255 a
    flat curve could be real robustness; at the large eps (64/255 for colour) it cannot, and the sweep's
    large_eps_zero verdict fails (a WARNING; --strict exits 1)."""
    run = _copy(run_dir, tmp_path)
    _wrap_loaded_model(monkeypatch, Quantised)
    rc = main(["evaluate", str(run), "--attacks", "pgd10", "--eps-sweep", "4/255,16/255,large", "--n", "64",
               "--strict"])
    captured = capsys.readouterr()
    assert rc == 1
    curve = json.loads((run / Run.CURVE).read_text())
    assert curve["eps_text"] == ["0", "4/255", "16/255", "64/255"]
    assert curve["large_eps"] == pytest.approx(64 / 255)
    assert curve["checks"]["large_eps_zero"]["passed"] is False
    assert "pgd10@eps=64/255" in curve["checks"]["large_eps_zero"]["detail"]
    assert "FAIL large_eps_zero" in captured.err and "sweep check large_eps_zero: FAIL" in captured.out
    assert [c["attack"] for c in curve["curves"]] == ["pgd10"]  # one attack: no worst-case curve


def test_checks_add_the_large_eps_to_a_sweep(run_dir, tmp_path) -> None:
    from igam.evaluate import evaluate_run

    run = _copy(run_dir, tmp_path)
    res = evaluate_run(run, ["pgd5"], n=32, batch_size=32, eps_sweep="8/255", checks=True, check_n=16,
                       check_queries=10)
    assert res["eps_sweep"]["eps_text"] == ["0", "8/255", "64/255"]
    assert "pgd5@eps=64/255" in res and res["eps_sweep"]["checks"]["large_eps_zero"]["passed"] is not None


def test_sweep_checks_compare_one_attack_across_eps() -> None:
    """Any attack's sweep points (eval.json keys NAME@eps=...) must not rise with eps, and a sweep that
    reaches the large eps must reach about 0% there; one that stops short says how to check it."""

    def aa(eps: float, acc: float, n: int = 500) -> Observation:
        return Observation(f"autoattack@eps={eps}", "autoattack", eps, acc, n)

    rising = run_checks([aa(2 / 255, 0.40), aa(4 / 255, 0.30), aa(8 / 255, 0.45)], 8 / 255, 64 / 255)
    assert rising["eps_monotone"]["passed"] is False and "autoattack" in rising["eps_monotone"]["detail"]
    short = run_checks([aa(2 / 255, 0.40), aa(16 / 255, 0.10)], 8 / 255, 64 / 255)
    assert short["eps_monotone"]["passed"] is True
    assert short["large_eps_zero"]["passed"] is None and "--eps-sweep" in short["large_eps_zero"]["detail"]
    flat = run_checks([aa(8 / 255, 0.40), aa(64 / 255, 0.30)], 8 / 255, 64 / 255)
    assert flat["large_eps_zero"]["passed"] is False
    zero = run_checks([aa(8 / 255, 0.40), aa(64 / 255, 0.0)], 8 / 255, 64 / 255)
    assert zero["large_eps_zero"]["passed"] is True
    other = run_checks([aa(2 / 255, 0.40), Observation("square@eps=0.0314", "square", 8 / 255, 0.6, 500)],
                       8 / 255, 64 / 255)
    assert other["eps_monotone"]["passed"] is None, "different attacks are not one curve"


@pytest.mark.parametrize("args, match", [
    (["--attacks", "pgd5", "--eps-sweep", ","], "empty"),
    (["--attacks", "pgd5", "--eps-sweep", "1/255,,2/255"], "has an empty entry"),
    (["--attacks", "pgd5", "--eps-sweep", "1/255,8"], "8/255"),
    (["--attacks", "pgd5", "--eps-sweep", "0,1/255"], "is 0"),
    (["--attacks", "pgd5", "--eps-sweep", "tiny"], "not a number"),
    (["--attacks", "pgd5", "--eps", "0.1", "--eps-sweep", "0.2"], "not both"),
    (["--attacks", "clean", "--eps-sweep", "0.1"], "needs an attack")])
def test_bad_sweeps_are_one_clear_error(run_dir, args, match, capsys) -> None:
    assert main(["evaluate", str(run_dir), *args, "--n", "8"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("igam: error:") == 1 and "Traceback" not in err


def test_parse_eps_sweep_sorts_dedupes_and_names_large() -> None:
    assert parse_eps_sweep("8/255, 2/255,8/255", (3, 32, 32)) == [("2/255", 2 / 255), ("8/255", 8 / 255)]
    assert parse_eps_sweep("0.1,large", (1, 28, 28)) == [("0.1", 0.1), ("0.5", 0.5)]
    assert parse_eps_sweep(["16/255", "large"], (3, 32, 32))[-1] == ("64/255", 64 / 255)


# ---------------------------------------------------------------------------------------------
# the report
def test_report_shows_the_curve_and_per_class_summary(run_dir, tmp_path) -> None:
    from igam.evaluate import evaluate_run
    from igam.report import write_report

    exp = tmp_path / "exp"
    runs = [_copy(run_dir, exp, name) for name in ("a", "b")]
    for r, attacks in zip(runs, (["pgd5"], ["pgd5", "fgsm"])):
        evaluate_run(r, attacks, n=32, batch_size=32, eps_sweep="4/255,16/255")
    page = write_report(runs[1], gradients=False).read_text()
    for needle in ("<h2>Robustness curve</h2>", 'alt="robustness curves"', "worst case (PGD5, FGSM) (%)",
                   "0 (clean)", "16/255", "mean over classes (%)", "Per-class accuracy", "eps monotone",
                   "deterministic", "no inference optimisation"):
        assert needle in page, needle
    page = write_report(exp, gradients=False).read_text()
    assert "<h2>Robustness curves</h2>" in page and "a: PGD5 (%)" in page and "b: FGSM (%)" in page
    (runs[0] / Run.CURVE).write_text('{"curves": [{"points": [{"eps": "x"}]}]}')  # damaged
    page = write_report(runs[0], gradients=False).read_text()
    assert "holds no robustness curves" in page and "<h2>Evaluation</h2>" in page
    with pytest.raises(IgamError, match="holds no robustness curves"):
        from igam.report import plot_robustness_curve

        plot_robustness_curve(runs[0])


def test_per_class_text_names_the_worst_class_once_when_its_name_is_its_index() -> None:
    from igam.summary import per_class_text

    digits = [str(i) for i in range(10)]
    rec = {"per_class": {"mean": 0.77, "worst": 0.54, "worst_class": 8, "classes": digits}}
    assert per_class_text("autoattack", rec) == "autoattack 77.00/54.00 (class 8)"
    rec["per_class"]["classes"] = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                   "truck"]
    assert per_class_text("autoattack", rec).endswith("(class 8 ship)")


def test_a_small_sweep_after_a_large_one_does_not_ask_for_large_again() -> None:
    """The run's records already hold a verdict at the large eps (an earlier sweep): a later sweep that
    stops short reports that verdict instead of asking to add `large`, which would read as a contradiction."""
    from igam.summary import sweep_notes

    curve = {"eps": [0.0, 2 / 255], "eps_text": ["0", "2/255"], "large_eps": 64 / 255, "checks": {}}
    assert any("add `large`" in line for line in sweep_notes(curve))
    curve["checks"] = {"large_eps_zero": {"passed": True, "detail": "pgd10@eps=64/255: 0.0%"}}
    notes = sweep_notes(curve)
    assert not any("add `large`" in line for line in notes)
    assert "sweep check large_eps_zero: pass: pgd10@eps=64/255: 0.0%" in notes
