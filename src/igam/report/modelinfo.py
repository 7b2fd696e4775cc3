"""Results in the field's format: RobustBench's model-info JSON (github.com/RobustBench/robustbench,
model_info/DATASET/THREAT/NAME.json) from a run's meta.json and eval.json.

    {"name", "architecture", "dataset", "threat_model", "eps", "clean_acc", "reported", "autoattack_acc",
     "additional_data", "number_forward_passes", "footnote", ...}

Accuracies are percentages as strings with two decimals, as RobustBench writes them. `autoattack_acc` is
the reference AutoAttack's standard version (eval.json key `autoattack`, library pyautoattack) at the
nominal eps; without it the field is null and the footnote says so: a PGD number is never passed off as
AutoAttack. `reported` is, per image, the worst case over the attacks run at that eps (records without
per-image results: the lowest of their accuracies), and the footnote names the attacks.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

from igam.errors import IgamError
from igam.evaluate import read_eval, worst_case
from igam.files import write_json
from igam.runs import Run

MODEL_INFO = "model_info.json"


def _pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


def _eps_text(eps: float) -> str:
    """8/255 as RobustBench writes it when eps is a simple fraction of 255, else the number."""
    frac = Fraction(eps).limit_denominator(255)
    exact = abs(float(frac) - eps) < 1e-9 and 255 % frac.denominator == 0 and frac.denominator > 1
    return f"{frac.numerator * (255 // frac.denominator)}/255" if exact else f"{eps:g}"


def model_info(run: str | Path, *, name: str = "", additional_data: bool = False) -> dict[str, Any]:
    """RobustBench's model-info record of an evaluated run (see the module docstring).

    Raises:
        IgamError: the run has no eval.json or no clean accuracy in it.
    """
    r = Run.open(run)
    if not r.eval_path.exists():
        raise IgamError(f"Run '{r.dir}' has no eval.json; evaluate it first (igam evaluate {r.dir} "
                        "--attacks clean,autoattack).")
    ev = read_eval(r)  # damaged records left out
    meta = r.meta
    clean = ev.get("clean")
    if not isinstance(clean, dict) or "accuracy" not in clean:
        raise IgamError(f"{r.eval_path} has no clean accuracy; run igam evaluate with --attacks clean,... "
                        "first.")
    # robust records on the same images as the clean one (eval.json can hold runs of several --n)
    robust = {k: v for k, v in ev.items() if isinstance(v, dict) and k != "clean" and "@" not in k
              and isinstance(v.get("eps"), int | float) and "accuracy" in v and v.get("n") == clean.get("n")}
    eps = max((v["eps"] for v in robust.values()), default=None)
    at_eps = {k: v for k, v in robust.items() if eps is not None and abs(v["eps"] - eps) < 1e-12}
    strongest = min(at_eps, key=lambda k: at_eps[k]["accuracy"]) if at_eps else None
    head = worst_case(at_eps) if at_eps else None  # per image, the worst case over the attacks run
    aa = at_eps.get("autoattack")
    settings = (aa.get("attack") or {}) if isinstance(aa, dict) else {}
    aa_ok = settings.get("library") == "pyautoattack" and settings.get("version") == "standard"
    notes = []
    if head is not None and len(head["attacks"]) > 1:
        notes.append(f"reported: per image the worst case over {', '.join(head['attacks'])} on the first "
                     f"{head['n']} test images")
    elif strongest is not None:
        notes.append(f"reported: {strongest} on the first {at_eps[strongest]['n']} test images")
    if not aa_ok:
        notes.append("no reference AutoAttack (pyautoattack, standard version) in eval.json: "
                     "autoattack_acc is null")
    data = meta.get("data") or {}
    model = meta.get("model") or {}
    return {
        "name": name or r.name,
        "architecture": model.get("name"),
        "dataset": data.get("dataset"),
        "threat_model": "Linf",
        "eps": _eps_text(eps) if eps is not None else None,
        "clean_acc": _pct(clean["accuracy"]),
        "reported": (_pct(head["accuracy"]) if head is not None
                     else _pct(at_eps[strongest]["accuracy"]) if strongest else None),
        "autoattack_acc": _pct(aa["accuracy"]) if aa_ok else None,
        "additional_data": bool(additional_data),
        "number_forward_passes": 1,
        "footnote": "; ".join(notes) or None,
        "n_test_images": clean.get("n"),
        "igam": {"method": meta.get("method"), "teacher": meta.get("teacher"), "seed": meta.get("seed"),
                 "version": meta.get("version"), "git_commit": meta.get("git_commit")},
    }


def write_model_info(run: str | Path, **kw: Any) -> Path:
    """model_info(run) written to RUN/model_info.json; returns the path."""
    path = Run.open(run).dir / MODEL_INFO
    write_json(path, model_info(run, **kw))
    return path
