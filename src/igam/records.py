"""RUN/eval.json: the records of an evaluation and how they are read, merged and reused. Nothing here runs a
model (igam.evaluate does).

One record per attack (and radius, and BatchNorm mode), keyed by `result_key`, with the attack's settings,
n, seed, time, its per-image results (`correct`: packed bits, `pack_correct`) and the per-class accuracy
computed from them (`per_class_accuracy`). The headline is the worst case per image over the attacks run
(`worst_case`). Readers (reports, experiment results, model info) take eval.json through `read_eval`, which
leaves damaged entries out with a warning; writers merge into it under the run's eval lock
(`update_eval_json`). A record that already holds what an attack would compute is reused
(`reusable_record`). Its records, and the --checks sweeps stored in its `masking_checks` section, are the
inputs of the masking checks (`record_observations`, `stored_check_observations`); AutoAttack's flags and
settings become notes under a results table (`record_notes`).

    from igam.records import read_eval
    records = read_eval("runs/igam", log=print)   # {} without eval.json; damaged entries left out, warned
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igam.attacks import Attack
from igam.attacks.autoattack import FLAGS_DOC
from igam.attacks.checks import Observation
from igam.errors import IgamError
from igam.files import read_json_object, waiting_lock, write_json
from igam.runs import Run

__all__ = ["observation", "pack_correct", "per_class_accuracy", "read_eval", "record_notes",
           "record_observations", "record_problem", "result_key", "reusable_record", "same_settings",
           "state_name", "stored_check_observations", "unpack_correct", "update_eval_json", "worst_case"]


def result_key(name: str, eps: float | str | None = None, bn: str = "eval") -> str:
    """Key of a result in eval.json: the attack name, plus @eps=... when eps is overridden and @bn=train."""
    key = name
    if eps is not None and name != "clean":
        key += f"@eps={str(eps).replace(' ', '')}"
    return key + ("@bn=train" if bn == "train" else "")


def state_name(key: str) -> str:
    """File-name form of an eval.json key: 'autoattack@eps=8/255' -> 'autoattack@eps=8_255'."""
    return re.sub(r"[^A-Za-z0-9._=@+-]", "_", key)


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
