"""Results in the field's format: RobustBench's model-info JSON (github.com/RobustBench/robustbench,
model_info/DATASET/THREAT/NAME.json) from a run's meta.json and eval.json, with every key RobustBench's
files carry:

    {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
     "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}

plus igam's own (`n_test_images`, `igam`: method, teacher chain, the worst case over the attacks run, ...).
Accuracies are percentages as strings with two decimals, as RobustBench writes them. `autoattack_acc` is
the reference AutoAttack's standard version (eval.json key `autoattack`, library pyautoattack) at the
nominal eps; without it the field is null and the footnote says so: a PGD number is never passed off as
AutoAttack. `reported` means what RobustBench means, the figure of the model's paper: null unless given;
igam's own figure (per image, the worst case over the attacks run at that eps) is `igam.worst_case_acc`.
`additional_data` is true when the robustness came from a teacher trained on other data than the run's
own (a fine-tuned teacher, or a student of a teacher from another task: any method that reads its
teacher, `transfers_from_teacher`; true when that cannot be told), and the footnote says where it came
from. `link`, `authors` and `venue` are null unless given.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import igam.registry as registry
from igam.config import make_config, reads
from igam.errors import IgamError
from igam.files import write_json
from igam.models import shipped
from igam.records import read_eval, worst_case
from igam.runs import Run

MODEL_INFO = "model_info.json"


def _pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


def _eps_text(eps: float) -> str:
    """8/255 as RobustBench writes it when eps is a simple fraction of 255, else the number."""
    frac = Fraction(eps).limit_denominator(255)
    exact = abs(float(frac) - eps) < 1e-9 and 255 % frac.denominator == 0 and frac.denominator > 1
    return f"{frac.numerator * (255 // frac.denominator)}/255" if exact else f"{eps:g}"


def transfers_from_teacher(meta: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether a run's robustness came (in part) from its teacher: it names one and its method reads it
    (what the method registered, igam.registry.MethodInfo.reads, for this run's settings: finetune, igam,
    kd-noise, rrm, ard, rslad, an adversarial method with a teacher term; model=teacher too)."""
    if not meta.get("teacher"):
        return False
    try:  # (a run folder without config.yaml: its method from meta.json)
        return "teacher" in reads(make_config(overrides={"method": meta.get("method"), **dict(config)}))
    except IgamError:  # a config.yaml this version does not take: what the method can read at all
        info = registry.METHODS.get(str(meta.get("method")))
        declared = (info.reads(None) if callable(info.reads) else info.reads) if info is not None else ()
        return "teacher" in declared


def teacher_origin(meta: dict[str, Any],
                   config: dict[str, Any] | None = None) -> tuple[list[str], str | None]:
    """Where a run's teacher came from: (the chain of teachers from the run's own to the robust source,
    the dataset that source was trained on or None when it cannot be told). A fine-tuned teacher run
    points on to its own teacher; a shipped teacher's certificate and a robustbench: name say their
    dataset; a weights file says it through the run's teacher_dataset."""
    chain: list[str] = []
    spec = meta.get("teacher")
    cfg = config or {}
    while isinstance(spec, str) and spec and spec not in chain and len(chain) < 8:
        chain.append(spec)
        if spec.startswith(shipped.PREFIX):
            try:
                return chain, str(shipped.certificate(spec)["dataset"])
            except IgamError:
                return chain, None
        if spec.startswith("robustbench:"):
            return chain, spec.partition(":")[2].split("/")[0] or None
        path = Path(spec)
        if not (path / Run.META).is_file():  # a weights file, or a run no longer at hand
            return chain, (str(cfg.get("teacher_dataset")) or None) if path.is_file() else None
        try:
            run = Run(path)
            m, cfg = run.meta, run.config
        except IgamError:
            return chain, None
        if not m.get("teacher"):  # the robust source itself
            return chain, (m.get("data") or {}).get("dataset")
        spec = m.get("teacher")
    return chain, None


def model_info(run: str | Path, *, name: str = "", additional_data: bool | None = None,
               reported: float | str | None = None, link: str | None = None, authors: str | None = None,
               venue: str | None = None) -> dict[str, Any]:
    """RobustBench's model-info record of an evaluated run (see the module docstring). `reported` is the
    paper's figure (a percentage) when there is one; `additional_data` None: told from the teacher chain.

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
    data = meta.get("data") or {}
    model = meta.get("model") or {}
    own = data.get("dataset")
    notes = []
    worst = (head["accuracy"] if head is not None else at_eps[strongest]["accuracy"] if strongest else None)
    if head is not None and len(head["attacks"]) > 1:
        notes.append(f"igam's worst case: per image over {', '.join(head['attacks'])} on the first "
                     f"{head['n']} test images")
    elif strongest is not None:
        notes.append(f"igam's worst case: {strongest} on the first {at_eps[strongest]['n']} test images")
    if not aa_ok:
        notes.append("no reference AutoAttack (pyautoattack, standard version) in eval.json: "
                     "autoattack_acc is null")
    config = r.config
    chain, source = teacher_origin(meta, config) if transfers_from_teacher(meta, config) else ([], None)
    if chain:
        via = f" through {', '.join(chain[:-1])}" if len(chain) > 1 else ""
        notes.append(f"robustness transferred ({meta.get('method')}) from the teacher {chain[-1]}{via}, "
                     + (f"trained on {source}" if source else "whose training data is not recorded"))
        told = source is None or source != own
    else:
        told = False
    return {
        "link": link,
        "name": name or r.name,
        "authors": authors,
        "additional_data": bool(told if additional_data is None else additional_data),
        "number_forward_passes": 1,
        "dataset": own,
        "venue": venue,
        "architecture": model.get("name"),
        "eps": _eps_text(eps) if eps is not None else None,
        "clean_acc": _pct(clean["accuracy"]),
        "reported": (f"{float(reported):.2f}" if isinstance(reported, int | float) else reported),
        "autoattack_acc": _pct(aa["accuracy"]) if aa_ok else None,
        "footnote": "; ".join(notes) or None,
        "n_test_images": clean.get("n"),
        "igam": {"worst_case_acc": _pct(worst) if worst is not None else None, "method": meta.get("method"),
                 "teacher": meta.get("teacher"), "teacher_chain": chain, "teacher_dataset": source,
                 "seed": meta.get("seed"), "version": meta.get("version"),
                 "git_commit": meta.get("git_commit")},
    }


def write_model_info(run: str | Path, **kw: Any) -> Path:
    """model_info(run) written to RUN/model_info.json; returns the path."""
    path = Run.open(run).dir / MODEL_INFO
    write_json(path, model_info(run, **kw))
    return path
