"""scripts/gpu-check cannot rot: its --cpu-smoke mode (the whole check on the CPU at tiny sizes) passes and
writes the summary files, --pack writes the data the GPU machine needs, and the budget skips steps with a
recorded reason. The GPU figures themselves come from a run on a GPU (docs/PERFORMANCE.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SLOWER, real_data_root

from igam.data import load_data  # the one igam internal here: how igam reads a data root

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}


def test_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path: Path, gpu_check) -> None:
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", str(out)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300 * SLOWER)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]

    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["mode"] == "cpu-smoke" and summary["passed"] and not summary["failed_steps"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(gpu_check.STEPS)
    for s in steps.values():
        assert s["status"] == "passed" and s["seconds"] > 0 and s["commands"], s
        assert all(c["rc"] == 0 and not c["timed_out"] for c in s["commands"]), s["commands"]
    # tests: the CUDA tests are collected and all skip on a machine without a GPU
    assert steps["tests"]["figures"]["skipped"] >= 5 and steps["tests"]["figures"]["passed"] == 0
    # bench: both students, every method (each IGAM step also cached, exact also with PyTorch's double
    # backward), ratios against standard and PGD-7
    bench = steps["bench"]["figures"]["models"]
    assert set(bench) == set(gpu_check.BENCH_MODELS)
    for res_model in bench.values():
        methods = res_model["methods"]
        igam = {"igam-exact", "igam-exact-torchdb", "igam-fd-central", "igam-fd-forward"}
        assert set(methods) == {"standard", "pgd7", *igam, *(f"{m}+cache" for m in igam)}
        assert methods["standard"]["x_standard"] == 1.0 and methods["pgd7"]["x_pgd7"] == 1.0
        assert all(m["images_per_s"] > 0 for m in methods.values())
    # transfer: every stage finished and was evaluated; seconds per epoch for every student
    stages = steps["transfer"]["figures"]["stages"]
    assert set(stages) == {"teacher", "teacher_ft", *gpu_check.STUDENTS}
    for name in gpu_check.STUDENTS:
        st = stages[name]
        assert st["status"] == "finished" and st["device"] == "cpu"
        assert st["s_per_epoch"] > 0 and st["images_per_s"] > 0 and st["pgd20"] is not None
    assert {"igam / pgd7", "igam_fd / pgd7"} <= set(steps["transfer"]["figures"]["epoch_ratios"])
    assert {"igam / pgd7", "igam_fd / pgd7"} <= set(steps["transfer"]["figures"]["steady_time_ratios"])
    # ddp: the DDP steps (gloo on the CPU) and the CLI under torchrun
    ddp = steps["ddp"]["figures"]
    assert ddp["ddp_smoke"]["ok"] and ddp["ddp_smoke"]["backend"] == "gloo"
    assert set(ddp["ddp_smoke"]["modes"]) == {"exact", "fd-central", "fd-forward"}
    assert ddp["cli"]["status"] == "finished" and ddp["cli"]["world_size"] == 1

    md = (out / "gpu-check.md").read_text()
    assert "| step | status | seconds |" in md
    for title in gpu_check.TITLES.values():
        assert f"| {title} | passed" in md, title
    assert "| resnet20 | 8 | standard |" in md and "| igam-fd-forward |" in md
    assert "| igam | igam | preact-resnet18 | 1 |" in md and "igam / pgd7" in md
    assert md in res.stdout  # the tables end the printed output (what a remote run shows)


def test_a_spent_budget_skips_steps_with_the_reason(tmp_path: Path, gpu_check) -> None:
    rc = gpu_check.main(["--cpu-smoke", str(tmp_path), "--budget-s", "1", "--steps", "tests,ddp"])
    assert rc == 0  # skipped is recorded, not failed
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["skipped: budget", "skipped: budget"]
    assert summary["skipped_steps"] == ["tests", "ddp"] and not summary["passed"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert "skipped: tests, ddp" in md and md.count("| skipped: budget |") == 2


def test_a_failing_step_does_not_stop_the_next_and_sets_the_exit_status(
        tmp_path: Path, gpu_check, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(r, step) -> None:
        r.run(step, [sys.executable, "-c", "print('the last words'); raise SystemExit(3)"], 30)

    def crashing(r, step) -> None:
        raise ZeroDivisionError("a bug in a step")

    def slow(r, step) -> None:
        r.run(step, [sys.executable, "-c", "import time; time.sleep(30)"], 1)

    def fine(r, step) -> None:
        step.figures["seen"] = True

    monkeypatch.setattr(gpu_check, "STEP_FUNCS", {"tests": broken, "bench": crashing, "transfer": slow,
                                                  "ddp": fine})
    assert gpu_check.main(["--cpu-smoke", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["tests"]["status"] == "failed" and "exit status 3" in steps["tests"]["error"]
    assert steps["bench"]["status"] == "failed"
    assert "ZeroDivisionError: a bug in a step" in steps["bench"]["error"]
    assert steps["transfer"]["status"] == "failed" and "timed out" in steps["transfer"]["error"]
    assert steps["transfer"]["commands"][0]["timed_out"] and steps["transfer"]["seconds"] < 20
    assert steps["ddp"]["status"] == "passed" and steps["ddp"]["figures"] == {"seen": True}
    assert summary["failed_steps"] == ["tests", "bench", "transfer"]
    log = (tmp_path / "gpu-check.log").read_text()
    assert "the last words" in log and "Traceback" in log and "ZeroDivisionError" in log
    assert "FAILED: tests, bench, transfer" in (tmp_path / "gpu-check.md").read_text()


def test_bad_arguments_and_a_missing_gpu_give_clear_errors(tmp_path: Path, gpu_check,
                                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "give OUTDIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-smoke", str(tmp_path), "--steps", "tests,typo"])
    assert "unknown ['typo']" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main([str(tmp_path / "gpu")]) == 2
        assert "no CUDA device: run with --cpu-smoke or on a GPU machine" in capsys.readouterr().err


def test_pack_writes_the_arrays_igam_reads_and_excludes_the_folder(tmp_path: Path, gpu_check) -> None:
    root = real_data_root("cifar10.npz")
    if root is None or not (root / "mnist.npz").is_file():
        pytest.skip("real data absent: no mnist.npz and cifar10.npz in $IGAM_DATA or ../shared/data")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    out = repo / ".gpu-data"
    said: list[str] = []
    info = gpu_check.pack(str(root), out, 64, 32, say=said.append)
    gpu_check.pack(str(root), out, 64, 32, say=said.append)  # twice: the exclude line is added once

    with np.load(out / "cifar10.npz", allow_pickle=False) as d, np.load(root / "cifar10.npz") as src:
        assert d["x_train"].shape == (64, 32, 32, 3) and d["x_train"].dtype == np.uint8
        assert d["x_test"].shape == (32, 32, 32, 3) and d["y_test"].dtype == np.int64
        assert np.array_equal(d["x_test"], src["x_test"][:32]) and np.array_equal(d["y_train"],
                                                                                  src["y_train"][:64])
        assert list(d["class_names"]) == list(src["class_names"])
    assert (out / "mnist.npz").read_bytes() == (root / "mnist.npz").read_bytes()  # all of MNIST, as is
    assert info["bytes"] == sum(f.stat().st_size for f in out.iterdir())
    assert any("MiB" in line for line in said)

    exclude = (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert exclude.count("/.gpu-data/") == 1
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                            check=True).stdout
    assert ".gpu-data" not in status

    arrays = load_data("cifar10", str(out))  # igam reads the packed folder as a data root
    assert tuple(arrays.x_train.shape) == (64, 3, 32, 32) and len(arrays.class_names) == 10
