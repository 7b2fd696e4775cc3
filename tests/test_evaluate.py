"""`igam evaluate` and igam.evaluate: eval.json records, the paper table, determinism, eps/bn labels,
masking checks in eval.json, --strict, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from igam.attacks.checks import CHECKS, Observation, noise_margin, run_checks
from igam.cli import main
from igam.errors import IgamError
from igam.evaluate import evaluate_attack, evaluate_run, run_attack
from igam.records import result_key


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny finished run on synthetic 1x28x28 data (MNIST conventions: eps 0.3)."""
    from igam.config import make_config
    from igam.train import train

    out = tmp_path_factory.mktemp("runs")
    cfg = make_config(overrides=dict(dataset="synthetic:28x28x1:10", model="madry-mnist", width=4,
                                     out_dir=str(out), name="tiny", epochs=1, train_subset=256,
                                     test_subset=96,
                                     batch_size=32, lr=0.01, optimizer="adam", eval_every=0, eval_n=32,
                                     progress=False, tensorboard=False, device="cpu"))
    return train(cfg, log=lambda *a, **k: None)


def _eval_json(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def test_cli_writes_eval_json_and_prints_paper_table(run_dir, capsys):
    rc = main(["evaluate", str(run_dir), "--attacks", "clean,fgsm,pgd5,pgd5x2-cw", "--n", "64",
               "--batch-size", "32", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| Model | Clean | FGSM | PGD5 | PGD5X2-CW |" in out
    assert "| tiny |" in out
    ev = _eval_json(run_dir)
    for key in ("clean", "fgsm", "pgd5", "pgd5x2-cw"):
        rec = ev[key]
        assert 0.0 <= rec["accuracy"] <= 1.0 and rec["n"] == 64 and rec["seed"] == 3 and rec["bn"] == "eval"
        assert "time_s" in rec and rec["attack"]["attack"] in ("clean", "fgsm", "pgd")
    assert ev["pgd5"]["attack"]["eps"] == 0.3
    assert ev["pgd5"]["attack"]["step_size"] == pytest.approx(2.5 * 0.3 / 5)
    assert ev["pgd5"]["attack"]["step_rule"] == "reach"
    assert ev["pgd5x2-cw"]["attack"]["restarts"] == 2 and ev["pgd5x2-cw"]["attack"]["loss"] == "cw"
    for key in ("fgsm", "pgd5", "pgd5x2-cw"):  # robust accuracy counts the clean point: never above clean
        assert ev[key]["accuracy"] <= ev["clean"]["accuracy"]
    mc = ev["masking_checks"]
    assert set(mc["checks"]) == set(CHECKS) and isinstance(mc["passed"], bool)
    assert mc["checks"]["gradients"]["passed"] is not None


def test_evaluate_help_shows_key_value_and_examples_that_run(run_dir, tmp_path, capsys):
    """`igam evaluate --help` says, in its usage and description, that options can be written key=value
    (attacks=..., n=...), and its examples run as written (on copies of a tiny run, with n=16); the
    key=value example prints the same table as its flag twin."""
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    assert "attacks=" in usage and "n=N" in usage
    assert "key=value" in rest.partition("positional arguments")[0]
    examples = [line.split(" #")[0].split()[1:] for line in text.partition("Examples:")[2].splitlines()
                if line.startswith("  igam evaluate ")]
    assert len(examples) >= 3 and any(t.startswith("attacks=") for ex in examples for t in ex)
    for name in {t.split("/")[-1] for ex in examples for t in ex if t.startswith("runs/")}:
        shutil.copytree(run_dir, tmp_path / name)
    tables = []
    for argv in examples:
        argv = [str(tmp_path / t.split("/")[-1]) if t.startswith("runs/") else t for t in argv]
        argv = ["16" if prev == "--n" else "n=16" if t.startswith("n=") else t
                for prev, t in zip(["", *argv], argv)]
        for copy in tmp_path.iterdir():  # evaluate afresh, not from an earlier example's eval.json
            (copy / "eval.json").unlink(missing_ok=True)
        assert main(argv) == 0, argv
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "| Clean | PGD20 | AutoAttack" in tables[0]


def test_evaluation_is_deterministic_given_seed(run_dir):
    a = evaluate_run(run_dir, ["pgd5", "square20"], n=48, batch_size=16, seed=1)
    b = evaluate_run(run_dir, ["pgd5", "square20"], n=48, batch_size=16, seed=1)
    for key in ("pgd5", "square20"):
        assert a[key]["accuracy"] == b[key]["accuracy"]


def test_eps_and_bn_overrides_are_labelled(run_dir, capsys):
    rc = main(["evaluate", str(run_dir), "--attacks", "clean,pgd5", "--n", "32", "--eps", "0.1",
               "--bn", "train"])
    out = capsys.readouterr().out
    assert rc == 0 and "train-mode BN" in out
    ev = _eval_json(run_dir)
    rec = ev[result_key("pgd5", "0.1", "train")]
    assert rec["eps"] == pytest.approx(0.1) and rec["bn"] == "train"
    assert rec["attack"]["step_size"] == pytest.approx(2.5 * 0.1 / 5)  # the default rule reaches the boundary
    assert "clean@bn=train" in ev


def test_strict_fails_on_contradicting_results(run_dir, capsys):
    """Accuracy that rises with PGD steps is a masking sign: a WARNING block, and exit 1 under --strict, when
    the command ran one of the contradicting attacks; contradictions only among older records of eval.json
    are named as older records and do not count against a command that ran none of them (issue 24)."""
    ev = _eval_json(run_dir) if (run_dir / "eval.json").exists() else {}
    pgd = {"attack": "pgd", "eps": 0.3, "step_size": 0.01, "restarts": 1, "loss": "ce"}
    ev["pgd7"] = {"accuracy": 0.1, "n": 32, "bn": "eval", "eps": 0.3, "attack": {**pgd, "steps": 7}}
    ev["pgd40"] = {"accuracy": 0.9, "n": 32, "bn": "eval", "eps": 0.3, "attack": {**pgd, "steps": 40}}
    (run_dir / "eval.json").write_text(json.dumps(ev))
    rc = main(["evaluate", str(run_dir), "--attacks", "clean", "--n", "32", "--strict"])
    out, err = capsys.readouterr()
    assert rc == 0 and "WARNING" not in err
    assert "an older record, not from this command, fails: pgd40" in out
    mc = _eval_json(run_dir)["masking_checks"]
    assert mc["passed"] is True and mc["checks"]["steps_monotone"]["older"]
    # the command itself runs pgd7 (same settings as the planted one): its result against pgd40 counts
    acc7 = evaluate_run(run_dir, ["pgd7-fixed"], n=32, batch_size=32)["pgd7-fixed"]["accuracy"]
    assert acc7 < 0.6  # (the run is far from robust at eps 0.3: pgd40's planted 90% contradicts it)
    rc = main(["evaluate", str(run_dir), "--attacks", "pgd7-fixed", "--n", "32", "--strict"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "WARNING" in err and "steps_monotone" in err and "pgd40" in err
    mc = _eval_json(run_dir)["masking_checks"]
    assert mc["passed"] is False and "steps_monotone" in mc["failed"]
    assert main(["evaluate", str(run_dir), "--attacks", "pgd7-fixed", "--n", "32"]) == 0  # loud, not fatal


def test_checks_flag_runs_the_sweeps(run_dir):
    res = evaluate_run(run_dir, ["fgsm"], n=32, batch_size=32, checks=True, check_n=16, check_queries=20)
    mc = res["masking_checks"]
    names = [o["name"] for o in mc["observations"]]
    assert mc["check_n"] == 16 and any(n.startswith("check:pgd50@eps=0.5") for n in names)
    assert any(n.startswith("check:square") for n in names)
    assert all(v["passed"] is not None for k, v in mc["checks"].items())
    later = evaluate_run(run_dir, ["clean"], n=32, batch_size=32)["masking_checks"]  # no --checks this time
    assert [o for o in later["observations"] if o["name"].startswith("check:")] == \
        [o for o in mc["observations"] if o["name"].startswith("check:")]


def test_run_attack_on_floats_and_evaluate_attack(run_dir):
    from igam.runs import load_run_model

    model = load_run_model(run_dir)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g)
    rec = run_attack(model, x, y, "pgd3", batch_size=7)
    assert rec["n"] == 20 and 0 <= rec["accuracy"] <= 1
    acc = evaluate_attack(model, (x * 255).to(torch.uint8), y, "clean", None, 8, 0, "eval")
    assert isinstance(acc, float) and 0 <= acc <= 1


@pytest.mark.parametrize("args, match", [
    (["--attacks", "pgd2O"], "Unknown attack"), (["--attacks", "fgsm", "--eps", "8"], "8/255"),
    (["--attacks", ""], "No attacks"), (["--attacks", "clean", "--n", "0"], "at least 1")])
def test_bad_arguments_are_clear_errors(run_dir, args, match, capsys):
    assert main(["evaluate", str(run_dir), *args]) == 2
    assert match in capsys.readouterr().err


def test_autoattack_missing_is_a_clear_error(run_dir, monkeypatch):
    import igam.evaluate as ev

    monkeypatch.setattr(ev, "pyautoattack_version", lambda: None)
    with pytest.raises(IgamError, match="pyautoattack"):
        ev.evaluate_run(run_dir, ["clean", "autoattack"], n=8)


def test_check_logic_with_noise_margin():
    n = 1000
    m = noise_margin(0.5, n)
    assert 0 < m < 0.1 and noise_margin(0.0, n) == pytest.approx(1 / n)

    def pgd(name, steps, eps, acc):
        return Observation(name, "pgd", eps, acc, n, steps=steps)

    ok = run_checks([pgd("pgd10", 10, 0.3, 0.40), pgd("pgd50", 50, 0.3, 0.40 + m / 2),
                     Observation("fgsm", "fgsm", 0.3, 0.55, n),
                     Observation("square", "square", 0.3, 0.45, n)],
                    0.3, 0.5, {"n": n, "zero_ce": 0.0, "zero_margin": 0.0, "nonfinite": 0.0})
    for k in ("steps_monotone", "fgsm_vs_pgd", "blackbox_vs_whitebox", "gradients"):
        assert ok[k]["passed"], (k, ok[k])
    assert ok["large_eps_zero"]["passed"] is None and "--checks" in ok["large_eps_zero"]["detail"]
    bad = run_checks([pgd("pgd10", 10, 0.3, 0.40), pgd("pgd50", 50, 0.3, 0.40 + 2 * m),
                      pgd("pgd10b", 10, 0.5, 0.3), Observation("fgsm", "fgsm", 0.3, 0.3, n),
                      Observation("square", "square", 0.3, 0.2, n)],
                     0.3, 0.5, {"n": n, "zero_ce": 0.5, "zero_margin": 0.02, "nonfinite": 0.0})
    assert not any(bad[k]["passed"] for k in CHECKS if k not in ("eps_monotone", "converged"))
    other_n = run_checks([pgd("a", 10, 0.3, 0.1), Observation("b", "pgd", 0.3, 0.9, n // 2, steps=50)],
                         0.3, 0.5)
    assert other_n["steps_monotone"]["passed"] is None, "results on different images are not compared"


def test_several_runs_share_one_load_of_the_test_images_and_batch_size_auto(tmp_path, monkeypatch) -> None:
    """`igam evaluate RUN1 RUN2 --batch-size auto`: the test set is read once for both runs, and auto picks
    a batch size (on a CPU, min(500, n)); a bad value is one clear error."""
    import igam.evaluate as ev
    from igam.cli import main
    from igam.config import make_config
    from igam.train import train

    runs = []
    for name in ("a", "b"):
        train(make_config(overrides={"dataset": "synthetic:8x8x3:4", "model": "small-cnn", "width": 4,
                                     "epochs": 0.5, "train_subset": 64, "batch_size": 32, "eval_n": 16,
                                     "progress": False, "tensorboard": False, "out_dir": str(tmp_path),
                                     "name": name, "seed": 1 if name == "b" else 0}),
              log=lambda *a: None)
        runs.append(str(tmp_path / name))
    loads = []
    real = ev.load_data
    monkeypatch.setattr(ev, "load_data", lambda *a, **k: loads.append(a) or real(*a, **k))
    ev._TEST_SETS.clear()
    assert main(["evaluate", *runs, "--attacks", "clean", "--n", "40", "--batch-size", "auto"]) == 0
    assert len(loads) == 1
    rec = json.loads((tmp_path / "a" / "eval.json").read_text())["clean"]
    assert rec["batch_size"] == min(ev.AUTO_BATCH_CPU, rec["n"])
    assert main(["evaluate", runs[0], "--attacks", "clean", "--batch-size", "big"]) == 2


def test_worst_case_per_image_over_attacks() -> None:
    """The headline number: an image counts as robust only if every attack left it correct."""
    from igam.records import pack_correct, unpack_correct, worst_case

    a = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(unpack_correct(pack_correct(a), len(a)), a)
    recs = {"pgd20": {"correct": pack_correct(a), "n": 11, "eps": 0.1, "accuracy": float(a.float().mean())},
            "square": {"correct": pack_correct(b), "n": 11, "eps": 0.1, "accuracy": float(b.float().mean())}}
    head = worst_case(recs)
    assert head["attacks"] == ["pgd20", "square"] and head["accuracy"] == pytest.approx(6 / 11)
    assert head["accuracy"] < min(r["accuracy"] for r in recs.values())
    with pytest.raises(IgamError, match="share n and eps"):
        worst_case({**recs, "fgsm": {"correct": pack_correct(a[:8]), "n": 8, "eps": 0.1}})
