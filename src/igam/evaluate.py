"""Evaluation of runs: accuracy under named attacks, with gradient-masking checks, written to RUN/eval.json.

Protocol (docs: evaluation-and-infrastructure.md, sec. 4): the model in eval mode (or train-mode BatchNorm
with bn='train', labelled in every record), deterministic given the seed (each batch's random draws come
from (seed, batch index)), robust accuracy counted per example as "correct on the clean image and on the
attack's output" (the clean image is itself a point of the eps-ball), and every record carrying the attack's
settings, n, seed, time and, for AutoAttack, the library (pyautoattack) and its version, the components
with their settings and AutoAttack's own flags.

Every record carries its per-image results (`correct`) and the per-class accuracy computed from them
(`per_class`: per true class, their mean and the worst class). `evaluate_run(..., eps_sweep=...)` runs each
attack at several radii and writes the robustness curves to RUN/robustness_curve.json (`robustness_curve`).
The masking checks include RobustBench's admission checks (`attacks.admission`).

`evaluate_run` writes each attack's record to RUN/eval.json as soon as it is finished, so an attack that
fails (or an interrupt) never loses the results before it; AutoAttack keeps a resume state in
RUN/autoattack-state-KEY/ until its record is written, so an interrupted evaluation continues.

    from igam.evaluate import run_attack
    rec = run_attack(model, x_uint8, y, "pgd20")          # {"accuracy": ..., "attack": {...}, ...}
"""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import igam.progress as bars
from igam.attacks import (
    FGSM,
    PGD,
    Attack,
    AutoAttack,
    Square,
    column_name,
    make_attack,
    parse_preset,
    pgd_step,
)
from igam.attacks.admission import ADMISSION_N, admission_checks
from igam.attacks.autoattack import FLAGS_DOC, INSTALL_HINT, pyautoattack_version
from igam.attacks.base import check_inputs
from igam.attacks.checks import Observation, gradient_stats, run_checks, warning_block
from igam.attacks.presets import default_eps, is_mnist_like
from igam.data import NAMED, load_data
from igam.data.sources import PREFIXED
from igam.data.subsets import select_classes, split_subset
from igam.errors import IgamError, NonFiniteOutputs, WriteError, suggest
from igam.files import check_writable, read_json_object, waiting_lock, write_json
from igam.models import shipped
from igam.runs import Run, refuse_symlinks
from igam.teachers import NAMED_NORMALIZATION, once
from igam.units import check_eps
from igam.utils import bn_mode, mix_seed, to_unit, torch_threads

__all__ = ["CHECK_STEPS", "EPS_SWEEP", "check_attacks", "check_foreign_teacher", "check_shipped_teacher",
           "check_teacher_robustness", "eps_text", "evaluate_attack", "evaluate_model", "evaluate_run",
           "large_eps", "masking_report", "parse_eps_sweep", "per_class_accuracy", "predict", "record_notes",
           "result_key", "reusable_record", "robustness_curve", "run_attack", "stale_weights_note",
           "state_name", "warning_block"]

CHECK_STEPS = (10, 20, 50)  # PGD step counts of the --checks step sweep
EPS_SWEEP = (0.25, 0.5, 1.0, 1.5)  # multiples of eps of the --checks eps sweep (PGD-20)
MAX_SWEEP = 64  # radii of one --eps-sweep


def _batch_seed(seed: int, index: int) -> int:
    return mix_seed(seed, index, stride=7919, offset=1)


def _as_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return to_unit(x.to(device))


def predict(model: nn.Module, x: torch.Tensor, what: str = "The model",
            y: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted classes (N,) of float images x (N, C, H, W) under no_grad.

    Raises:
        NonFiniteOutputs: when any logit is NaN or Inf (a diverged model is never scored: argmax of NaN
            logits would count as class 0).
        IgamError: when labels y (N,) do not index the model's outputs.
    """
    with torch.no_grad():
        logits = model(x)
    if y is not None:
        check_logits(logits, y)
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise NonFiniteOutputs(f"{what} gives non-finite (NaN/Inf) outputs on {bad} of {len(x)} images: it "
                               "diverged, so it has no accuracy to report. Retrain it (e.g. lower lr or set "
                               "grad_clip) or evaluate an earlier run.")
    return logits.argmax(1)


def validate_attacks(names: list[str]) -> None:
    """Fail before any work on a bad name, or on AutoAttack without pyautoattack."""
    if not names:
        raise IgamError("No attacks given; write e.g. --attacks clean,fgsm,pgd20.")
    for name in names:
        if name != "clean" and parse_preset(name).kind == "autoattack" and pyautoattack_version() is None:
            raise IgamError(INSTALL_HINT)


def per_class_accuracy(correct: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
                       class_names: list[str] | None = None) -> dict[str, Any]:
    """Accuracy per true class of per-image results `correct` (N,) bool with labels y (N,) int in
    [0, num_classes) (default: max(y) + 1 classes).

    Returns {"accuracy": [acc_c in [0, 1], or None for a class without images], "count": [images of class
    c], "mean": the mean over the classes that have images, "worst": the lowest of them, "worst_class": its
    index, and "classes": class_names when given}. The overall accuracy is sum(accuracy_c * count_c) / N.

    Raises:
        IgamError: when correct and y differ in length, or a label is outside [0, num_classes).
    """
    correct, y = correct.reshape(-1).bool().cpu(), y.reshape(-1).long().cpu()
    if len(correct) != len(y):
        raise IgamError(f"per_class_accuracy: {len(correct)} results but {len(y)} labels; give one per "
                        "image.")
    k = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        raise IgamError(f"per_class_accuracy: labels span {int(y.min())}..{int(y.max())}, outside the "
                        f"{k} classes 0..{k - 1}; is this the model's dataset?")
    count = torch.bincount(y, minlength=k)[:k]
    right = torch.bincount(y[correct], minlength=k)[:k]
    acc = [float(r) / int(c) if int(c) else None for r, c in zip(right.tolist(), count.tolist())]
    present = [(a, c) for c, a in enumerate(acc) if a is not None]
    worst = min(present) if present else (None, None)
    out = {"accuracy": acc, "count": count.tolist(),
           "mean": sum(a for a, _ in present) / len(present) if present else None,
           "worst": worst[0], "worst_class": worst[1]}
    if class_names is not None and len(class_names) == k:
        out["classes"] = [str(c) for c in class_names]
    return out


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str | Attack, *,
               eps: float | str | None = None, step_size: float | str | None = None, batch_size: int = 500,
               seed: int = 0, bn: str = "eval", what: str = "The model", num_classes: int | None = None,
               class_names: list[str] | None = None, label: str = "") -> dict[str, Any]:
    """Accuracy of `model` on images x (uint8 0..255 or float [0,1], NCHW) under an attack preset name
    ('clean', 'fgsm', 'pgd20x5', ...) or an Attack object; returns the record saved in eval.json, with the
    per-image results (`correct`, packed bits) and their `per_class_accuracy` (num_classes: the model's
    outputs, default max label + 1). A progress bar on stderr (igam.progress, titled `label`) counts the
    model's forward passes against the attack's bound (`Attack.passes`), batch by batch.

    Raises:
        IgamError: for a bad batch size or attack; NonFiniteOutputs (an IgamError naming `what`) when the
            model's logits on the clean or attacked images are NaN/Inf.
    """
    if batch_size < 1:
        raise IgamError(f"batch_size={batch_size} must be at least 1.")
    x, y = check_inputs(x, y, allow_uint8=True)  # the same check for clean and for every attack
    device = next(model.parameters()).device
    shape = tuple(x.shape[1:])
    if isinstance(attack, str):
        atk = None if attack == "clean" else make_attack(attack, model, shape, eps=eps, step_size=step_size,
                                                         bn=bn, seed=seed)
    else:
        atk = attack
    t0 = time.time()
    correct = torch.zeros(len(x), dtype=torch.bool)
    starts = range(0, len(x), batch_size)
    share = [1 if atk is None else 2 + atk.passes(min(batch_size, len(x) - i)) for i in starts]
    title = label or (attack if isinstance(attack, str) else getattr(atk, "name", "attack"))
    with bars.bar(sum(share), title) as prog, bars.counting(model, prog):
        for b, i in enumerate(starts):
            if len(share) > 1:
                prog.status("batch", f"batch {b + 1}/{len(share)}")
            with prog.span(share[b]):
                xb, yb = _as_float(x[i:i + batch_size], device), y[i:i + batch_size].to(device)
                with bn_mode(model, bn):
                    ok = predict(model, xb, what, yb) == yb
                if atk is not None:
                    x_adv = atk(xb, yb, seed=_batch_seed(seed, b))
                    with bn_mode(model, bn):
                        ok &= predict(model, x_adv,
                                      f"{what} (under {atk.settings().get('attack', 'attack')})") == yb
                correct[i:i + batch_size] = ok.cpu()
    settings = {"attack": "clean", "bn": bn} if atk is None else atk.settings()
    return {"accuracy": float(correct.float().mean()) if len(x) else 0.0, "n": len(x), "seed": seed, "bn": bn,
            "eps": None if atk is None else atk.eps, "batch_size": batch_size, "attack": settings,
            "time_s": round(time.time() - t0, 2), "correct": pack_correct(correct),
            "per_class": per_class_accuracy(correct, y, num_classes, class_names)}


def pack_correct(correct: torch.Tensor) -> str:
    """Per-image correctness (N,) bool as base64 of its packed bits (N/8 bytes): kept in each eval.json
    record so that the worst case over attacks can be taken per image."""
    return base64.b64encode(np.packbits(correct.numpy().astype(np.uint8)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> torch.Tensor:
    """The (n,) bool tensor `pack_correct` wrote."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


def worst_case(records: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The headline robust accuracy: per image, correct under every attack of `records` (eval.json
    records at one eps, on the same n images and seed), i.e. the worst case over the attacks run, as
    RobustBench reports AutoAttack's. None when fewer than one record carries per-image results.
    Returns {accuracy, n, eps, attacks}."""
    usable = {k: r for k, r in records.items() if isinstance(r, dict) and isinstance(r.get("correct"), str)
              and r.get("eps") is not None}
    if not usable:
        return None
    ns, epss = {r["n"] for r in usable.values()}, {round(float(r["eps"]), 12) for r in usable.values()}
    if len(ns) != 1 or len(epss) != 1:
        raise IgamError("worst_case: the records must share n and eps; group them first.")
    n = ns.pop()
    both = torch.ones(n, dtype=torch.bool)
    for r in usable.values():
        both &= unpack_correct(r["correct"], n)
    return {"accuracy": float(both.float().mean()) if n else 0.0, "n": n, "eps": epss.pop(),
            "attacks": sorted(usable)}


def check_logits(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Labels must index the model's outputs."""
    if logits.ndim == 2 and len(y) and int(y.max()) >= logits.shape[1]:
        raise IgamError(f"Label {int(y.max())} is out of range for a model with {logits.shape[1]} outputs "
                        f"(labels must be 0 .. {logits.shape[1] - 1}); is this the model's dataset?")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             bn: str = "eval", what: str = "The model") -> float:
    """Clean accuracy in [0, 1] with eval-mode BatchNorm (or train-mode, labelled, for the official
    protocol).

    Raises:
        NonFiniteOutputs: when the logits are NaN/Inf (never scored as predictions).
        IgamError: for images or labels the input check refuses.
    """
    x, y = check_inputs(x, y, allow_uint8=True)
    correct = 0
    device = next(model.parameters()).device
    with bn_mode(model, bn):
        for i in range(0, len(x), batch_size):
            xb = to_unit(x[i:i + batch_size].to(device))
            correct += int((predict(model, xb, what) == y[i:i + batch_size].to(device)).sum())
    return correct / max(1, len(x))


def evaluate_attack(model: nn.Module, x, y, attack: str, spec=None, batch_size: int = 500, seed: int = 0,
                    bn: str = "eval") -> float:
    """Accuracy in [0, 1] of `model` on uint8 images x under a named attack (used during training)."""
    return run_attack(model, x, y, attack, batch_size=batch_size, seed=seed, bn=bn)["accuracy"]


def result_key(name: str, eps: float | str | None = None, bn: str = "eval") -> str:
    """Key of a result in eval.json: the attack name, plus @eps=... when eps is overridden and @bn=train."""
    key = name
    if eps is not None and name != "clean":
        key += f"@eps={str(eps).replace(' ', '')}"
    return key + ("@bn=train" if bn == "train" else "")


def large_eps(shape: tuple[int, ...], eps: float = 0.0) -> float:
    """The radius at which PGD must reach about 0%: 0.5 for MNIST-like inputs, 64/255 for colour, and at
    least 1.5 eps."""
    return max(0.5 if is_mnist_like(shape) else 64 / 255, min(1.0, 1.5 * eps))


def eps_text(eps: float) -> str:
    """How a radius is written in keys and tables: its short decimal when that is exact (0.5, 0.2), else
    k/255 when it is one (64/255), else 4 significant digits."""
    short, k = f"{eps:.4g}", eps * 255
    if float(short) == eps:
        return short
    return f"{round(k)}/255" if 0 < eps < 1 and abs(k - round(k)) < 1e-6 else short


def parse_eps_sweep(sweep: str | list[str | float] | tuple[str | float, ...], shape: tuple[int, ...],
                    nominal: float | None = None) -> list[tuple[str, float]]:
    """The radii of `--eps-sweep`: '1/255,2/255,8/255,large' -> [('1/255', 0.0039), ('2/255', ...), ...,
    ('64/255', 0.251)], sorted by radius (L-inf, pixel units in (0, 1]), duplicates dropped. `large` stands
    for `large_eps(shape, nominal)` (0.5 on MNIST-like inputs, 64/255 otherwise: where accuracy must reach
    about 0), written as the number it is. Texts are kept as typed: they name the eval.json keys.

    Raises:
        IgamError: for an empty sweep or an empty entry ('1/255,,2/255'), a value that is not a radius in
            (0, 1] (0 is the clean point, which every curve has), or a text that is not a number.
    """
    parts = sweep.split(",") if isinstance(sweep, str) else list(sweep)
    items = [str(t).strip() for t in parts]
    if not any(items):
        raise IgamError("--eps-sweep is empty; give radii, e.g. --eps-sweep 1/255,2/255,4/255,8/255,16/255 "
                        "(add `large` to check that accuracy reaches about 0).")
    if not all(items):
        raise IgamError(f"--eps-sweep {','.join(items)!r} has an empty entry (two commas in a row, or one at "
                        "an end); give one radius between each pair of commas, e.g. 1/255,2/255,4/255.")
    if len(items) > MAX_SWEEP:
        raise IgamError(f"--eps-sweep has {len(items)} radii; a curve takes up to {MAX_SWEEP} (each radius "
                        f"runs every attack again): give {MAX_SWEEP} or fewer, e.g. 1/255,2/255,4/255,8/255.")
    nominal = default_eps(shape)[0] if nominal is None else nominal
    out: dict[float, tuple[str, float]] = {}
    for t in items:
        if t.lower() == "large":
            v = large_eps(shape, nominal)
            t = eps_text(v)
        else:
            v = check_eps(t, "--eps-sweep")
        if v <= 0:
            raise IgamError(f"--eps-sweep value {t!r} is 0: the clean accuracy is the curve's first point "
                            "anyway; give radii above 0.")
        out.setdefault(round(v, 12), (t.replace(" ", ""), v))
    return [out[k] for k in sorted(out)]


def check_attacks(model: nn.Module, shape: tuple[int, ...], eps: float, *, queries: int = 1000,
                  bn: str = "eval", seed: int = 0) -> list[tuple[str, Attack]]:
    """The extra attacks of --checks: FGSM, a PGD step sweep, a PGD-20 eps sweep, PGD-50 at a large eps
    (step 2.5 eps / 50, Madry et al.) and Square, as (label, attack) pairs. PGD steps follow the default
    step rule (`pgd_step`, 'reach')."""

    def pgd(e: float, k: int) -> PGD:
        return PGD(model, e, pgd_step(e, k, shape), k, bn=bn, seed=seed, step_rule="reach")

    out: list[tuple[str, Attack]] = [("fgsm", FGSM(model, eps, bn=bn, seed=seed))]
    out += [(f"pgd{k}", pgd(eps, k)) for k in CHECK_STEPS]
    out += [(f"pgd20@eps={eps_text(min(1.0, f * eps))}", pgd(min(1.0, f * eps), 20)) for f in EPS_SWEEP
            if f != 1.0]
    big = large_eps(shape, eps)
    out.append((f"pgd50@eps={eps_text(big)}", pgd(big, 50)))
    out.append((f"square{queries}", Square(model, eps, queries, bn=bn, seed=seed)))
    return out


def observation(key: str, rec: dict[str, Any]) -> Observation | None:
    """An eval.json record as an input of the masking checks (None for clean records and records without
    attack settings).

    Raises:
        KeyError, TypeError, ValueError, OverflowError: for a damaged record (`record_observations` skips
            those with a warning)."""
    s = rec.get("attack")
    if not isinstance(s, dict) or s.get("attack") in (None, "clean") or rec.get("eps") is None:
        return None
    kind = str(s["attack"])
    if kind == "autoattack" and s.get("components") == ["square"]:
        kind = "square"  # AutoAttack's Square alone is a black-box attack
    out = Observation(key, kind, float(rec["eps"]), float(rec["accuracy"]), int(rec["n"]),
                      str(rec.get("bn", "eval")), int(s.get("steps", 0)), int(s.get("restarts", 1)),
                      str(s.get("loss", "ce")), float(s.get("step_size", 0.0) or 0.0),
                      str(s.get("schedule", "constant")))
    if not all(math.isfinite(v) for v in (out.eps, out.accuracy, out.step_size)):
        raise ValueError(f"record {key!r} holds a non-finite number")
    return out


def sweep_observations(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                       eps: float | str | None = None, queries: int = 1000, batch_size: int = 500,
                       seed: int = 0, bn: str = "eval", log: Callable[[str], None] | None = None,
                       what: str = "The model", records: dict[str, Any] | None = None,
                       name: str = "") -> list[Observation]:
    """The --checks sweeps (`check_attacks`) run on images x, as masking-check observations named
    'check:LABEL'. A sweep attack whose result is already among `records` (eval.json's, made on the same
    first images: `reusable_record`) is taken from there, and `log` says so."""
    say = log or (lambda s: None)
    shape = tuple(x.shape[1:])
    nominal = check_eps(eps) if eps is not None else default_eps(shape)[0]
    out = []
    planned = check_attacks(model, shape, nominal, queries=queries, bn=bn, seed=seed)
    for i, (label, atk) in enumerate(planned):
        found = reusable_record(records or {}, atk, len(x), batch_size, seed, bn)
        if found is not None:
            say(f"check {label}: reused eval.json's {found[0]} (the same first {len(x)} images, eps and "
                "settings)")
            rec = found[1]
        else:
            say(f"check {label} on {len(x)} images ...")
            rec = run_attack(model, x, y, atk, batch_size=batch_size, seed=seed, bn=bn, what=what,
                             label=f"{name + ': ' if name else ''}check {label} [{i + 1}/{len(planned)}]")
        out.append(observation(f"check:{label}", rec))
    return [o for o in out if o is not None]


def _num(v: Any, lo: float = -1e300, hi: float = 1e300) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi
            and (not isinstance(v, float) or math.isfinite(v)))


def record_problem(rec: Any) -> str:
    """'' for an eval.json attack record whose fields have the types igam writes (accuracy in [0, 1], n,
    seed, eps, bn, attack, per_class, correct, time_s); else what is wrong with it."""
    if not isinstance(rec, dict):
        return f"it is a {type(rec).__name__}, not an object"
    if not _num(rec.get("accuracy"), 0, 1):
        return "its accuracy is missing or not a number in [0, 1]"
    if not isinstance(rec.get("n"), int) or isinstance(rec.get("n"), bool) or not 0 <= rec["n"] <= 10**9:
        return "its n (number of images) is missing or not a whole number"
    for key, ok in (("seed", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                    ("eps", lambda v: _num(v, 0, 1)), ("bn", lambda v: isinstance(v, str)),
                    ("attack", lambda v: isinstance(v, dict)), ("correct", lambda v: _bits_ok(v, rec["n"])),
                    ("time_s", _num), ("batch_size", lambda v: isinstance(v, int)),
                    ("run_status", lambda v: isinstance(v, str)),
                    ("stale_weights", lambda v: isinstance(v, str)), ("per_class", _per_class_ok)):
        if rec.get(key) is not None and not ok(rec[key]):
            return f"its {key} is {str(rec[key])[:40]!r}"
    return ""


def _bits_ok(text: Any, n: int) -> bool:
    """Whether `text` is the packed per-image results of n images (`pack_correct`)."""
    if not isinstance(text, str) or len(text) > 4 * ((n + 7) // 8 + 3):
        return False
    try:
        return len(base64.b64decode(text, validate=True)) == (n + 7) // 8
    except ValueError:  # binascii.Error
        return False


def _per_class_ok(pc: Any) -> bool:
    if not isinstance(pc, dict):
        return False
    acc, classes, worst = pc.get("accuracy"), pc.get("classes"), pc.get("worst_class")
    return (all(pc.get(k) is None or _num(pc.get(k), 0, 1) for k in ("mean", "worst"))
            and (acc is None or isinstance(acc, list) and all(a is None or _num(a, 0, 1) for a in acc))
            and (pc.get("count") is None or isinstance(pc["count"], list))
            and (classes is None or isinstance(classes, list) and all(isinstance(c, str) for c in classes))
            and (worst is None or isinstance(worst, int) and not isinstance(worst, bool) and worst >= 0))


def _masking_ok(mc: Any) -> bool:
    if not isinstance(mc, dict):
        return False
    checks, failed = mc.get("checks"), mc.get("failed")
    return (isinstance(checks, dict)
            and all(isinstance(v, dict) and v.get("passed") in (True, False, None)
                    and isinstance(v.get("detail", ""), str) for v in checks.values())
            and (failed is None or isinstance(failed, list) and all(isinstance(f, str) for f in failed))
            and mc.get("passed") in (True, False, None)
            and (mc.get("eps") is None or _num(mc["eps"], 0, 1)))


def read_eval(run: Run | Path | str, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """RUN/eval.json for the readers that show or summarise it (reports, experiment results, model info):
    {} when absent; records and a masking_checks section that igam did not write as they are (a wrong
    type, a missing accuracy, NaN, ...) are left out with one warning through `log` naming the file and
    the keys. eval.json itself is left as it is.

    Raises:
        IgamError: when the file is not JSON or not an object (`read_json_object`).
    """
    path = (run if isinstance(run, Run) else Run(run)).eval_path
    if not path.exists():
        return {}
    data = read_json_object(path)
    out, bad = {}, []
    for k, v in data.items():
        if k == "masking_checks":
            problem = "" if _masking_ok(v) else "it is not the section igam writes"
        else:
            problem = record_problem(v)
        if problem:
            bad.append(f"{k!r} ({problem})")
        else:
            out[k] = v
    if bad and log is not None:
        log(f"igam: WARNING: '{path}' holds damaged entries, left out: {'; '.join(bad)[:400]}. Delete them "
            "and evaluate those attacks again.")
    return out


def update_eval_json(run: Run, update: Callable[[dict[str, Any]], dict[str, Any]],
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Read RUN/eval.json, apply `update` to its contents and write the result, all under the run's eval
    lock (RUN/.eval.lock; another `igam evaluate` of the run waits for it), so that concurrent evaluations
    never drop each other's records. A damaged eval.json is an IgamError naming it (restore or delete it)
    rather than overwritten. Returns what was written.

    Raises:
        IgamError: a damaged eval.json, or the lock held too long; WriteError when the write fails.
    """
    path = run.eval_path
    with waiting_lock(run / Run.EVAL_LOCK, f"'{path}'", log=log):
        merged = read_json_object(path) if path.exists() else {}
        out = update(merged)
        write_json(path, out)
    return out


def record_observations(merged: dict[str, Any], path: Path | str = "eval.json",
                        log: Callable[[str], None] | None = None) -> list[Observation]:
    """The masking-check inputs of eval.json's attack records; a damaged record is skipped with a warning
    through `log` (named, with its key)."""
    out = []
    for k, r in merged.items():
        if k == "masking_checks" or not isinstance(r, dict):
            continue
        try:
            o = observation(k, r)
        except (KeyError, TypeError, ValueError, OverflowError):
            if log is not None:
                log(f"igam: WARNING: '{path}': the record {k!r} is damaged (a missing or wrong-typed field); "
                    "it is left out of the masking checks. Delete it and evaluate that attack again.")
            continue
        if o is not None:
            out.append(o)
    return out


def stored_check_observations(merged: dict[str, Any], path: Path | str = "eval.json",
                              log: Callable[[str], None] | None = None) -> list[Observation]:
    """The sweeps of an earlier --checks call ('check:...' observations in eval.json's masking_checks);
    damaged entries (unknown or missing fields, wrong types) are skipped with one warning through `log`."""
    section = merged.get("masking_checks")
    stored = section.get("observations") if isinstance(section, dict) else None
    out, bad = [], 0
    for o in stored if isinstance(stored, list) else []:
        if not (isinstance(o, dict) and str(o.get("name", "")).startswith("check:")):
            continue
        try:
            ob = Observation(**o)
            ob = Observation(str(ob.name), str(ob.kind), float(ob.eps), float(ob.accuracy), int(ob.n),
                             str(ob.bn), int(ob.steps), int(ob.restarts), str(ob.loss), float(ob.step_size),
                             str(ob.schedule))
            if not all(math.isfinite(v) for v in (ob.eps, ob.accuracy, ob.step_size)):
                raise ValueError("non-finite")
            out.append(ob)
        except (TypeError, ValueError, OverflowError):
            bad += 1
    if bad and log is not None:
        log(f"igam: WARNING: '{path}': {bad} stored masking-check observation(s) are damaged (unknown or "
            "missing fields, wrong types); they are left out. Run --checks again to measure them anew.")
    if not isinstance(section, dict | None) and log is not None:
        log(f"igam: WARNING: '{path}': its masking_checks section is not an object; it is replaced.")
    return out


def same_settings(a: Any, b: Any) -> bool:
    """Whether two attack settings (eval.json's `attack` dicts, one possibly read back from JSON) are the
    same: equal keys and values, numbers within 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_settings(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_settings(u, v) for u, v in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def reusable_record(records: dict[str, Any], atk: Attack, n: int, batch_size: int, seed: int,
                    bn: str) -> tuple[str, dict[str, Any]] | None:
    """(key, record) of an eval.json record that already holds what `run_attack(model, x[:n], ..., atk,
    batch_size=batch_size, seed=seed, bn=bn)` would compute: the same attack settings, seed, BatchNorm
    mode and batch size, on at least n images whose first n fill whole batches (so that the first n
    images met the same batches and random draws). The record is cut to its first n images. None when
    there is none."""
    want = atk.settings()
    for key, rec in records.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("correct"), str):
            continue
        m = rec.get("n")
        if (not isinstance(m, int) or m < n or (m != n and n % batch_size) or rec.get("seed") != seed
                or rec.get("bn", "eval") != bn or rec.get("batch_size") != batch_size
                or not same_settings(rec.get("attack"), want)):
            continue
        correct = unpack_correct(rec["correct"], m)[:n]
        return key, {**rec, "n": n, "accuracy": float(correct.float().mean()) if n else 0.0,
                     "correct": pack_correct(correct)}
    return None


def masking_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | str | None = None,
                   observations: list[Observation] = (), sweeps: bool = True, queries: int = 1000,  # type: ignore[assignment]
                   batch_size: int = 500, seed: int = 0, bn: str = "eval",
                   log: Callable[[str], None] | None = None, what: str = "The model",
                   records: dict[str, Any] | None = None, name: str = "",
                   current: set[str] | None = None) -> dict[str, Any]:
    """Gradient-masking checks of `model` on images x (uint8 or float [0,1]): input-gradient statistics and
    RobustBench's admission checks (`attacks.admission`: deterministic forward, no optimisation at
    inference; on the first ADMISSION_N images), plus the sweeps of `check_attacks` (sweeps=True), judged
    together with earlier `observations`. A sweep attack whose result is already among `records`
    (eval.json's, made on the same first images: `reusable_record`) is taken from there, and `log` says so.
    `current`: the names of the observations the calling command made (None: all); failures among the
    others only are listed as older (`checks.run_checks`), and the sweeps run here are current.

    Raises:
        NonFiniteOutputs: when the model's logits are NaN/Inf (a diverged model is not judged for masking).
    """
    say = log or (lambda s: None)
    shape = tuple(x.shape[1:])
    nominal = check_eps(eps) if eps is not None else default_eps(shape)[0]
    device = next(model.parameters()).device
    with bn_mode(model, bn):  # a diverged model is an error, not "gradient masking"
        predict(model, _as_float(x[:batch_size], device), what)
    obs = list(observations)
    grads = gradient_stats(model, _as_float(x, device), y, batch_size, bn)
    say(f"admission checks (determinism, no optimisation at inference) on {min(len(x), ADMISSION_N)} images")
    admission = admission_checks(model, _as_float(x[:ADMISSION_N], device), bn)
    if sweeps:
        swept = sweep_observations(model, x, y, eps=nominal, queries=queries, batch_size=batch_size,
                                   seed=seed, bn=bn, log=say, what=what, records=records, name=name)
        obs += swept
        if current is not None:
            current = current | {o.name for o in swept}
    verdicts = run_checks(obs, nominal, large_eps(shape, nominal), grads, admission, current)
    failed = [k for k, v in verdicts.items() if v["passed"] is False]
    return {"passed": not failed, "failed": failed, "eps": nominal, "check_n": len(x), "checks": verdicts,
            "observations": [o.to_dict() for o in obs]}


def state_name(key: str) -> str:
    """File-name form of an eval.json key: 'autoattack@eps=8/255' -> 'autoattack@eps=8_255'."""
    return re.sub(r"[^A-Za-z0-9._=@+-]", "_", key)


def record_notes(key: str, rec: dict[str, Any]) -> list[str]:
    """Lines worth printing under a results table for one eval.json record: AutoAttack's flags, a reduced
    number of target classes, settings other than the published ones ([] for everything else)."""
    s = rec.get("attack") if isinstance(rec, dict) else None
    if not isinstance(s, dict) or s.get("library") != "pyautoattack":
        return []
    out = []
    for c, r in (s.get("reduced") or {}).items():
        out.append(f"{key}: {c.upper()} used {r['n_target_classes']} target classes instead of "
                   f"{r['published']} (the model has {s.get('num_classes')} classes)")
    if s.get("as_published") is False and not s.get("reduced"):
        cs = s.get("component_settings", {})
        out.append(f"{key}: not AutoAttack as published: "
                   + "; ".join(f"{c} {v}" for c, v in cs.items()))
    out += [f"{key}: AutoAttack flag: {f}" for f in s.get("flags", [])]
    if s.get("flags"):
        out.append(f"{key}: what the flags mean: {FLAGS_DOC}")
    return out


def stale_weights_note(run: Run) -> str:
    """'' for a finished run; else why its model.safetensors is not the result of its latest training (a
    resume killed, stopped or still running leaves the weights of an earlier finish in place)."""
    status = run.status
    if status == "finished":
        return ""
    holder = run.holder()
    now = f"; {holder} is training it now" if holder else ""
    why = run.meta.get("stopped")
    return (f"run '{run.dir}' has status '{status}'{now}{f' ({why})' if why else ''}: its model.safetensors "
            "is from an earlier finish of this run, not from its latest training. Evaluating those weights; "
            "the status is recorded in eval.json. Finish the run (resume=true) to evaluate its latest state.")


_TEST_SETS: dict[tuple[str, str, int], Any] = {}  # (dataset, data root, n) -> Arrays, shared by one process


def test_images(dataset: str, data_dir: str | Path | None, n: int) -> Any:
    """The first n test images of a dataset (data.Arrays), loaded once per process: evaluating several
    runs of one dataset (`igam evaluate RUN1 RUN2 ...`, an experiment's rows) reads the files once. Four
    sets are kept at most."""
    key = (dataset, str(data_dir or ""), int(n))
    if key not in _TEST_SETS:
        while len(_TEST_SETS) >= 4:
            _TEST_SETS.pop(next(iter(_TEST_SETS)))
        _TEST_SETS[key] = load_data(dataset, data_dir, False, 0, n)
    return _TEST_SETS[key]


AUTO_BATCH_CPU = 500  # --batch-size auto on a CPU: memory is not what limits a batch there
AUTO_BATCH_MAX = 8192


def auto_batch_size(model: nn.Module, shape: tuple[int, ...], n: int, device: str | torch.device) -> int:
    """--batch-size auto: on CUDA the largest power of two (up to AUTO_BATCH_MAX and n) whose input-gradient
    pass (what every attack step does) fits in memory with 2x headroom, found by halving from the top on
    out-of-memory errors; AUTO_BATCH_CPU (or n) elsewhere. Eval mode, buffers and .grad left as they were."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(AUTO_BATCH_CPU, n))
    b = 1 << (max(1, min(AUTO_BATCH_MAX, n)) - 1).bit_length()
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        with bn_mode(model, "eval"):
            while b > 1:
                try:
                    x = torch.zeros(2 * b, *shape, device=device, requires_grad=True)  # 2x: headroom
                    out = model(x)
                    torch.autograd.grad(out.float().sum(), x)
                    break
                except torch.cuda.OutOfMemoryError:
                    b //= 2
                finally:
                    torch.cuda.empty_cache()
    finally:
        for p, grad in saved:
            p.grad = grad
    return max(1, min(b, n))


def robustness_curve(records: dict[str, dict[str, Any]], attacks: list[str], sweep: list[tuple[str, float]],
                     y: torch.Tensor, *, bn: str = "eval", num_classes: int | None = None,
                     class_names: list[str] | None = None) -> dict[str, Any]:
    """The robustness curves of an eps sweep from its eval.json `records` (keyed by `result_key`): one
    curve per attack of `attacks` ('clean' skipped), each with one point per radius, the clean accuracy
    as its point at eps 0, and, with two or more attacks, the per-image worst case over them ('worst case',
    from the records' `correct` bits and labels y (n,)). Accuracies in [0, 1]; eps in pixel units.

    Returns {"eps": [0, eps_1, ...], "eps_text": ["0", "1/255", ...], "n", "seed", "bn", "curves": [{"attack",
    "label", "points": [{"eps", "eps_text", "key", "accuracy", "mean_class", "worst_class",
    "worst_class_index"}, ...]}, ...]}.

    Raises:
        IgamError: when a record of the sweep is missing from `records`.
    """
    keys = {("clean", 0.0): result_key("clean", None, bn)}
    names = [a for a in attacks if a != "clean"]
    for a in names:
        for t, v in sweep:
            keys[(a, v)] = result_key(a, t, bn)
    missing = [k for k in keys.values() if k not in records]
    if missing:
        raise IgamError(f"robustness_curve: no record for {', '.join(missing)}; evaluate them first.")
    clean = records[keys[("clean", 0.0)]]

    def point(e: float, text: str, key: str, rec: dict[str, Any]) -> dict[str, Any]:
        pc = rec.get("per_class") or {}
        return {"eps": e, "eps_text": text, "key": key, "accuracy": rec["accuracy"],
                "mean_class": pc.get("mean"), "worst_class": pc.get("worst"),
                "worst_class_index": pc.get("worst_class")}

    curves = []
    for a in names:
        points = [point(0.0, "0", keys[("clean", 0.0)], clean)]
        points += [point(v, t, keys[(a, v)], records[keys[(a, v)]]) for t, v in sweep]
        curves.append({"attack": a, "label": column_name(a), "points": points})
    n = int(clean["n"])
    if len(names) > 1 and all(isinstance(records[k].get("correct"), str) for k in keys.values()):
        points = [point(0.0, "0", keys[("clean", 0.0)], clean)]
        for t, v in sweep:
            both = torch.ones(n, dtype=torch.bool)
            for a in names:
                both &= unpack_correct(records[keys[(a, v)]]["correct"], n)
            rec = {"accuracy": float(both.float().mean()) if n else 0.0,
                   "per_class": per_class_accuracy(both, y[:n], num_classes, class_names)}
            points.append(point(v, t, "+".join(keys[(a, v)] for a in names), rec))
        curves.append({"attack": "worst case", "label": f"worst case ({', '.join(map(column_name, names))})",
                       "points": points})
    return {"eps": [0.0, *[v for _, v in sweep]], "eps_text": ["0", *[t for t, _ in sweep]], "n": n,
            "seed": clean.get("seed"), "bn": bn, "curves": curves}


def check_evaluation_arguments(attacks: list[str], eps: float | str | None,
                               eps_sweep: str | list[str | float] | None, seed: int = 0) -> None:
    """The checks every evaluation makes before loading anything.

    Raises:
        IgamError: no or unknown attacks, AutoAttack without pyautoattack, a bad eps, a seed that is not a
            whole number in 0 .. 2**63-1, eps together with an eps sweep, or a sweep without an attack to
            sweep."""
    validate_attacks(attacks)
    if eps is not None and check_eps(eps, "--eps") == 0:
        raise IgamError(f"--eps {eps}: a radius of 0 is no attack (every attack would report the clean "
                        "accuracy under its own name). Give a radius above 0, e.g. --eps 8/255, or use "
                        "--attacks clean.")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise IgamError(f"--seed {seed}: the seed of the attacks' random starts must be a whole number in "
                        "0 .. 2**63-1.")
    if eps_sweep is not None and eps is not None:
        raise IgamError("Give --eps (one radius) or --eps-sweep (several), not both.")
    if eps_sweep is not None and all(a == "clean" for a in attacks):
        raise IgamError("--eps-sweep needs an attack to sweep: e.g. --attacks pgd20 (clean is added anyway).")


def evaluate_run(run: str | Path, attacks: list[str], n: int = 10000, batch_size: int | str = 500,
                 seed: int = 0, bn: str = "eval", data_dir: str | None = None, device: str = "cpu", *,
                 eps: float | str | None = None, checks: bool = False, check_n: int = 500,
                 check_queries: int = 1000, eps_sweep: str | list[str | float] | None = None,
                 log: Callable[[str], None] | None = None, threads: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate a run on the first n test images of its dataset with `evaluate_model`, writing into the
    run folder: records merge into RUN/eval.json, the curves of an eps sweep go to RUN/robustness_curve.json,
    AutoAttack's resume state to RUN/autoattack-state-KEY/ and its log to RUN/autoattack-KEY.log.

    A run that is not `finished` (a resume killed, stopped or still running) but has an older
    model.safetensors is evaluated with a loud warning, and each record carries `run_status` and
    `stale_weights`. `threads` (0: torch's default) sets torch's CPU threads for the evaluation;
    progress=False hides the progress bars (igam.progress).

    Raises: as `evaluate_model`; IgamError for a path that is not a finished-enough run."""
    check_evaluation_arguments(attacks, eps, eps_sweep, seed)
    the_run = Run.open(run)
    run_dir = the_run.dir
    refuse_symlinks(run_dir)  # eval.json and AutoAttack states are written inside the run folder only
    meta = the_run.meta
    with torch_threads(threads), bars.enabled(progress):
        arrays = test_images(meta["data"]["dataset"], data_dir or the_run.data_dir, n)
        model = the_run.load_model(device)
        stale = stale_weights_note(the_run)
        if stale and log:
            log(f"igam: WARNING: {stale}")
        return evaluate_model(
            model, arrays.x_test, arrays.y_test, attacks, out=run_dir, name=run_dir.name,
            what=f"Run '{run_dir}'", dataset=meta["data"]["dataset"], n=n, batch_size=batch_size, seed=seed,
            bn=bn, eps=eps, checks=checks, check_n=check_n, check_queries=check_queries, eps_sweep=eps_sweep,
            log=log,
            num_classes=(meta.get("model") or {}).get("num_classes"),
            class_names=list(getattr(arrays, "class_names", None) or []) or None,
            stale={"run_status": meta.get("status"), "stale_weights": stale} if stale else None)


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[str], *,
                   out: Path | None = None, name: str = "model", what: str = "The model", dataset: str = "",
                   n: int | None = None, batch_size: int | str = 500, seed: int = 0, bn: str = "eval",
                   eps: float | str | None = None, checks: bool = False, check_n: int = 500,
                   check_queries: int = 1000, eps_sweep: str | list[str | float] | None = None,
                   log: Callable[[str], None] | None = None, num_classes: int | None = None,
                   class_names: list[str] | None = None,
                   stale: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate any classifier `model` ((N, C, H, W) float images in [0, 1] -> logits (N, K), on its own
    device) on test images x (uint8 or float [0, 1], NCHW) with labels y (N,), the first n of them (default
    all), under `attacks`: what `igam evaluate` and `igam.benchmark` do.

    Each attack's record (`run_attack`: accuracy in [0, 1], settings, n, seed, per-image results,
    per-class accuracy) is keyed by `result_key(name, eps, bn)` and, with a folder `out`, merged into
    OUT/eval.json as soon as its attack is finished; the masking checks (always those the records allow and
    RobustBench's admission checks, plus the sweeps of `checks=True` on the first check_n images, reusing
    eval.json's records made with the same settings on the same images) replace its `masking_checks`
    section at the end. Returns this call's records and `masking_checks` (sweeps of an earlier --checks
    call are kept). batch_size='auto' picks the largest batch that fits (`auto_batch_size`).

    `eps_sweep` (instead of `eps`; e.g. '1/255,2/255,4/255,8/255,16/255', see `parse_eps_sweep`): every
    attack but clean runs at every radius (keys NAME@eps=TEXT), clean is evaluated too (the curves' point at
    eps 0), and the curves (`robustness_curve`, with the verdicts of the eps_monotone and large_eps_zero
    checks and the large eps) are returned under `eps_sweep` (and written to OUT/robustness_curve.json).
    With checks=True the sweep gains the large eps (`large_eps`), where PGD and AutoAttack must reach
    about 0%.

    All attacks are built before any runs, so a bad name or a model with too few classes for an AutoAttack
    component fails at once. With `out`, AutoAttack resumes from OUT/autoattack-state-KEY/ (deleted once
    its record is written) and appends its log to OUT/autoattack-KEY.log. When the test set has fewer than
    n images, all of them are used and each record's `n` says how many. `stale` (keys and values) is
    added to every record (a run evaluated with the weights of an earlier finish).

    Raises: IgamError for bad arguments, and when an attack fails: the message names the attack, the
    results already saved and the attacks left (the original exception is chained). NonFiniteOutputs
    (an IgamError naming `what`) when the model's outputs are NaN/Inf."""
    say = log or (lambda s: None)
    check_evaluation_arguments(attacks, eps, eps_sweep, seed)
    if out is not None:
        try:  # before any attack runs: a read-only folder or a full disk is said now, not after hours
            check_writable(Run(out).eval_path)
        except WriteError as e:
            raise IgamError(f"Cannot write the results file '{e.path}' ({e.reason}); nothing was evaluated. "
                            "Free disk space or make the folder writable, then run the same command again."
                            ) from None
    x, y = (x, y) if n is None else (x[:n], y[:n])
    x, y = check_inputs(x, y, allow_uint8=True)
    shape = tuple(x.shape[1:])
    device = next(model.parameters()).device
    if eps is not None and math.isclose(check_eps(eps), default_eps(shape)[0], rel_tol=1e-9):
        eps = None  # the dataset's own radius: the records are the plain ones (keys without @eps=)
    sweep = None
    if eps_sweep is not None:
        sweep = parse_eps_sweep(eps_sweep, shape)
        if checks:
            sweep = parse_eps_sweep([t for t, _ in sweep] + ["large"], shape)
    prefix = f"igam: {name}:"
    if batch_size == "auto":
        batch_size = auto_batch_size(model, shape, len(x), device)
        say(f"{prefix} --batch-size auto: {batch_size}")
    elif not isinstance(batch_size, int) or batch_size < 1:
        raise IgamError(f"batch_size={batch_size!r}: give a positive number of images, or auto.")
    if n is not None and len(x) < n:
        say(f"{prefix} the test set has {len(x)} images (fewer than n={n}): all {len(x)} are used.")
    plan: list[tuple[str, str | float | None]] = [(a, eps) for a in attacks]
    if sweep is not None:  # clean first (the curves' eps-0 point), then every attack at every radius
        plan = [("clean", None)] + [(a, t) for t, _ in sweep for a in attacks if a != "clean"]
    built: list[tuple[str, str, Attack | None]] = []
    for attack, e in plan:
        key = result_key(attack, e, bn)
        atk = None if attack == "clean" else make_attack(
            attack, model, shape, eps=e, bn=bn, seed=seed,
            state_dir=out / f"autoattack-state-{state_name(key)}" if out is not None else None,
            log_path=out / f"autoattack-{state_name(key)}.log" if out is not None else None,
            progress=lambda s: say(f"{prefix} {s}"))
        built.append((attack, key, atk))

    the_run = Run(out) if out is not None else None
    path = the_run.eval_path if the_run is not None else None
    results: dict[str, Any] = {}

    def save_records(records: dict[str, Any]) -> dict[str, Any]:
        """Merge `records` into eval.json as it is on disk now (re-read under its lock, so a record
        another `igam evaluate` wrote meanwhile is kept); returns the merged contents. Without a folder:
        this call's records."""
        if the_run is None:
            return {k: v for k, v in results.items() if k != "masking_checks"}
        try:
            return update_eval_json(the_run, lambda merged: {**merged, **records}, log=say)
        except WriteError as e:
            done = ", ".join(k for k in results if k not in records) or "none"
            raise IgamError(f"Cannot write the results file '{e.path}' ({e.reason}): the results of "
                            f"{', '.join(records)} are lost; those saved before: {done}. Free disk space or "
                            "make the run folder writable, then run the same command again (saved "
                            "results are reused by reading eval.json).") from None

    for i, (_, key, atk) in enumerate(built):
        say(f"{prefix} {key} on {len(x)} images ...")
        try:
            rec = run_attack(model, x, y, atk or "clean", batch_size=batch_size, seed=seed, bn=bn, what=what,
                             num_classes=num_classes, class_names=class_names,
                             label=f"{name}: {key} [{i + 1}/{len(built)}]")
            rec.update(stale or {})
        except NonFiniteOutputs:
            raise  # (names the run: a diverged model has no accuracy, and nothing is left to finish)
        except BaseException as e:
            done = ", ".join(results) or "none"
            left = (",".join(a for a, _, _ in built[i:]) if sweep is None else
                    f"{','.join(attacks)} --eps-sweep {','.join(t for t, _ in sweep)} (the whole sweep)")
            resume = (" Its AutoAttack state is kept: the same command continues where it stopped."
                      if isinstance(atk, AutoAttack) and atk.state_dir and atk.state_dir.exists() else "")
            how = ("was interrupted" if isinstance(e, KeyboardInterrupt)
                   else f"failed ({type(e).__name__}: {e})")
            kept = f"Results saved in {path}" if path is not None else "Results finished before it"
            msg = f"{prefix} {key} {how}. {kept}: {done}. To finish, run --attacks {left}.{resume}"
            if isinstance(e, IgamError):
                raise IgamError(msg) from e
            say(msg)
            raise
        results[key] = rec
        save_records({key: rec})
        if isinstance(atk, AutoAttack):
            atk.clear_state()
            for line in record_notes(key, rec):
                say(f"{prefix} {line}")
        say(f"{prefix} {key}: {100 * rec['accuracy']:.2f}% ({rec['time_s']} s)")

    nc = min(len(x), check_n)
    # the --checks sweeps run outside the lock (they take long), reusing eval.json's records made with the
    # same settings on the same first images; the verdicts are then judged, under the lock, from eval.json
    # as it is at that moment, so a record another process wrote meanwhile counts too
    swept = sweep_observations(model, x[:nc], y[:nc], eps=eps, queries=check_queries,
                               batch_size=batch_size, seed=seed, bn=bn, log=lambda s: say(f"{prefix} {s}"),
                               what=what, records=save_records({}) if the_run is None else read_eval(the_run),
                               name=name) if checks else []

    def judge(merged: dict[str, Any]) -> dict[str, Any]:
        obs = record_observations(merged, path or "eval.json", say)
        # without --checks, keep the sweeps of an earlier --checks call: same run, same weights
        obs += swept or stored_check_observations(merged, path or "eval.json", say)
        results["masking_checks"] = masking_report(
            model, x[:nc], y[:nc], eps=eps, observations=obs, sweeps=False, queries=check_queries,
            batch_size=batch_size, seed=seed, bn=bn, log=lambda s: say(f"{prefix} {s}"), what=what,
            current=set(results) | {o.name for o in swept})  # the verdict is about what this command ran
        return {**merged, "masking_checks": results["masking_checks"]}

    if the_run is None:
        judge(save_records({}))
    else:
        try:
            update_eval_json(the_run, judge, log=say)
        except WriteError as e:
            raise IgamError(f"Cannot write the results file '{e.path}' ({e.reason}): the masking checks are "
                            f"lost; the attack results ({', '.join(results) or 'none'}) were saved. Free "
                            "disk space or make the run folder writable, then run the same command again."
                            ) from None
    if sweep is not None:
        curve = robustness_curve(results, attacks, sweep, y, bn=bn, num_classes=num_classes,
                                 class_names=class_names)
        mc = results["masking_checks"]
        curve.update(run=name, dataset=dataset, nominal_eps=mc["eps"], large_eps=large_eps(shape, mc["eps"]),
                     checks={k: mc["checks"][k] for k in ("eps_monotone", "large_eps_zero")})
        if the_run is not None:
            try:
                write_json(the_run.curve_path, curve)
            except WriteError as e:
                raise IgamError(f"Cannot write '{e.path}' ({e.reason}); the sweep's records were saved in "
                                f"'{path}'. Free disk space, then run the same command again.") from None
        results["eps_sweep"] = curve
    return results


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
