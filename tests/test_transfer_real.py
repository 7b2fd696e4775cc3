"""End to end on real data (paper Table 1 in miniature): the shipped robust MNIST teacher
(igam:mnist-linf-0.3), fine-tuned on CIFAR-10 through gray+crop28, transfers robustness to an IGAM student; a
standard student of the same architecture and budget gets none. This is the full `igam demo` on real data
(a few minutes on 2 CPU cores).

Thresholds are set for this small budget. Measured with the shipped teacher (2026-11-30, the demo file's
threads=2): IGAM vs standard PGD-10 at 8/255 11.4% vs 0.8%, at 4/255 22.2% vs 8.4%, held-out cos(J_s, J_t)
0.063 vs 0.018, clean 39.4%. With the demo's former teacher (1-epoch PGD-AT, trained by the demo) the
cosines were 0.10 vs 0.01 and the cosine margin was 0.05; the strong teacher's student is more accurate
and its gradients turn less far towards the teacher's, so the cosine margin is now 0.03 (IGAM's cosine
still more than three times the standard student's). The larger CPU-scale experiment (docs/RESULTS.md)
reaches cos 0.30; the issue's cos >= 0.3 needs that budget.
"""

from __future__ import annotations

import json

import pytest
import torch

from igam.data import load_data
from igam.demo import demo
from igam.method.gradients import flat_cosine, input_gradient
from igam.runs import load_run_model
from igam.teachers import frozen_teacher


def _cosine_to_teacher(out, run: str, data_dir) -> float:
    d = load_data("cifar10", str(data_dir), False, 0, 256)
    x, y = d.x_test.float() / 255, d.y_test
    jt, _ = input_gradient(frozen_teacher(out / "teacher_ft", (3, 32, 32), 10).eval(), x, y)
    js, _ = input_gradient(load_run_model(out / run), x, y)
    return float(flat_cosine(js, jt).mean())


@pytest.mark.slow
def test_igam_transfers_robustness_on_real_mnist_to_cifar10(real_data_dir, real_cifar_dir, tmp_path):
    assert (real_data_dir / "mnist.npz").exists()
    torch.manual_seed(0)
    out = demo(out_dir=str(tmp_path), data_dir=str(real_cifar_dir), log=lambda *a: None)
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
