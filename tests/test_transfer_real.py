"""End to end on real data (paper Table 1 in miniature): a robust madry-mnist teacher, fine-tuned on CIFAR-10
through gray+crop28, transfers robustness to an IGAM student; a standard student of the same architecture
and budget gets none. This is the full `igam demo` on real data (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest

from igam.demo import demo


@pytest.mark.slow
def test_igam_transfers_robustness_on_real_mnist_to_cifar10(real_data_dir, real_cifar_dir, tmp_path):
    assert (real_data_dir / "mnist.npz").exists()
    out = demo(out_dir=str(tmp_path), data_dir=str(real_cifar_dir), log=lambda *a: None)
    rows = {r["stage"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    igam, std = rows["igam"]["accuracy"], rows["standard"]["accuracy"]
    key = "pgd10@eps=4/255"
    # robustness transfers: PGD-10 at 4/255 at least 8 points above the standard student's
    assert igam[key] >= std[key] + 8, (igam, std)
    # the student's input gradients came to resemble the teacher's (held-out images, last evaluation)
    last = (out / "igam" / "eval_log.csv").read_text().strip().splitlines()
    header, values = last[0].split(","), last[-1].split(",")
    assert float(values[header.index("cos_js_jt")]) >= 0.3
    # and it still classifies: clean accuracy far above chance (10%)
    assert igam["clean"] >= 30
