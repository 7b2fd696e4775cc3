"""Class subsets of a dataset (`NAME:CLASSES`): relabelled in the order given, in both splits, recorded in a
run's dataset name so that evaluation and teachers reload the same subset; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from igam.config import make_config
from igam.data import load_arrays, load_data, make_synthetic, spec_of
from igam.data.subsets import resolve_classes, split_subset
from igam.errors import IgamError
from igam.experiment.costs import train_images
from igam.experiment.spec import miniature_dataset
from igam.runs import Run

QUIET = dict(progress=False, tensorboard=False, threads=1, log_every=5)


def test_split_subset_finds_the_classes_in_every_kind_of_name(tmp_path: Path) -> None:
    assert split_subset("cifar10:animals") == ("cifar10", "animals")
    assert split_subset("cifar10:0,1,8,9") == ("cifar10", "0,1,8,9")
    assert split_subset("cifar10") == ("cifar10", None)
    assert split_subset("cifar10:") == ("cifar10", "")
    assert split_subset("synthetic:8x8x3:4") == ("synthetic:8x8x3:4", None)
    assert split_subset("synthetic:8x8x3:4:3,1") == ("synthetic:8x8x3:4", "3,1")
    assert split_subset(f"npz:{tmp_path}/d.npz:0,1") == (f"npz:{tmp_path}/d.npz", "0,1")
    assert split_subset(f"npz:{tmp_path}/d.npz") == (f"npz:{tmp_path}/d.npz", None)
    odd = tmp_path / "a:b"  # a path whose last ':' field is part of an existing file name
    odd.write_bytes(b"")
    assert split_subset(f"npz:{odd}") == (f"npz:{odd}", None)


def test_subset_keeps_its_classes_in_both_splits_relabelled_in_the_order_given() -> None:
    whole = make_synthetic("synthetic:8x8x3:5")
    sub = load_arrays("synthetic:8x8x3:5:4,1,2")
    assert sub.name == "synthetic:8x8x3:5:4,1,2"
    assert sub.class_names == ["class4", "class1", "class2"] and sub.num_classes == 3
    for xs, ys, xw, yw in ((sub.x_train, sub.y_train, whole.x_train, whole.y_train),
                           (sub.x_test, sub.y_test, whole.x_test, whole.y_test)):
        for new, old in enumerate((4, 1, 2)):
            assert torch.equal(xs[ys == new], xw[yw == old])  # same images, same order, new label
        assert len(ys) == int(sum((yw == c).sum() for c in (4, 1, 2)))
    spec = spec_of(sub)
    assert spec.dataset == "synthetic:8x8x3:5:4,1,2" and spec.num_classes == 3
    # train/test subsets are the first N images of the class subset
    small = load_data("synthetic:8x8x3:5:4,1,2", train_subset=10, test_subset=7)
    assert torch.equal(small.x_train, sub.x_train[:10]) and torch.equal(small.y_test, sub.y_test[:7])


def test_subset_by_class_names_from_an_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = np.array(["airplane", "automobile", "bird", "cat"])
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(40) % 4, x_test=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(12) % 4, class_names=names)
    a = load_arrays(f"npz:{tmp_path / 'd.npz'}:Cat,bird")
    assert a.class_names == ["cat", "bird"] and a.y_train.tolist() == [1, 0] * 10
    assert len(a.x_test) == 6
    assert load_arrays(f"npz:{tmp_path / 'd.npz'}:3,2").class_names == ["cat", "bird"]


@pytest.mark.parametrize("name,msg", [
    ("synthetic:8x8x3:5:odd", "unknown class subset 'odd'.*synthetic:8x8x3:5 has no named subsets"),
    ("synthetic:8x8x3:5:0,7", "class 7 is out of range; synthetic:8x8x3:5 has 5 classes, 0 .. 4"),
    ("synthetic:8x8x3:5:1,2,1", "class 1 \\(class1\\) is named twice"),
    ("synthetic:8x8x3:5:3", "at least two classes"),
    ("synthetic:8x8x3:5:", "names no classes"),
    ("synthetic:8x8x3:5:1,,2", "has an empty entry"),
    ("synthetic:8x8x3:5:class1,clas2", "no class is named 'clas2'. Did you mean 'class2'"),
    ("synthetic:8x8x3:5:-1", "class -1 is out of range; synthetic:8x8x3:5 has 5 classes, 0 .. 4"),
])
def test_bad_subsets_give_clear_errors(name: str, msg: str) -> None:
    with pytest.raises(IgamError, match=msg):
        load_arrays(name)


def test_named_subsets_resolve_and_unknown_names_are_suggested() -> None:
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert resolve_classes("cifar10", "animals", names, 10) == [2, 3, 4, 5, 6, 7]
    assert resolve_classes("cifar10", "vehicles", names, 10) == [0, 1, 8, 9]
    assert resolve_classes("cifar10", "ANIMALS", names, 10) == [2, 3, 4, 5, 6, 7]  # any case, as class names
    with pytest.raises(IgamError, match="'vehicles'.*cifar10's named subsets: animals, vehicles"):
        resolve_classes("cifar10", "vehicle", names, 10)


def test_cost_estimates_and_miniatures_know_the_subset() -> None:
    assert train_images("cifar10:animals") == 30000 and train_images("cifar10:vehicles") == 20000
    assert train_images("cifar10:vehicles", 12000) == 12000 and train_images("cifar10:cat,dog") == 10000
    assert miniature_dataset("cifar10:animals") == "synthetic:32x32x3:10:2,3,4,5,6,7"
    assert miniature_dataset("cifar10:vehicles") == "synthetic:32x32x3:10:0,1,8,9"
    assert miniature_dataset("cifar10:cat,dog") == "synthetic:32x32x3:2"
    assert miniature_dataset("cifar10") == "synthetic:32x32x3:10"


def test_a_teacher_on_one_subset_transfers_to_another_and_runs_reload_their_subset(tmp_path: Path) -> None:
    """The animals -> vehicles pattern in miniature: a teacher on classes 0-2, its head fine-tuned on classes
    3-5 through the identity adapter; evaluation reloads each run's own subset from its recorded name."""
    from igam.evaluate import evaluate_run
    from igam.teachers import load_teacher
    from igam.train import train

    common = dict(QUIET, model="small-cnn", width=4, batch_size=32, eval_n=32, out_dir=str(tmp_path))
    teacher = train(make_config(overrides=dict(common, dataset="synthetic:8x8x3:6:0,1,2", epochs=1,
                                               name="teacher")), log=lambda *a: None)
    assert Run(teacher).meta["data"]["dataset"] == "synthetic:8x8x3:6:0,1,2"
    assert load_teacher(teacher).fc.out_features == 3
    ft = train(make_config(overrides=dict(common, method="finetune", teacher=str(teacher), adapter="identity",
                                          dataset="synthetic:8x8x3:6:5,3,4", epochs=1, name="ft")),
               log=lambda *a: None)
    meta = Run(ft).meta
    assert meta["data"]["dataset"] == "synthetic:8x8x3:6:5,3,4" and meta["data"]["num_classes"] == 3
    assert meta["data"]["class_names"] == ["class5", "class3", "class4"]
    whole = make_synthetic("synthetic:8x8x3:6")
    n_test = int(sum((whole.y_test == c).sum() for c in (3, 4, 5)))
    res = evaluate_run(ft, ["clean"], n=100000, batch_size=256)
    assert res["clean"]["n"] == n_test  # the subset's test images, not the whole test set


def test_real_cifar10_animals_and_vehicles(real_cifar_dir: Path) -> None:
    animals = load_arrays("cifar10:animals", real_cifar_dir)
    assert animals.class_names == ["bird", "cat", "deer", "dog", "frog", "horse"]
    assert animals.y_train.bincount().tolist() == [5000] * 6
    assert animals.y_test.bincount().tolist() == [1000] * 6
    vehicles = load_data("cifar10:vehicles", str(real_cifar_dir), train_subset=12000)
    assert vehicles.class_names == ["airplane", "automobile", "ship", "truck"]
    assert len(vehicles.x_train) == 12000 and len(vehicles.x_test) == 4000
    assert load_arrays("cifar10:truck,ship", real_cifar_dir).class_names == ["truck", "ship"]


def test_a_teacher_finetuned_on_other_classes_or_another_order_is_refused(tmp_path: Path) -> None:
    """A fine-tuned teacher's head labels its own subset's classes: a student on the same number of classes
    but other ones, or the same ones in another order, would match gradients of the wrong classes."""
    from igam.teachers import frozen_teacher
    from igam.train import train

    common = dict(QUIET, model="small-cnn", width=4, batch_size=32, eval_n=32, out_dir=str(tmp_path),
                  train_subset=64, epochs=0.5)
    teacher = train(make_config(overrides=dict(common, dataset="synthetic:8x8x3:6:0,1,2", name="teacher")),
                    log=lambda *a: None)
    ft = train(make_config(overrides=dict(common, method="finetune", teacher=str(teacher), adapter="identity",
                                          dataset="synthetic:8x8x3:6:5,3,4", name="ft")), log=lambda *a: None)
    same = spec_of(load_data("synthetic:8x8x3:6:5,3,4"))
    assert frozen_teacher(ft, same.shape, 3, class_names=same.class_names, dataset=same.dataset) is not None
    for other in ("synthetic:8x8x3:6:3,4,5", "synthetic:8x8x3:6:0,1,2"):
        spec = spec_of(load_data(other))
        with pytest.raises(IgamError, match=r"fine-tuned on synthetic:8x8x3:6:5,3,4.*other classes") as e:
            frozen_teacher(ft, spec.shape, 3, class_names=spec.class_names, dataset=spec.dataset)
        assert f"igam finetune teacher={teacher} dataset={other}`" in str(e.value)
