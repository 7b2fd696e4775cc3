"""End to end on real data (paper Table 1 in miniature): the shipped robust MNIST teacher
(igam:mnist-linf-0.3), fine-tuned on CIFAR-10 through gray+crop28, transfers robustness to an IGAM student; a
standard student of the same architecture and budget gets none. This is the full `igam demo` on real data
(a few minutes on 2 CPU cores).

The other routes of issue 22 (RRM, ARD, RSLAD, the cosine matching term, whole-network fine-tuning) are
trained on the demo's fine-tuned teacher with a smaller budget (4000 CIFAR-10 images, 3 epochs) and
compared with the demo's standard student (10000 images, 6 epochs: a larger budget, so the comparison is
conservative for robustness). All tests of this file share one demo, made once for all test processes (a
file lock). Measured on the
demo's setting (10000 images, 6 epochs, 2026-12-07, calibration of this file): PGD-10 at 8/255 on 500
test images: standard 1.0, ARD (FGSM-RS) 15.4, RSLAD (one step) 16.8, whole-network FT 6.6, IGAM cos
4.6, RRM 1.4; at 4/255: 8.8, 23.2, 24.2, 16.2, 17.8, 9.6. RRM's features through its learned projection
reached cosine 0.68 with the teacher's while its robustness stayed at the standard student's (at this
scale RRM transfers no robustness; docs/RESULTS.md finds the same): its test asserts the mechanism, not
robustness.

Thresholds are set for this small budget. Measured with the shipped teacher (2026-11-30, the demo file's
threads=2): IGAM vs standard PGD-10 at 8/255 11.4% vs 0.8%, at 4/255 22.2% vs 8.4%, held-out cos(J_s, J_t)
0.063 vs 0.018, clean 39.4%. With the demo's former teacher (1-epoch PGD-AT, trained by the demo) the
cosines were 0.10 vs 0.01 and the cosine margin was 0.05; the strong teacher's student is more accurate
and its gradients turn less far towards the teacher's, so the cosine margin is now 0.03 (IGAM's cosine
still more than three times the standard student's). The larger CPU-scale experiment (docs/RESULTS.md)
reaches cos 0.30; the issue's cos >= 0.3 needs that budget.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from igam.config import make_config
from igam.data import load_data
from igam.demo import demo
from igam.evaluate import run_attack
from igam.method.gradients import flat_cosine, input_gradient
from igam.runs import load_run_model
from igam.teachers import frozen_teacher
from igam.train import train


def _cosine_to_teacher(out, run: str, data_dir) -> float:
    d = load_data("cifar10", str(data_dir), False, 0, 256)
    x, y = d.x_test.float() / 255, d.y_test
    jt, _ = input_gradient(frozen_teacher(out / "teacher_ft", (3, 32, 32), 10).eval(), x, y)
    js, _ = input_gradient(load_run_model(out / run), x, y)
    return float(flat_cosine(js, jt).mean())


@pytest.fixture(scope="session")
def demo_out(real_data_dir, real_cifar_dir, tmp_path_factory) -> Path:
    """One real demo for the whole session: the first test process makes it under a file lock in the
    folder all xdist workers share; the others wait for it and reuse it."""
    from filelock import FileLock

    assert (real_data_dir / "mnist.npz").exists()
    shared = tmp_path_factory.getbasetemp().parent  # (the base folder of every worker's tmp_path)
    out, done = shared / "real-demo", shared / "real-demo.done"
    with FileLock(str(shared / "real-demo.lock")):
        if not done.exists():
            torch.manual_seed(0)
            out = demo(out_dir=str(out), data_dir=str(real_cifar_dir), log=lambda *a: None)
            done.write_text(str(out))
    return Path(done.read_text())


@pytest.mark.slow
def test_igam_transfers_robustness_on_real_mnist_to_cifar10(demo_out, real_cifar_dir):
    out = demo_out
    rows = {r["stage"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    igam, std = rows["igam"]["accuracy"], rows["standard"]["accuracy"]
    # robustness transfers: far above the standard student at the paper's eps, clearly above at 4/255
    assert igam["pgd10"] >= std["pgd10"] + 8, (igam, std)
    assert igam["pgd10@eps=4/255"] >= std["pgd10@eps=4/255"] + 5, (igam, std)
    # the student's input gradients turned towards the teacher's (held-out images), the standard one's did not
    cos_igam = _cosine_to_teacher(out, "igam", real_cifar_dir)
    cos_standard = _cosine_to_teacher(out, "standard", real_cifar_dir)
    assert cos_igam >= cos_standard + 0.03 and cos_igam >= 2 * cos_standard, (cos_igam, cos_standard)
    # and it still classifies: clean accuracy well above chance (10%)
    assert igam["clean"] >= 20


# ------------------------------------------------------------------------------------------------------
# the other routes (issue 22), each on the demo's fine-tuned teacher
ROUTE = {"dataset": "cifar10", "train_subset": 4000, "test_subset": 500, "augment": "none",
         "progress": False, "tensorboard": False, "eval_every": 0, "eval_n": 100, "seed": 0, "threads": 2}
STUDENT = {"model": "small-cnn", "width": 16, "epochs": 3, "optimizer": "adam", "lr": 0.002,
           "weight_decay": 0, "batch_size": 64}


def _route(demo_out: Path, data_dir: Path, name: str, **kw) -> Path:
    out = demo_out / "routes"
    cfg = make_config(overrides={**ROUTE, "data_dir": str(data_dir), "out_dir": str(out), "name": name, **kw})
    return train(cfg, log=lambda *a: None)


def _ft(demo_out: Path) -> str:
    return str(demo_out / "teacher_ft")


def _pgd10(run: Path, data_dir: Path, eps: str) -> float:
    d = load_data("cifar10", str(data_dir), False, 0, 500)
    return 100 * run_attack(load_run_model(run), d.x_test, d.y_test, "pgd10", eps=eps)["accuracy"]


def _standard(demo_out: Path, eps: str) -> float:
    rows = {r["stage"]: r for r in json.loads((demo_out / "results.json").read_text())["rows"]}
    key = "pgd10" if eps == "8/255" else f"pgd10@eps={eps}"
    return rows["standard"]["accuracy"][key]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ard", "rslad"])
def test_robust_distillation_students_are_more_robust_than_standard(demo_out, real_cifar_dir, method):
    """ARD / RSLAD with a one-step attack (FGSM-RS at 8/255): the student's own adversarial examples, the
    teacher's soft labels on clean images. Measured 15.4 / 16.8 vs 1.0 at the demo's budget."""
    run = _route(demo_out, real_cifar_dir, method, **STUDENT, method=method, teacher=_ft(demo_out),
                 eps="8/255", steps=1, step_size="10/255")
    assert _pgd10(run, real_cifar_dir, "8/255") >= _standard(demo_out, "8/255") + 6


@pytest.mark.slow
def test_whole_network_fine_tuning_moves_the_body_and_keeps_robustness(demo_out, real_cifar_dir):
    """finetune_layers=all: the robust teacher's body learns too (at finetune_body_lr x finetune_lr); its
    weights move away from the robust start, and the student keeps more PGD accuracy than standard
    (measured 16.2 vs 8.8 at 4/255)."""
    from igam.models.shipped import load_shipped

    run = _route(demo_out, real_cifar_dir, "ft_all", method="finetune", teacher="igam:mnist-linf-0.3",
                 adapter="gray+crop28", epochs=2, finetune_layers="all")
    teacher = load_shipped("igam:mnist-linf-0.3").state_dict()
    start = {k: v for k, v in teacher.items() if v.is_floating_point()}
    tuned = load_run_model(run).state_dict()
    same = {k: [t for n, t in tuned.items() if n.endswith("." + k) and t.shape == v.shape]
            for k, v in start.items()}
    assert all(same.values()), [k for k, v in same.items() if not v]  # every teacher tensor is in the student
    moved = [k for k, v in start.items() if not any(torch.equal(t, v) for t in same[k])]
    assert len(moved) >= len(start) - 2, (moved, list(start))  # the body's layers learned, not the head only
    assert _pgd10(run, real_cifar_dir, "4/255") >= _standard(demo_out, "4/255") + 3


@pytest.mark.slow
def test_cosine_matching_turns_the_input_gradients_towards_the_teachers(demo_out, real_cifar_dir):
    """IGAM with diff_loss=cos (direction only; perceptually aligned gradients) and no discriminator: the
    held-out cos(J_s, J_t) rises above the standard student's (measured at this budget, 2026-12-07: 0.041
    against 0.020). Its robustness is not asserted at this budget (not calibrated; at the demo's budget PGD-10
    at 4/255 read 17.8 against 8.8)."""
    run = _route(demo_out, real_cifar_dir, "igam_cos", **STUDENT, method="igam", teacher=_ft(demo_out),
                 lambda_adv=0, diff_loss="cos", lambda_diff="auto")
    (demo_out / "igam_cos").symlink_to(run, target_is_directory=True)  # (for _cosine_to_teacher)
    cos, cos_standard = (_cosine_to_teacher(demo_out, r, real_cifar_dir) for r in ("igam_cos", "standard"))
    assert cos >= cos_standard + 0.01 and cos >= 1.5 * cos_standard, (cos, cos_standard)


@pytest.mark.slow
def test_rrm_pulls_the_students_features_to_the_teachers(demo_out, real_cifar_dir):
    """RRM (cosine of penultimate features through a learned projection, clean images only): the logged
    feature cosine keeps rising over training (measured at this budget, 2026-12-07: 0.54 over the first
    logging interval, 0.66 at the end), while the student still classifies. Its robustness is not asserted:
    measured, it stays at the standard student's at this scale."""
    run = _route(demo_out, real_cifar_dir, "rrm", **STUDENT, method="rrm", teacher=_ft(demo_out))
    rows = list(csv.DictReader((run / "log.csv").open()))
    first, last = float(rows[0]["feature_cos"]), float(rows[-1]["feature_cos"])
    assert last >= 0.5 and last >= first + 0.05, (first, last)
    d = load_data("cifar10", str(real_cifar_dir), False, 0, 500)
    assert 100 * run_attack(load_run_model(run), d.x_test, d.y_test, "clean")["accuracy"] >= 30
