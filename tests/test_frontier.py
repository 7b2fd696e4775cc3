"""Robustness per compute: the Pareto fronts, the cost count, second seeds joined to their curve, the
ranking tables of results.md, and the two pictures `igam run` writes and `igam report` shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from igam.attacks.presets import column_name
from igam.experiment import Experiment, Stage, pareto_front, run_experiment, total_passes
from igam.experiment.frontier import frontier_markdown, frontier_metric, frontier_points, fronts
from igam.models import shipped


def test_pareto_front_of_hand_made_points() -> None:
    # (clean, robust): both better higher
    pts = [(50, 1), (40, 20), (35, 25), (45, 10), (38, 15), (30, 25), (45, 5), (50, 1)]
    #       front    front     front    front     below      below     below    equal to the first
    assert pareto_front(pts) == [2, 1, 3, 0, 7]
    assert [pts[i] for i in pareto_front(pts)] == [(35, 25), (40, 20), (45, 10), (50, 1), (50, 1)]
    # (cost, robust): cost better lower
    cost = [(10, 1), (40, 20), (40, 15), (80, 20), (5, 0), (200, 30), (100, 25)]
    #        front   front     same cost, less robust   same robust, dearer   front  front  front
    assert pareto_front(cost, lower_x_better=True) == [4, 0, 1, 6, 5]
    assert pareto_front([]) == [] and pareto_front([(1, 1)]) == [0]


def test_total_passes_counts_every_network_and_a_double_backward_twice() -> None:
    igam = {"student": {"forward": 5, "backward": 5, "double_backward": 5},
            "teacher": {"forward": 5, "backward": 5, "double_backward": 0},
            "discriminator": {"forward": 12, "backward": 12, "double_backward": 0}}
    assert total_passes(igam) == 5 + 5 + 2 * 5 + 10 + 24
    assert total_passes({"student": {"forward": 40, "backward": 40}}) == 80
    assert total_passes(None) is None and total_passes({}) is None


def _experiment() -> tuple[Experiment, dict]:
    base = {"method": "pgd-at", "dataset": "synthetic", "seed": 0}
    stages = [Stage("standard", {**base, "method": "standard"}, row="Standard", curve="Standard"),
              Stage("pgd-eps=2", {**base, "eps": "2/255"}, curve="PGD"),
              Stage("pgd-eps=8", {**base, "eps": "8/255"}, row="PGD", curve="PGD"),
              Stage("pgd-seed=1", {**base, "eps": "8/255", "seed": 1}, row="PGD-seed=1"),
              Stage("igr-a", {**base, "method": "igr", "lambda_diff_auto": 1}, curve="igr"),
              Stage("igr-b", {**base, "method": "igr", "lambda_diff_auto": 7}, curve="igr")]
    exp = Experiment("toy", Path("."), stages, [])

    def row(stage, curve, clean, aa, passes, row_name=""):
        return {"stage": stage, "row": row_name, "curve": curve, "accuracy": {"clean": clean, "pgd20": aa + 2,
                "autoattack": aa}, "passes_per_image": {"student": {"forward": passes, "backward": passes}}}

    results = {"rows": [row("standard", "Standard", 50, 1, 5, "Standard"),
                        row("pgd-eps=2", "PGD", 45, 12, 40), row("pgd-eps=8", "PGD", 40, 22, 40, "PGD"),
                        row("pgd-seed=1", "", 39, 24, 40, "PGD-seed=1"),
                        row("igr-a", "igr", 42, 15, 10), row("igr-b", "igr", 35, 20, 10)]}
    return exp, results


def test_frontier_points_join_second_seeds_and_label_the_knob() -> None:
    exp, results = _experiment()
    assert frontier_metric(results, "pgd20") == "autoattack"
    def rows(*metrics):
        return {"rows": [{"accuracy": {"clean": 1, **{m: 1 for m in ms}}, "row": "r", "curve": ""}
                         for ms in metrics]}

    assert frontier_metric(rows(["pgd20", "fgsm"]), "pgd20") == "pgd20"
    assert frontier_metric(rows(["fgsm"], ["fgsm", "pgd5"]), "pgd20") == "fgsm"  # a miniature: no pgd20
    assert frontier_metric(rows([]), "pgd20") == "pgd20"
    # AutoAttack still running: measured on 1 of 2 rows, so the pictures keep every row on pgd20
    assert frontier_metric(rows(["pgd20", "autoattack"], ["pgd20"]), "pgd20") == "pgd20"
    assert frontier_metric(rows(["pgd20", "autoattack"], ["pgd20", "autoattack"]), "pgd20") == "autoattack"
    pts = {q["stage"]: q for q in frontier_points(exp, results, "autoattack")}
    assert pts["pgd-seed=1"]["series"] == "PGD" and pts["pgd-seed=1"]["repeat_of"] == "pgd-eps=8"
    assert pts["pgd-eps=2"]["label"] == "2/255" and pts["pgd-seed=1"]["label"] == "8/255"
    assert pts["igr-b"]["label"] == "7" and pts["igr-b"]["knob"] == "lambda_diff_auto"
    assert pts["standard"]["label"] == "" and pts["igr-a"]["cost"] == 20
    f = fronts(list(pts.values()))
    # clean/robust: 35/20 (igr-b) is beaten by 39/24, the others are not
    assert f["clean"] == ["pgd-seed=1", "pgd-eps=8", "igr-a", "pgd-eps=2", "standard"]
    assert f["cost"] == ["standard", "igr-b", "pgd-seed=1"]  # 10/1, 20/20, 80/24

    md = frontier_markdown(exp, results, column_name)
    assert "## AutoAttack per compute and per clean accuracy" in md
    assert "| igr | 2 | 20 | 20.0 | 35.0 | lambda_diff_auto=7 | 1 | 1 |" in md
    assert "| PGD | 3 | 80 | 24.0 | 39.0 | eps=8/255 | 1 | 3 |" in md
    assert "| 20 | 20.0 | 35.0 | igr | `igr-b` |" in md  # the most robust model at 20 passes per image
    # levels 35, 37, ..., 45 across both curves; at 41: PGD 22 -> 12 over 40..45, igr 20 -> 15 over 35..42
    assert "| 41 | PGD 20.0 > igr 15.7 |" in md and "| 37 | igr 18.6 |" in md


def test_a_small_experiment_writes_both_pictures_and_the_report_shows_them(tmp_path: Path) -> None:
    common = ("dataset: 'synthetic:8x8x3:4', model: small-cnn, width: 4, epochs: 1, train_subset: 64, "
              "batch_size: 32, progress: false, tensorboard: false, eval_n: 16, threads: 1")
    path = tmp_path / "e.yaml"
    path.write_text(
        "experiment: toy\nprimary_metric: fgsm\nstages:\n"
        "  - name: standard\n    row: Standard\n    curve: Standard\n"
        f"    config: {{method: standard, {common}}}\n"
        f"  - name: fast\n    curve: fast-AT\n    sweep: {{eps: [2/255, 8/255]}}\n"
        f"    config: {{method: fast-at, {common}}}\n"
        "  - name: fast\n    row: fast-AT\n    sweep: {seed: [1]}\n"
        f"    config: {{method: fast-at, eps: 8/255, {common}}}\n"
        "evaluation:\n  - {attacks: [clean, fgsm], n: 32}\n")
    out = run_experiment(path, out_dir=str(tmp_path / "out"), log=lambda *a: None)
    for name in ("frontier-clean.png", "frontier-cost.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## FGSM per compute and per clean accuracy" in md and "**At equal compute**" in md
    assert "| fast-AT | 3 | 4 |" in md  # two eps points and the second seed; 2 forward + 2 backward per image
    report = (out / "report.html").read_text()
    assert 'alt="frontier-clean"' in report and 'alt="frontier-cost"' in report


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["animals-to-vehicles", "mnist-to-cifar10-frontier"])
def test_the_frontier_files_sweep_every_method_on_both_activations_with_a_second_seed(name: str,
                                                                                     tmp_path: Path) -> None:
    from igam.experiment import load_experiment, resolve_stage

    exp = load_experiment(ROOT / "experiments" / "cpu" / f"{name}.yaml", out_dir=str(tmp_path))
    cfgs = {st.name: resolve_stage(exp, st) for st in exp.stages}
    curves: dict[str, set[str]] = {}
    for st in exp.stages:
        if st.curve:
            curves.setdefault(st.curve, set()).add(st.name)
    for act in ("ReLU", "GELU"):
        for method, points in (("Standard", 1), ("PGD-7", 3), ("fast-AT", 3), ("free-AT", 3), ("IGAM", 4),
                               ("IGAM lambda_adv=0", 4), ("igr", 4), ("kd-noise", 4)):
            stages = curves[f"{method} ({act})"]
            assert len(stages) == points
            assert {cfgs[s].activation for s in stages} == {act.lower()}
            if points > 1:  # swept along its own knob, the rest equal
                assert len({str(cfgs[s].to_dict()) for s in stages}) == points
    assert any(st.curve.startswith("FT") for st in exp.stages)
    seeds = [st for st in exp.stages if cfgs[st.name].seed == 1]
    assert len(seeds) == 16 + 9 and all(st.row and not st.curve for st in seeds)
    # the other routes from the robust teacher (issue 22): each swept along its own knob, with a second seed
    routes = {"FT all layers": (3, "finetune"), "robust start + fast-AT": (3, "fast-at"), "RRM": (4, "rrm"),
              "IGAM cos, lambda_adv=0": (3, "igam"), "ARD (FGSM-RS)": (3, "ard"),
              "RSLAD (one step)": (3, "rslad"),
              "fast-AT + feature term": (3, "fast-at"), "fast-AT + soft labels": (2, "fast-at"),
              "fast-AT + input-gradient term": (1, "fast-at")}
    for curve, (points, method) in routes.items():
        stages = curves[curve]
        assert len(stages) == points and {cfgs[s].method for s in stages} == {method}, curve
        assert len({str(cfgs[s].to_dict()) for s in stages}) == points
        assert any(st.row.startswith(curve) for st in seeds), curve
    assert {cfgs[s].model for s in curves["robust start + fast-AT"]} == {"teacher"}
    assert {cfgs[s].teacher_term for s in curves["fast-AT + feature term"]} == {"feature"}
    assert {cfgs[s].diff_loss for s in curves["IGAM cos, lambda_adv=0"]} == {"cos"}
    strong = [ev for ev in exp.evaluation if "autoattack" in ev["attacks"]]
    assert any(not ev.get("rows") and ev["n"] >= 500 for ev in strong)  # every point, n >= 500
    if name == "animals-to-vehicles":
        assert cfgs["teacher_ft"].teacher == "igam:cifar10-animals-linf-8-255"
        assert shipped.certificate(cfgs["teacher_ft"].teacher)["dataset"] == "cifar10:animals"
        assert cfgs["standard"].dataset == "cifar10:vehicles" and cfgs["teacher_ft"].adapter == "identity"
    else:
        assert cfgs["teacher_ft"].teacher == "igam:mnist-linf-0.3" and cfgs["standard"].dataset == "cifar10"
