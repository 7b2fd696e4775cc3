"""Two lines for a researcher with a model: load a robust model, benchmark any classifier.

    import igam
    model = igam.load("igam:mnist-linf-0.3")        # a run folder, igam:NAME, robustbench:..., a weights file
    print(igam.benchmark(model, dataset="mnist", eps=0.3, attacks=["clean", "pgd20"], n=100))

`load` returns an eval-mode `nn.Module` that takes (N, C, H, W) float images in [0, 1] and returns logits
(N, K), with what is known about it in `model.igam_info` (a `ModelInfo`); the first time it is fed values
outside [0, 1] (0-255 pixels, normalised images) it warns once. `benchmark` evaluates any classifier with
the attacks, checks and records of `igam evaluate` (`igam.evaluate.evaluate_model`: the same code) and
returns a `BenchmarkResult` that prints as `igam evaluate`'s table.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import igam.progress as bars
from igam.attacks.checks import summary as check_summary
from igam.data import NAMED, default_data_dir
from igam.errors import IgamError
from igam.evaluate import evaluate_model, evaluate_run, test_images
from igam.models import robustbench_zoo, shipped
from igam.records import worst_case
from igam.runs import Run
from igam.summary import format_sweep_table, format_table, headline_lines, per_class_text
from igam.teachers import load_teacher
from igam.utils import torch_threads

__all__ = ["BenchmarkResult", "InputRangeWarning", "ModelInfo", "benchmark", "load", "spec_folder"]


class InputRangeWarning(UserWarning):
    """A model loaded by `igam.load` was fed values outside [0, 1]."""


@dataclass
class ModelInfo:
    """What `igam.load` knows about a model (its `igam_info`).

    spec: what was loaded (a run folder, igam:NAME, robustbench:DATASET/THREAT/NAME, a weights file);
    kind: 'run' | 'shipped' | 'robustbench' | 'file'; dataset: the task it classifies (its test set is
    `benchmark`'s default), or None when unknown; eps: the L-inf radius its robustness was certified or
    trained at (input units in [0, 1]), or None; input_shape: (C, H, W); num_classes: K; details: the run's
    meta.json or the shipped teacher's certificate ({} otherwise)."""

    spec: str
    kind: str
    dataset: str | None = None
    eps: float | None = None
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class _RangeCheck:
    """A forward pre-hook: the first input outside [0, 1] (or not finite) warns once, then the hook
    removes itself."""

    def __init__(self, spec: str):
        self.spec = spec
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not torch.is_tensor(x) or not x.is_floating_point() or x.numel() == 0:
            return
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach())
        lo, hi = float(lo), float(hi)
        if lo >= 0 and hi <= 1:
            return
        if self.handle is not None:
            self.handle.remove()
        level, frame = 2, sys._getframe(1)  # point at the caller's line, not at torch's module machinery
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            level, frame = level + 1, frame.f_back
        warnings.warn(f"{self.spec} takes images in [0, 1] (pixels / 255; its normalisation is inside it) "
                      f"but was fed values in [{lo:.3g}, {hi:.3g}]: its outputs are not meaningful. Divide "
                      "0-255 pixels by 255 and do not normalise them (this warning is given once).",
                      InputRangeWarning, stacklevel=level)


def load(spec: str | Path, *, device: str | torch.device = "cpu", model: str = "", classes: int = 0,
         in_shape: str = "", width: int = 0, normalize: str = "", dataset: str = "",
         teacher_dir: str | Path = "") -> nn.Module:
    """A trained classifier in eval mode on `device`, taking (N, C, H, W) float images in [0, 1] and
    returning logits (N, K), with `model.igam_info` (a `ModelInfo`). `spec` is

    - an igam run folder (its model.safetensors; a fine-tuned teacher comes with its adapter);
    - `igam:NAME`, a shipped teacher (`igam models`), checked against its certificate's sha256;
    - `robustbench:DATASET/THREAT/NAME`, RobustBench's network with its weights from `teacher_dir` (default
      DATA_ROOT/robustbench) in RobustBench's layout;
    - a weights file (.safetensors, .pt, .pth, read without unpickling) with its architecture named by
      `model`, `classes`, `in_shape` ('CxHxW'), `width` (a zoo model at a non-default width) and
      `normalize` (the mean/std it was trained with, kept inside it); `dataset` records its task.

    The first input outside [0, 1] raises an `InputRangeWarning` once.

    Raises:
        IgamError: a spec that does not exist or cannot be loaded (the message names the fix).
    """
    text = str(spec)
    p = Path(text)
    info: ModelInfo
    if p.is_dir() and (p / Run.META).exists():
        run = Run.open(p)
        meta = run.meta
        net = run.load_model(device)
        data = meta.get("data") or {}
        shape = data.get("shape")
        info = ModelInfo(text, "run", data.get("dataset"), None, tuple(shape) if shape else None,
                         (meta.get("model") or {}).get("num_classes"), meta)
    elif text.startswith(shipped.PREFIX):
        cert = shipped.certificate(text)
        net = shipped.load_shipped(text)
        args = cert["model"]
        info = ModelInfo(text, "shipped", cert["dataset"], float(cert["eps"]),
                         (args["in_chans"], *args["input_size"]), args["num_classes"], cert)
    elif text.startswith("robustbench:"):
        name = robustbench_zoo.parse_name(text)
        root = Path(teacher_dir) if teacher_dir else default_data_dir() / "robustbench"
        net = load_teacher(text, teacher_dir=root)
        eps = 8 / 255 if name[0] in ("cifar10", "cifar100") and name[1] == "Linf" else (
            4 / 255 if name[1] == "Linf" else None)
        info = ModelInfo(text, "robustbench", name[0] if name[0] in NAMED else None, eps,
                         robustbench_zoo.SHAPES[name[0]], robustbench_zoo.CLASSES[name[0]])
    else:
        if p.is_dir():
            raise IgamError(f"'{text}' is a folder but not an igam run (no meta.json); give a run folder, "
                            "igam:NAME, robustbench:DATASET/THREAT/NAME or a weights file.")
        net = load_teacher(text, model, classes, in_shape, normalize=normalize, width=width)
        args = net.igam_args
        info = ModelInfo(text, "file", dataset or None, None,
                         (args["in_chans"], *args["input_size"]), args["num_classes"])
    net = net.to(device).eval()
    check = _RangeCheck(text)
    check.handle = net.register_forward_pre_hook(check)
    net.igam_info = info
    return net


@dataclass
class BenchmarkResult:
    """What `benchmark` measured: `records` (eval.json's records of this call, keyed by attack; accuracy
    in [0, 1]), `masking_checks`, `eps_sweep` (the curves, with an eps sweep), the nominal `eps`, `n`,
    `dataset`, and `path` (the eval.json written, or None). `clean` and `robust` are the clean accuracy and
    the headline: per image, the worst case over the attacks run at eps. `str()` is `igam evaluate`'s
    table with its headline."""

    name: str
    dataset: str
    eps: float
    n: int
    records: dict[str, dict[str, Any]]
    masking_checks: dict[str, Any]
    eps_sweep: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def clean(self) -> float | None:
        rec = self.records.get("clean")
        return float(rec["accuracy"]) if isinstance(rec, dict) else None

    @property
    def headline(self) -> dict[str, Any] | None:
        """{accuracy, n, eps, attacks}: per image, the worst case over the attacks run at `eps`."""
        at_eps = {k: r for k, r in self.records.items() if isinstance(r.get("eps"), int | float)
                  and abs(float(r["eps"]) - self.eps) < 1e-9}
        ns = {r.get("n") for r in at_eps.values()}
        return worst_case(at_eps) if at_eps and len(ns) == 1 else None

    @property
    def robust(self) -> float | None:
        head = self.headline
        return float(head["accuracy"]) if head else None

    def table(self) -> str:
        if self.eps_sweep is not None:
            return format_sweep_table([(self.name, self.eps_sweep)])
        attacks = list(self.records)
        return format_table([(self.name, self.records)], attacks)

    def __str__(self) -> str:
        lines = [self.table(), f"(accuracy in %, first {self.n} {self.dataset} test images"
                 + (f"; details in {self.path}" if self.path else "") + ")"]
        if self.eps_sweep is None:
            lines += headline_lines(self.name, self.records)
            if any(isinstance(r.get("per_class"), dict) for r in self.records.values()):
                lines.append(f"note: {self.name}: per-class accuracy (mean over classes / worst class): "
                             + "; ".join(per_class_text(a, r) for a, r in self.records.items()))
        lines.append(f"note: {self.name}: masking checks: "
                     f"{check_summary(self.masking_checks.get('checks') or {})}")
        return "\n".join(lines)


def spec_folder(spec: str, out_dir: str | Path = "runs") -> Path:
    """Where `igam evaluate SPEC` keeps the eval.json of a model that is not a run folder:
    OUT_DIR/igam-mnist-linf-0.3 for igam:mnist-linf-0.3."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(spec).replace(":", "-"))
    return Path(out_dir) / name.strip("-.")


def benchmark(model: nn.Module | str | Path, dataset: str | None = None, eps: float | str | None = None,
              attacks: Sequence[str] = ("clean", "autoattack"), n: int = 10000, *,
              batch_size: int | str = 500, seed: int = 0, bn: str = "eval", checks: bool = False,
              check_n: int = 500, check_queries: int = 1000, eps_sweep: str | list[str | float] | None = None,
              data_dir: str | Path | None = None, out: str | Path | None = None, threads: int = 0,
              device: str = "cpu", progress: bool = True,
              log: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Robust accuracy of any classifier on the first n test images of `dataset`, with the attacks, checks
    and records of `igam evaluate` (`igam.evaluate.evaluate_model`).

    Arguments:
        model: an nn.Module taking (N, C, H, W) float images in [0, 1] (on its own device), or what `load`
            takes: a run folder (evaluated as `igam evaluate RUN`: records go to RUN/eval.json),
            igam:NAME, robustbench:DATASET/THREAT/NAME.
        dataset: mnist, cifar10, cifar10:animals, npz:PATH, ... (default: the model's `igam_info`).
        eps: L-inf radius in [0, 1] pixel units, e.g. 0.3 or '8/255' (default: the dataset's: 0.3 on
            1x28x28 images, 8/255 otherwise). attacks: names as `igam evaluate --attacks` takes them
            (default clean and AutoAttack, the field's headline). n: test images (the first n).
        checks, check_n, check_queries, eps_sweep, batch_size, seed, bn: as `igam evaluate`.
        data_dir: data root (default $IGAM_DATA, else ./data). out: a folder for eval.json (merged), the
            AutoAttack resume state and the robustness curve; None keeps the records in memory only.
        threads: torch CPU threads for the evaluation (0: as they are). device: where a model given by name
            is loaded (an nn.Module stays where it is). progress: progress bars on
            stderr. log: receives one line per step (default: stderr while progress is on).
    Returns: a BenchmarkResult (clean, robust = the headline worst case at eps, records, ...).
    Raises:
        IgamError: no dataset (and none recorded on the model), a dataset whose images do not fit the
            model, an unknown attack, a failed attack (naming what was kept), a model with NaN outputs.
    """
    if log is None and progress:
        log = bars.write
    attacks = [str(a).strip().lower() for a in attacks]
    if isinstance(model, str | Path) and Path(model).is_dir() and (Path(model) / Run.META).exists():
        run = Run.open(model)
        if dataset and dataset != run.meta["data"]["dataset"]:
            raise IgamError(f"{model} is a run on {run.meta['data']['dataset']}; a run folder is evaluated "
                            f"on its own dataset, not {dataset}. Load it (igam.load) to benchmark it "
                            "elsewhere.")
        res = evaluate_run(run.dir, attacks, n, batch_size, seed, bn, str(data_dir) if data_dir else None,
                           device, eps=eps, checks=checks, check_n=check_n, check_queries=check_queries,
                           eps_sweep=eps_sweep, log=log, threads=threads, progress=progress)
        return _result(run.dir.name, run.meta["data"]["dataset"], res, run.eval_path)
    if isinstance(model, str | Path):
        model = load(model, device=device, teacher_dir=Path(data_dir) / "robustbench" if data_dir else "")
    if not isinstance(model, nn.Module):
        raise IgamError(f"benchmark takes an nn.Module or what igam.load takes, not {type(model).__name__}.")
    info = getattr(model, "igam_info", None)
    dataset = dataset or (info.dataset if isinstance(info, ModelInfo) else None)
    if not dataset:
        raise IgamError("benchmark needs dataset=... (mnist, cifar10, cifar10:animals, npz:PATH, ...): the "
                        "images it classifies; this model records none.")
    name = Path(info.spec).name if isinstance(info, ModelInfo) and info.kind == "run" else (
        info.spec if isinstance(info, ModelInfo) else type(model).__name__)
    folder = Path(out) if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads), bars.enabled(progress):
        arrays = test_images(dataset, str(data_dir) if data_dir else None, n)
        shape = tuple(arrays.x_test.shape[1:])
        known = info.input_shape if isinstance(info, ModelInfo) else None
        if known and tuple(known) != shape:
            raise IgamError(f"{name} takes {'x'.join(map(str, known))} images; {dataset} has "
                            f"{'x'.join(map(str, shape))}. Benchmark it on its own dataset (or fine-tune it "
                            "on this one: igam finetune).")
        was_training = model.training
        model.eval()
        try:
            res = evaluate_model(
                model, arrays.x_test, arrays.y_test, attacks, out=folder, name=name, what=f"The model {name}",
                dataset=dataset, n=n, batch_size=batch_size, seed=seed, bn=bn, eps=eps, checks=checks,
                check_n=check_n, check_queries=check_queries, eps_sweep=eps_sweep, log=log,
                num_classes=getattr(arrays, "num_classes", None),
                class_names=list(getattr(arrays, "class_names", None) or []) or None)
        finally:
            model.train(was_training)
    return _result(name, dataset, res, folder / Run.EVAL if folder is not None else None)


def _result(name: str, dataset: str, res: dict[str, Any], path: Path | None) -> BenchmarkResult:
    records = {k: v for k, v in res.items() if k not in ("masking_checks", "eps_sweep")}
    mc = res.get("masking_checks") or {}
    n = next((int(r["n"]) for r in records.values() if isinstance(r, dict) and "n" in r), 0)
    eps = mc.get("eps")
    if eps is None:
        eps = next((float(r["eps"]) for r in records.values() if r.get("eps") is not None), 0.0)
    return BenchmarkResult(name, dataset, float(eps), n, records, mc, res.get("eps_sweep"), path)
