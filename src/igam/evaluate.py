"""Evaluation of models and runs: accuracy under named attacks, with gradient-masking checks, written to
RUN/eval.json.

Protocol (docs: evaluation-and-infrastructure.md, sec. 4): the model in eval mode (or train-mode BatchNorm
with bn='train', labelled in every record), deterministic given the seed (each batch's random draws come
from (seed, batch index)), robust accuracy counted per example as "correct on the clean image and on the
attack's output" (the clean image is itself a point of the eps-ball), and every record carrying the attack's
settings, n, seed, time and, for AutoAttack, the library (pyautoattack) and its version, the components
with their settings and AutoAttack's own flags.

Every record carries its per-image results (`correct`) and the per-class accuracy computed from them
(`per_class`); eval.json's format, reading and merging are igam.records. `evaluate_run(..., eps_sweep=...)`
runs each attack at several radii and writes the robustness curves to RUN/robustness_curve.json
(igam.sweeps). The masking checks include RobustBench's admission checks (`attacks.admission`).

`evaluate_run` writes each attack's record to RUN/eval.json as soon as it is finished, so an attack that
fails (or an interrupt) never loses the results before it; AutoAttack keeps a resume state in
RUN/autoattack-state-KEY/ until its record is written, so an interrupted evaluation continues.

    from igam.evaluate import run_attack
    rec = run_attack(model, x_uint8, y, "pgd20")          # {"accuracy": ..., "attack": {...}, ...}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import igam.progress as bars
from igam.attacks import Attack, AutoAttack, make_attack, parse_preset
from igam.attacks.admission import ADMISSION_N, admission_checks
from igam.attacks.autoattack import INSTALL_HINT, pyautoattack_version
from igam.attacks.base import check_inputs
from igam.attacks.checks import Observation, gradient_stats, run_checks
from igam.attacks.presets import default_eps
from igam.data import load_data
from igam.errors import IgamError, NonFiniteOutputs, WriteError
from igam.files import check_writable, write_json
from igam.records import (
    observation,
    pack_correct,
    per_class_accuracy,
    read_eval,
    record_notes,
    record_observations,
    result_key,
    reusable_record,
    state_name,
    stored_check_observations,
    update_eval_json,
)
from igam.runs import Run, refuse_symlinks
from igam.sweeps import check_attacks, large_eps, parse_eps_sweep, robustness_curve
from igam.units import check_eps
from igam.utils import bn_mode, mix_seed, to_unit, torch_threads

__all__ = ["accuracy", "auto_batch_size", "evaluate_attack", "evaluate_model", "evaluate_run",
           "masking_report", "predict", "run_attack", "stale_weights_note", "sweep_observations",
           "test_images", "validate_attacks"]


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


def check_logits(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Labels must index the model's outputs."""
    if logits.ndim == 2 and len(y) and int(y.max()) >= logits.shape[1]:
        raise IgamError(f"Label {int(y.max())} is out of range for a model with {logits.shape[1]} outputs "
                        f"(labels must be 0 .. {logits.shape[1] - 1}); is this the model's dataset?")


def validate_attacks(names: list[str]) -> None:
    """Fail before any work on a bad name, or on AutoAttack without pyautoattack."""
    if not names:
        raise IgamError("No attacks given; write e.g. --attacks clean,fgsm,pgd20.")
    for name in names:
        if name != "clean" and parse_preset(name).kind == "autoattack" and pyautoattack_version() is None:
            raise IgamError(INSTALL_HINT)


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
