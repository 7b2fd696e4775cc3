"""A teacher's checks on its own task, made before it is fine-tuned (igam.objectives.finetune calls them): a
shipped teacher's clean accuracy against its certificate (`check_shipped_teacher`), a teacher run's
robustness (`check_teacher_robustness`: IGAM transfers the teacher's robustness, so a teacher that has none
is worth a warning), and a foreign teacher's clean accuracy on the dataset it was trained on
(`check_foreign_teacher`: near chance means its weights are read wrongly, and is refused). Each measures
with igam.evaluate.run_attack on the first test images of that dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from igam.attacks.presets import default_eps
from igam.data import NAMED, load_data
from igam.data.sources import PREFIXED
from igam.data.subsets import select_classes, split_subset
from igam.errors import IgamError, suggest
from igam.evaluate import run_attack
from igam.models import shipped
from igam.runs import Run
from igam.teachers import NAMED_NORMALIZATION, once

__all__ = ["EXPECTED_CLEAN", "FOREIGN_CHECK_N", "NEAR_CHANCE", "SHIPPED_CHECK_N", "check_foreign_teacher",
           "check_shipped_teacher", "check_teacher_robustness"]


SHIPPED_CHECK_N = 300  # test images on which a shipped teacher's certified clean accuracy is re-measured


def check_shipped_teacher(spec: str, data_dir: str | Path | None, n: int = SHIPPED_CHECK_N,
                          log: Callable[[str], None] = print) -> float | None:
    """Re-measure a shipped teacher's (`igam:NAME`) clean accuracy on the first n test images of its own
    dataset and compare it with its certificate (measured on the first cert['n'] images). Returns the
    accuracy in [0, 1], or None when that dataset is not at hand (said through `log`).

    Raises:
        IgamError: the accuracy is more than 3 binomial standard errors (and 1 point) below the
            certificate's: the weights or the software do not behave as certified.
    """
    cert = shipped.certificate(spec)
    try:
        data = load_data(cert["dataset"], str(data_dir) if data_dir else None, False, 0, n)
    except IgamError:
        log(f"igam: {spec}: {cert['dataset']} is not at hand, so its certified clean accuracy was not "
            "re-measured (the weights' sha256 was checked).")
        return None
    clean = run_attack(shipped.load_shipped(spec), data.x_test, data.y_test, "clean",
                       what=f"The shipped teacher {spec}")["accuracy"]
    want = float(cert["accuracy"]["clean"])
    margin = max(0.01, 3 * (want * (1 - want) / len(data.x_test)) ** 0.5)
    if clean < want - margin:
        raise IgamError(f"The shipped teacher {spec} reaches {100 * clean:.1f}% clean accuracy on the first "
                        f"{len(data.x_test)} {cert['dataset']} test images; its certificate says "
                        f"{100 * want:.1f}% (first {cert['n']}). Its weights or this software do not behave "
                        "as certified: reinstall igam, and report it if it persists.")
    log(f"igam: {spec}: clean accuracy {100 * clean:.1f}% on the first {len(data.x_test)} {cert['dataset']} "
        f"test images (certificate: {100 * want:.1f}% on {cert['n']}).")
    return clean


def check_teacher_robustness(run_dir: Path, n: int = 200, log: Callable[[str], None] = print) -> float | None:
    """Warn when a teacher run is not robust on its own task: PGD-10 accuracy on its first n test images
    at the usual eps (0.3 MNIST-like, 8/255 otherwise) below 5%. Returns the accuracy in [0, 1], or None
    when the run's data is not at hand."""
    run = Run.open(run_dir)
    try:
        data = load_data(run.meta["data"]["dataset"], run.data_dir, False, 0, n)
    except IgamError:
        return None
    model = run.load_model()
    what = f"The teacher run '{run_dir}'"
    clean = run_attack(model, data.x_test, data.y_test, "clean", what=what)["accuracy"]
    robust = run_attack(model, data.x_test, data.y_test, "pgd10", what=what)["accuracy"]
    eps = default_eps(tuple(data.x_test.shape[1:]))[0]
    if robust < 0.05 and once(f"not-robust:{Path(run_dir).resolve()}", log):
        log(
            f"igam: WARNING: the teacher {run_dir} is not robust on its own task: PGD-10 accuracy at eps "
            f"{eps:.3g} is {100 * robust:.1f}% on {len(data.x_test)} test images (clean {100 * clean:.1f}%). "
            "IGAM transfers the teacher's robustness, so expect little; train the teacher with method=pgd-at."
        )
    return robust


# clean accuracy on its own task below which a robust teacher is clearly weaker than expected: set well
# below what published robust models of each dataset reach, so that what it flags is mostly a teacher read
# wrongly (normalisation, channel order, architecture) rather than a weak but honest one
EXPECTED_CLEAN = {"mnist": 0.9, "fashion-mnist": 0.7, "cifar10": 0.6, "cifar100": 0.4, "svhn": 0.8,
                  "tiny-imagenet": 0.25}


NEAR_CHANCE = 2.0  # a teacher below this multiple of chance on its own task is refused
FOREIGN_CHECK_N = 200  # test images of a foreign teacher's own dataset its clean accuracy is measured on


def check_foreign_teacher(model: nn.Module, teacher: str, dataset: str, data_dir: str | Path | None = None,
                          n: int = FOREIGN_CHECK_N, log: Callable[[str], None] = print) -> float | None:
    """Clean accuracy of a foreign teacher (a weights file, or `robustbench:DATASET/...`) on the first n
    test images of the dataset it was trained on, before it is fine-tuned: `dataset` (teacher_dataset; for
    robustbench: names the dataset is implied; 'none' skips the check). A teacher whose weights file does
    not say its dataset, or whose dataset is not at hand, is reported once through `log` as not checked,
    with how to check it. Returns the accuracy in [0, 1], or None when not checked.

    Raises:
        IgamError: for a dataset that is not one (a typo), whose images or classes do not fit the teacher,
            or on which the teacher is near chance (below NEAR_CHANCE x chance: its weights are not read as
            trained; the message names what to check, and teacher_dataset=none to fine-tune it anyway).
    """
    dataset = (dataset or "").strip()
    if dataset.lower() == "none":
        return None
    if not dataset and teacher.startswith("robustbench:"):
        dataset = teacher.partition(":")[2].split("/")[0]
        if dataset not in NAMED:  # e.g. imagenet: no loader here
            log(f"igam: note: the teacher {teacher} was not checked on its own task ({dataset}): igam has no "
                f"loader for {dataset}. Give teacher_dataset=npz:PATH (its test images) to check it.")
            return None
    if not dataset:
        log(f"igam: note: the foreign teacher {teacher} was not checked on its own task: a weights file does "
            "not record the dataset it was trained on. Give teacher_dataset=NAME (e.g. mnist, cifar10) to "
            f"measure its clean accuracy on {n} of its test images before fine-tuning (teacher_dataset=none "
            "silences this note).")
        return None
    base, subset = split_subset(dataset)  # a teacher of some classes: cifar10:animals, mnist:0,1
    if base not in NAMED and not base.startswith(PREFIXED):
        raise IgamError(f"teacher_dataset={dataset!r} is not a dataset.{suggest(base, NAMED)} Give the "
                        f"dataset the teacher was trained on ({', '.join(NAMED)}, npz:PATH, "
                        "imagefolder:PATH; a class subset as NAME:CLASSES, e.g. cifar10:animals), or none to "
                        "skip the check.")
    try:
        data = load_data(base, str(data_dir) if data_dir else None, False, 0, 0 if subset else n)
    except IgamError as e:
        if base not in NAMED:
            raise
        log(f"igam: note: the foreign teacher {teacher} was not checked on its own task: {e} "
            "(teacher_dataset=none silences this note).")
        return None
    if subset is not None:  # a misspelt subset is an error, not a dataset that is not at hand
        data = select_classes(data, subset, dataset)
        data.x_test, data.y_test = data.x_test[:n], data.y_test[:n]
    args = getattr(model, "igam_args", {}) or {}
    shape = (args.get("in_chans"), *(args.get("input_size") or ()))
    classes = getattr(model, "num_classes", None)
    fix = "Is teacher_dataset the teacher's own dataset? Fix it, or teacher_in_shape / teacher_classes."
    if len(shape) == 3 and tuple(shape) != tuple(data.shape):
        raise IgamError(f"teacher_dataset={dataset} has {'x'.join(map(str, data.shape))} images; the teacher "
                        f"{teacher} takes {'x'.join(map(str, shape))}. {fix}")
    if classes and classes != data.num_classes:
        part = (f" (a teacher of some of its classes: name them, e.g. {base}:0,1 or a named subset)"
                if subset is None and classes < data.num_classes else "")
        raise IgamError(f"teacher_dataset={dataset} has {data.num_classes} classes; the teacher {teacher} "
                        f"has {classes}{part}. {fix}")
    was_training = model.training
    model.eval()
    try:
        clean = run_attack(model, data.x_test, data.y_test, "clean",
                           what=f"The teacher {teacher}")["accuracy"]
    finally:
        model.train(was_training)
    k, m = data.num_classes, len(data.x_test)
    said = f"{100 * clean:.1f}% clean accuracy on {m} {dataset} test images"
    example = f"teacher_normalize={base if base in NAMED_NORMALIZATION else 'MEAN,../STD,..'}"
    if clean < NEAR_CHANCE / k:
        raise IgamError(
            f"The teacher {teacher} gets {said}, about chance ({100 / k:.1f}%): its weights are not read as "
            f"they were trained. Check teacher_normalize (the mean/std it was trained with, e.g. {example}), "
            "teacher_model and teacher_in_shape, and that teacher_dataset is its dataset; to fine-tune it "
            "anyway, set teacher_dataset=none.")
    expected = EXPECTED_CLEAN.get(dataset)
    if expected is not None and clean < expected:
        log(f"igam: WARNING: the teacher {teacher} gets only {said} (a robust {dataset} teacher is expected "
            f"above {100 * expected:.0f}%). If it was trained on normalised inputs, set teacher_normalize "
            f"(e.g. {example}); a weak teacher transfers little robustness.")
    else:
        log(f"igam: the teacher {teacher} gets {said}.")
    return clean
