"""AutoAttack through the reference implementation (pyautoattack), offline on CPU: the published settings
in the record, the igam attack contract, models with 2, 3 and 5 classes, AutoAttack's flags, resuming an
interrupted evaluation, and `igam evaluate` keeping earlier results when an attack fails."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import torch.nn as nn

# a core dependency; a machine without it (the GPU machine's python) skips this module
pyautoattack = pytest.importorskip("pyautoattack", reason="the reference AutoAttack is not installed")

from igam.attacks import PGD, AutoAttack, column_label, make_attack, pyautoattack_version  # noqa: E402
from igam.attacks.autoattack import PINNED_VERSION  # noqa: E402
from igam.cli import main  # noqa: E402
from igam.errors import IgamError  # noqa: E402
from igam.evaluate import evaluate_run  # noqa: E402
from igam.records import record_notes  # noqa: E402


class Tiny(nn.Module):
    """A small random CNN on (1, 8, 8) images with k logits (optionally turned into probabilities)."""

    def __init__(self, k: int = 10, seed: int = 0, softmax: bool = False, bn: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, k))
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z.softmax(1) if self.softmax else z


def _data(model: nn.Module, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] labelled with the model's own predictions (clean accuracy 100%)."""
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(1)


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------------------------
def test_published_settings_are_recorded():
    model = Tiny(10).eval()
    s = make_attack("autoattack", model, (1, 8, 8)).settings()
    assert s["library"] == "pyautoattack"
    assert s["library_version"] == pyautoattack.__version__ == PINNED_VERSION
    assert s["version"] == "standard" and s["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    cs = s["component_settings"]
    assert (cs["apgd-ce"]["n_iter"], cs["apgd-ce"]["n_restarts"]) == (100, 1)
    assert (cs["apgd-t"]["n_iter"], cs["apgd-t"]["n_target_classes"]) == (100, 9)
    assert (cs["fab-t"]["n_iter"], cs["fab-t"]["n_target_classes"], cs["fab-t"]["n_restarts"]) == (100, 9, 1)
    assert cs["square"]["n_queries"] == 5000 and cs["square"]["p_init"] == 0.8
    assert s["as_published"] and s["complete"] and s["reduced"] is None and s["num_classes"] == 10
    assert s["eps"] == pytest.approx(8 / 255)  # not MNIST-shaped: 8/255

    plus = make_attack("autoattack-plus", model, (1, 28, 28)).settings()
    assert plus["eps"] == 0.3 and plus["version"] == "plus"
    assert plus["components"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    pcs = plus["component_settings"]
    assert pcs["apgd-ce"]["n_restarts"] == pcs["apgd-dlr"]["n_restarts"] == pcs["fab"]["n_restarts"] == 5
    assert pcs["fab-t"]["n_restarts"] == 1
    rand = make_attack("autoattack-rand", model, (1, 8, 8)).settings()
    assert rand["components"] == ["apgd-ce", "apgd-dlr"]
    assert rand["component_settings"]["apgd-ce"]["eot_iter"] == 20

    one = make_attack("apgd-t", model, (1, 8, 8), eps="4/255").settings()
    assert one["components"] == ["apgd-t"] and not one["complete"] and one["eps"] == pytest.approx(4 / 255)
    assert make_attack("aa-square", model, (1, 8, 8)).settings()["components"] == ["square"]
    assert column_label("autoattack-plus") == "AutoAttack+" and column_label("fab-t") == "FAB-T"


def test_reference_autoattack_as_published_on_cpu():
    """The standard version with its published settings: every component runs on a tiny model."""
    model = Tiny(10).eval()
    x, y = _data(model)
    attack = make_attack("autoattack", model, (1, 8, 8), eps=0.01, seed=3)
    rng = torch.get_rng_state()
    x_adv = attack(x, y)
    assert torch.equal(rng, torch.get_rng_state()), "AutoAttack must not move the global RNG"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= 0.01 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    s = attack.settings()
    assert s["as_published"] and s["robust_after"]["n"] == 6 and s["robust_after"]["clean"] == 6
    after = [s["robust_after"][c] for c in s["components"]]
    assert after == sorted(after, reverse=True), "each component runs on what the previous ones left"
    assert after[-1] == round(6 * _acc(model, x_adv, y))
    logger = logging.getLogger("auto-attack")
    assert not logger.handlers and logger.propagate, "the logger is left as it was"


def test_reference_autoattack_contract_and_determinism():
    model = Tiny(10, seed=1).eval()
    x, y = _data(model, 8, seed=1)
    attack = AutoAttack(model, 0.1, n_iter=10, n_queries=100, seed=5)
    a, b = attack(x, y), attack(x, y)
    assert torch.equal(a, b), "same seed, same adversarial images"
    assert _acc(model, a, y) <= _acc(model, PGD(model, 0.1, 0.025, 10)(x, y), y) + 1 / 8
    s = attack.settings()
    assert not s["as_published"] and s["component_settings"]["apgd-ce"]["n_iter"] == 10
    assert s["component_settings"]["square"]["n_queries"] == 100 and s["robust_after"]["n"] == 16
    assert column_label("autoattack", [{"attack": s}]) == "AutoAttack (not as published)"
    with pytest.raises(IgamError, match="version"):
        AutoAttack(model, 0.1, version="fast")
    with pytest.raises(IgamError, match="component"):
        AutoAttack(model, 0.1, components=["pgd"])


def test_missing_pyautoattack_is_a_clear_error(monkeypatch):
    import igam.attacks.autoattack as aa

    monkeypatch.setattr(aa, "pyautoattack_version", lambda: None)
    with pytest.raises(IgamError, match="pip install pyautoattack==0.2.0"):
        aa.AutoAttack(Tiny(), 0.1)
    assert pyautoattack_version() == PINNED_VERSION


@pytest.mark.parametrize("k", [2, 3])
def test_too_few_classes_is_refused_with_the_fix(k):
    model = Tiny(k).eval()
    x, y = _data(model, 4)
    with pytest.raises(IgamError, match=f"cannot run on this {k}-class model") as err:
        make_attack("autoattack", model, (1, 8, 8), eps=0.05)
    msg = str(err.value)
    assert "APGD-T needs at least 4 classes" in msg and "IndexError" not in msg
    with pytest.raises(IgamError, match=f"{k}-class"):  # classes read from the logits at the first call
        AutoAttack(model, 0.05)(x, y)
    with pytest.raises(IgamError, match=f"{k}-class"):
        make_attack("apgd-t", model, (1, 8, 8))
    if k == 2:
        with pytest.raises(IgamError, match="APGD-DLR needs at least 3"):
            make_attack("apgd-dlr", model, (1, 8, 8))
    fix = re.search(r"--attacks (\S+) ", msg).group(1).split(",")
    assert fix == ["apgd-ce", *(["apgd-dlr"] if k == 3 else []), "fab-t", "aa-square"]
    for name in fix:  # the suggested components run, with the published settings
        attack = make_attack(name, model, (1, 8, 8), eps=0.05)
        x_adv = attack(x, y)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-7
        s = attack.settings()
        if name == "fab-t":
            assert s["reduced"] == {"fab-t": {"n_target_classes": k - 1, "published": 9}}
            assert not s["as_published"]
            rec = {"attack": s}
            assert column_label(name, [rec]) == f"FAB-T ({k - 1} target{'s' if k > 2 else ''})"
            assert any(f"{k - 1} target classes instead of 9" in line for line in record_notes(name, rec))
        else:
            assert s["as_published"]


def test_five_classes_run_a_labelled_reduced_version():
    model = Tiny(5).eval()
    x, y = _data(model)
    attack = make_attack("autoattack", model, (1, 8, 8), eps=0.05)
    attack.n_iter, attack.n_queries = 10, 50  # quicker; the record says so
    attack(x, y)
    s = attack.settings()
    assert s["component_settings"]["apgd-t"]["n_target_classes"] == 4
    assert s["component_settings"]["fab-t"]["n_target_classes"] == 4
    assert set(s["reduced"]) == {"apgd-t", "fab-t"} and s["num_classes"] == 5
    assert column_label("autoattack", [{"attack": s}]) == "AutoAttack (4 targets)"
    published = make_attack("autoattack", Tiny(10).eval(), (1, 8, 8)).settings()
    mixed = [{"attack": s}, {"attack": published}]
    assert column_label("autoattack", mixed) == "AutoAttack (reduced targets)"


def test_autoattack_flags_are_captured_not_printed(capsys):
    """A model that outputs probabilities: AutoAttack's own check flags it; the flag lands in the record."""
    model = Tiny(10, softmax=True).eval()
    x, y = _data(model, 4)
    attack = AutoAttack(model, 0.02, components=["apgd-ce"], n_iter=5)
    attack(x, y)
    s = attack.settings()
    assert any("probability distribution" in f for f in s["flags"])
    assert s["flags_doc"].endswith("flags_doc.md")
    notes = record_notes("apgd-ce", {"attack": s})
    assert any("AutoAttack flag" in line and "logits" in line for line in notes)
    captured = capsys.readouterr()
    assert "probability" not in captured.err + captured.out


def test_resume_after_interrupt_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    model = Tiny(10, seed=2, bn=True).eval()  # BatchNorm: an int64 scalar buffer in the weights' fingerprint
    x, y = _data(model, 6, seed=2)
    kw = dict(n_iter=10, n_queries=200, seed=4)
    expected = AutoAttack(model, 0.03, **kw)(x, y)

    calls: list[str] = []
    real = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, *a, **k):
        calls.append(self.attacks_to_run[0])
        if calls[-1] == "fab-t" and interrupt:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    interrupt = True
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        AutoAttack(model, 0.03, state_dir=state, **kw)(x, y)
    saved = json.loads((state / "state.json").read_text())
    assert [b["done"] for b in saved["batches"].values()] == [["apgd-ce", "apgd-t"]]
    assert calls == ["apgd-ce", "apgd-t", "fab-t"]

    interrupt, calls[:] = False, []
    lines: list[str] = []
    attack = AutoAttack(model, 0.03, state_dir=state, progress=lines.append, **kw)
    x_adv = attack(x, y)
    assert calls == ["fab-t", "square"], "the components already run are not run again"
    assert torch.equal(x_adv, expected) and attack.settings()["resumed_batches"] == 1
    assert any("resuming" in line for line in lines)

    with torch.no_grad():  # other weights: the state is not reused
        model.net[-1].bias.add_(0.01)
    calls[:] = []
    lines.clear()
    AutoAttack(model, 0.03, state_dir=state, progress=lines.append, **kw)(x, y)
    assert calls[0] == "apgd-ce" and any("starting afresh" in line for line in lines)
    attack.clear_state()
    assert not state.exists()


# ----------------------------------------------------------------------------------------------
# igam evaluate on tiny trained runs
def _train(out, k: int):
    from igam.config import make_config
    from igam.train import train

    cfg = make_config(overrides=dict(
        dataset=f"synthetic:16x16x1:{k}", model="madry-mnist" if k == 10 else "small-cnn", width=4,
        out_dir=str(out), name=f"k{k}", epochs=2, train_subset=512, test_subset=64, batch_size=32, lr=0.01,
        optimizer="adam", eval_every=0, eval_n=32, progress=False, tensorboard=False, device="cpu"))
    return train(cfg, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("aa-runs")
    return {k: _train(out, k) for k in (10, 2, 3)}


def _eval_json(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def test_igam_evaluate_records_reference_autoattack(runs, capsys):
    run = runs[10]
    rc = main(["evaluate", str(run), "--attacks", "clean,pgd5,autoattack", "--n", "8", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "| Model | Clean | PGD5 | AutoAttack |" in out
    rec = _eval_json(run)["autoattack"]
    s = rec["attack"]
    assert s["library"] == "pyautoattack" and s["library_version"] == PINNED_VERSION
    assert s["version"] == "standard" and s["as_published"] and s["robust_after"]["n"] == 8
    assert s["component_settings"]["apgd-t"]["n_target_classes"] == 9 and isinstance(s["flags"], list)
    assert rec["accuracy"] <= _eval_json(run)["clean"]["accuracy"]
    assert not list(run.glob("autoattack-state-*")), "the resume state goes once the record is written"
    ev = evaluate_run(run, ["apgd-ce"], n=8, eps="4/255", bn="train")
    rec = ev["apgd-ce@eps=4/255@bn=train"]
    assert rec["eps"] == pytest.approx(4 / 255) and rec["attack"]["bn"] == "train"
    assert (run / "autoattack-apgd-ce@eps=4_255@bn=train.log").exists()
    assert not list(run.glob("autoattack-state-*"))


@pytest.mark.parametrize("k", [2, 3])
def test_two_and_three_class_runs(runs, k, capsys):
    run = runs[k]
    assert main(["evaluate", str(run), "--attacks", "clean,pgd5", "--n", "8"]) == 0
    before = _eval_json(run)
    capsys.readouterr()
    rc = main(["evaluate", str(run), "--attacks", "clean,fgsm,autoattack", "--n", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot run on this {k}-class model" in err and "--attacks apgd-ce," in err
    assert "Traceback" not in err and "IndexError" not in err
    assert _eval_json(run) == before, "refused before any work: earlier results untouched"
    fix = re.search(r"--attacks (\S+) ", err).group(1)
    assert main(["evaluate", str(run), "--attacks", f"clean,{fix}", "--n", "8"]) == 0
    out = capsys.readouterr().out
    assert f"FAB-T ({k - 1} target" in out and "note:" in out and "instead of 9" in out
    ev = _eval_json(run)
    assert {"clean", "pgd5", "apgd-ce", "fab-t", "aa-square"} <= set(ev)
    assert ev["fab-t"]["attack"]["reduced"]["fab-t"]["n_target_classes"] == k - 1


def test_failing_attack_keeps_the_results_before_it(runs, monkeypatch):
    run = runs[10]

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", boom)
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_run(run, ["clean", "pgd5", "autoattack", "fgsm"], n=8, seed=11, log=lines.append)
    ev = _eval_json(run)
    assert ev["clean"]["seed"] == 11 and ev["pgd5"]["seed"] == 11, "finished attacks are saved as they finish"
    assert any("autoattack failed (RuntimeError: boom)" in line and "--attacks autoattack,fgsm" in line
               and "clean, pgd5" in line for line in lines)

    def refuse(self, *a, **k):
        raise IgamError("out of luck")

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", refuse)
    with pytest.raises(IgamError, match="Results saved in .*eval.json: clean, pgd5"):
        evaluate_run(run, ["clean", "pgd5", "autoattack"], n=8, seed=12)
    assert _eval_json(run)["pgd5"]["seed"] == 12


def test_interrupted_evaluate_continues(runs, monkeypatch):
    run = runs[10]
    full = evaluate_run(run, ["autoattack"], n=8, batch_size=4, seed=3)["autoattack"]
    assert full["attack"]["robust_after"]["apgd-ce"] > 0, "the test needs images that survive APGD-CE"

    real = pyautoattack.AutoAttack.run_standard_evaluation
    seen: list[str] = []

    def stop_at_second_batch(self, *a, **k):
        seen.append(self.attacks_to_run[0])
        if seen.count("apgd-ce") == 2 and seen[-1] != "apgd-ce":
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", stop_at_second_batch)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, ["clean", "autoattack"], n=8, batch_size=4, seed=3, log=lines.append)
    assert any("was interrupted" in line and "continues where it stopped" in line for line in lines)
    assert (run / "autoattack-state-autoattack" / "state.json").exists()

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", real)
    again = evaluate_run(run, ["autoattack"], n=8, batch_size=4, seed=3)["autoattack"]
    assert again["attack"]["resumed_batches"] == 2  # one finished batch, one after APGD-CE
    assert again["accuracy"] == full["accuracy"]
    assert again["attack"]["robust_after"] == full["attack"]["robust_after"]
    assert not (run / "autoattack-state-autoattack").exists()
    assert (run / "autoattack-autoattack.log").read_text().count("apgd-ce") > 0
