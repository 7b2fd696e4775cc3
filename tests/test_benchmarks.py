"""The benchmarks still run: benchmarks/step_cost.py --tiny (seconds). Speed itself is not asserted here:
the figures and targets live in docs/PERFORMANCE.md, measured with the full benchmark on a quiet machine."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step_cost():
    return _load("step_cost")


def test_step_cost_tiny_runs_every_method_and_reports_ratios(step_cost, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = step_cost.main(["--tiny", "--threads", "1", "--quiet", "--json", str(tmp_path / "r.json")])
    methods = {"standard", "pgd7", "igam-exact", "igam-fd-central", "igam-fd-forward"}
    assert set(out["seconds_per_step"]) == methods
    assert all(len(t) == 2 and all(s > 0 for s in t) for t in out["all_times"].values())
    assert set(out["ratios"]) == {"igam-exact / pgd7", "igam-fd-central / pgd7", "igam-fd-central / standard",
                                  "igam-fd-forward / pgd7", "igam-fd-forward / standard"}
    assert all(math.isfinite(v) and v > 0 for v in out["ratios"].values())
    assert json.loads((tmp_path / "r.json").read_text())["ratios"] == out["ratios"]
    printed = capsys.readouterr().out
    assert "igam-fd-forward / pgd7" in printed and "target <= 0.3" in printed and "images/s" in printed
    assert "1-min load average" in printed


def test_step_cost_teacher_cache_times_cached_beside_uncached(step_cost,
                                                              capsys: pytest.CaptureFixture) -> None:
    """--teacher-cache: each IGAM method also with the cache, warm (the teacher is asked in warm-up only)."""
    out = step_cost.main(["--tiny", "--threads", "1", "--quiet", "--memory", "off", "--teacher-cache",
                          "--clock", "cpu"])
    cached = {"igam-exact+cache", "igam-fd-central+cache", "igam-fd-forward+cache"}
    assert cached <= set(out["seconds_per_step"]) and out["teacher_cache"] and out["warmup"] >= 1
    assert out["clock"] == "cpu"
    assert {"igam-exact+cache / standard", "igam-exact+cache / igam-exact",
            "igam-fd-forward+cache / igam-fd-forward"} <= set(out["extra_ratios"])
    printed = capsys.readouterr().out
    assert "igam-fd-forward+cache / standard" in printed and "target <= 2.2" in printed
    assert "igam-exact+cache / standard" in printed and "target <= 2.9" in printed


def test_step_cost_times_pytorchs_double_backward_beside_the_lean_one(
        step_cost, capsys: pytest.CaptureFixture) -> None:
    """--torch-double-backward: exact IGAM with double_backward=torch beside the default lean one."""
    out = step_cost.main(["--tiny", "--threads", "1", "--quiet", "--memory", "off",
                          "--torch-double-backward", "--model", "resnet20", "--fd-scheme", "forward"])
    assert out["torch_double_backward"]
    assert {"igam-exact", "igam-exact-torchdb"} <= set(out["seconds_per_step"])
    assert "igam-exact / igam-exact-torchdb" in out["extra_ratios"]
    assert "igam-exact / igam-exact-torchdb" in capsys.readouterr().out


def test_step_cost_steps_really_train(step_cost) -> None:
    """Each method's step changes its own student (a no-op step would time nothing) and the IGAM steps
    also update their discriminator on schedule."""
    import torch

    args = step_cost.parse_args(["--tiny", "--fd-scheme", "forward", "--disc-every", "1"])
    methods = step_cost.build_methods(args, torch.device("cpu"))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for m in methods:
        before = [p.detach().clone() for p in m.model.parameters()]
        disc = getattr(m.objective, "discriminator", None)
        d_before = [p.detach().clone() for p in disc.parameters()] if disc is not None else []
        m.run_step(x, y)
        assert any(not torch.equal(a, b) for a, b in zip(before, m.model.parameters())), m.name
        if disc is not None:
            assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters())), m.name


def test_peak_memory_is_measured_or_explicitly_skipped(step_cost) -> None:
    import torch

    args = step_cost.parse_args(["--tiny", "--fd-scheme", "central"])
    m = step_cost.build_methods(args, torch.device("cpu"))[0]
    mib = step_cost.peak_memory(m, torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.device("cpu"))
    assert mib is None or mib >= 0


def test_fd_accuracy_mode_matches_exact_on_smooth_networks(step_cost) -> None:
    out = step_cost.main(["--tiny", "--threads", "1", "--fd-accuracy"])["cosine"]
    assert set(out) == {"default", "softplus"}
    assert all(v > 0.999 for v in out["softplus"].values())  # smooth: both schemes agree with exact
    assert all(-1 <= v <= 1 for v in out["default"].values())


def test_step_cost_tiny_routes_times_every_route_with_its_passes(step_cost, tmp_path: Path) -> None:
    """--routes: the other routes of issue 22 beside standard and fast AT, each with the passes per image of
    one step as its objective counted them (the same counters that write meta.json's passes_per_image)."""
    out = step_cost.main(["--tiny", "--routes", "--threads", "1", "--quiet", "--json",
                          str(tmp_path / "r.json")])
    routes = {"rrm", "rrm+cache", "igam-cos+cache", "ard-fgsm-rs+cache", "rslad-1step+cache",
              "fast-at+feature+cache", "fast-at+distill+cache", "fast-at+gradient+cache", "fast-at"}
    assert routes <= set(out["seconds_per_step"])
    assert all(s > 0 for r in routes for s in out["all_times"][r])
    ratio = {**out["ratios"], **out.get("extra_ratios", {})}
    assert math.isfinite(ratio["rrm+cache / standard"]) and ratio["rrm+cache / standard"] > 0
    passes = out["passes_per_image"]
    student = {r: (passes[r]["student"]["forward"], passes[r]["student"]["backward"],
                   passes[r]["student"]["double_backward"]) for r in routes}
    # one step per image: what each route's loss needs (teacher passes cached away where "+cache")
    assert student["rrm+cache"] == (1, 1, 0) and "teacher" not in passes["rrm+cache"]
    assert passes["rrm"]["teacher"]["forward"] == 1  # without the cache the teacher's features cost a forward
    assert student["ard-fgsm-rs+cache"] == student["fast-at"] == (2, 2, 0)  # FGSM-RS + the training step
    assert student["rslad-1step+cache"] == student["fast-at+feature+cache"] == (3, 3, 0)  # + a clean pass
    assert student["fast-at+gradient+cache"] == (3, 3, 1) and student["igam-cos+cache"] == (1, 1, 1)
