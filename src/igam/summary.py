"""Evaluation results as text for a terminal: the table `igam evaluate` prints (also `igam info` and
`igam.benchmark`), the headline (per image, the worst case over the attacks run at one eps), per-class
notes, a robustness-curve table, and a shipped teacher's certificate as tables. Accuracies in %.

    print(eval_text(read_json("runs/x/eval.json"), "x"))   # what `igam info runs/x` shows of eval.json
"""

from __future__ import annotations

import json
import re
from typing import Any

from igam.attacks import column_label, column_name
from igam.attacks.checks import summary as check_summary
from igam.records import worst_case
from igam.units import eps_text

__all__ = ["certificate_text", "column_title", "eval_text", "format_sweep_table", "format_table",
           "headline_lines", "order_attacks", "per_class_text", "sweep_notes"]

ATTACK_ORDER = ("clean", "fgsm")


def order_attacks(names: list[str]) -> list[str]:
    """eval.json keys in reading order: clean, FGSM, then attacks by family and strength (steps); keys with
    @eps=/@bn= after their base attack, radii in increasing order."""
    def key(a: str) -> tuple[int, str, int, float, str]:
        base, _, rest = a.partition("@")
        m = re.search(r"(\d+)", base)
        e = re.search(r"eps=([0-9./]+)", rest)
        radius = 0.0
        if e:
            num, _, den = e.group(1).partition("/")
            try:
                radius = float(num) / (float(den) if den else 1.0)
            except ValueError:
                radius = 0.0
        return (ATTACK_ORDER.index(base) if base in ATTACK_ORDER else len(ATTACK_ORDER),
                re.sub(r"\d+", "", base), int(m.group(1)) if m else 0, radius, a)

    return sorted(dict.fromkeys(names), key=key)


def column_title(key: str, records: list[dict[str, Any] | None] = ()) -> str:  # type: ignore[assignment]
    """A table header for an eval.json key: 'PGD20', 'PGD20 (eps 4/255)', 'AutoAttack (train BN)'."""
    base, *variants = key.split("@")
    label = column_label(base, records)
    shown = [f"eps {v[4:]}" if v.startswith("eps=") else "train BN" if v == "bn=train" else v
             for v in variants]
    return label + (f" ({', '.join(shown)})" if shown else "")


def format_table(rows: list[tuple[str, dict[str, dict[str, Any]]]], attacks: list[str]) -> str:
    """The paper's table: | Model | Clean | FGSM | PGD5 | ... |, one row per (label, {attack: record}),
    accuracies in %."""
    lines = [
        "| Model | " + " | ".join(column_title(a, [res.get(a) for _, res in rows]) for a in attacks) + " |",
        "|" + "---|" * (len(attacks) + 1),
    ]
    for name, res in rows:
        cells = [f"{100 * res[a]['accuracy']:.2f}" if isinstance(res.get(a), dict) else "-" for a in attacks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_sweep_table(curves: list[tuple[str, dict]]) -> str:
    """The eps sweep: | Model | eps | PGD20 | ... | one row per run and radius (eps 0: clean), in %."""
    labels = list(dict.fromkeys(c.get("label") or c["attack"] for _, data in curves for c in data["curves"]))
    lines = ["| Model | eps | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for name, data in curves:
        by_label = {c.get("label") or c["attack"]: {p["eps_text"]: p["accuracy"] for p in c["points"]}
                    for c in data["curves"]}
        for text in data["eps_text"]:
            cells = [f"{100 * by_label[a][text]:.2f}" if text in by_label.get(a, {}) else "-" for a in labels]
            lines.append(f"| {name} | {text if text != '0' else '0 (clean)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_text(name: str, rec: dict) -> str:
    """'pgd20 41.25/12.50 (class 3)' from an eval.json record's per_class section (accuracies in %)."""
    pc = rec.get("per_class") or {}
    if pc.get("mean") is None:
        return f"{name} -"
    classes = pc.get("classes") or []
    worst = pc.get("worst_class")
    name_of = classes[worst] if isinstance(worst, int) and worst < len(classes) else None
    which = f"{worst} {name_of}" if name_of is not None and str(name_of) != str(worst) else f"{worst}"
    return f"{name} {100 * pc['mean']:.2f}/{100 * pc['worst']:.2f} (class {which})"


def sweep_notes(curve: dict) -> list[str]:
    """What the sweep says about gradient masking: whether its largest eps was large enough to require ~0%
    accuracy (unless large_eps_zero already has a verdict from the run's records, e.g. an earlier sweep),
    and the verdicts of eps_monotone and large_eps_zero."""
    largest, large = max(curve["eps"]), float(curve.get("large_eps") or 0)
    text = curve["eps_text"][curve["eps"].index(largest)]
    checks = curve.get("checks") or {}
    out = []
    known = (checks.get("large_eps_zero") or {}).get("passed") is not None  # e.g. from an earlier sweep
    if largest < large - 1e-9 and not known:
        out.append(f"the sweep's largest eps {text} is below {eps_text(large)}, where accuracy "
                   "must reach about 0%: add `large` to --eps-sweep (or use --checks) to check that it does")
    for k in ("eps_monotone", "large_eps_zero"):
        v = checks.get(k) or {}
        if v.get("passed") is not None:
            out.append(f"sweep check {k}: {'pass' if v['passed'] else 'FAIL'}: {v.get('detail', '')}")
    return out


def headline_lines(label: str, records: dict[str, dict[str, Any]]) -> list[str]:
    """'headline: LABEL: 41.20% robust at eps 8/255, per image the worst case over fgsm, pgd20' for each
    radius at which two or more attacks ran on the same images."""
    by_eps: dict[float, dict[str, dict[str, Any]]] = {}
    for a, rec in records.items():
        if isinstance(rec, dict) and isinstance(rec.get("eps"), int | float) and "accuracy" in rec:
            by_eps.setdefault(round(float(rec["eps"]), 12), {})[a] = rec
    out = []
    for eps, recs in sorted(by_eps.items()):
        head = worst_case(recs) if len({r.get("n") for r in recs.values()}) == 1 else None
        if head is not None and len(head["attacks"]) > 1:
            out.append(f"headline: {label}: {100 * head['accuracy']:.2f}% robust at eps {eps_text(eps)}, per "
                       f"image the worst case over {', '.join(head['attacks'])}")
    return out


def eval_text(ev: dict[str, Any], label: str) -> str:
    """eval.json as `igam evaluate` prints it: the table of the records at the dataset's eps (keys without
    @), the headline and per-class lines, a second table of the records at other radii or BatchNorm modes,
    and the masking checks' verdict."""
    records = {k: v for k, v in ev.items() if isinstance(v, dict) and "accuracy" in v}
    if not records:
        return "(no evaluation yet: igam evaluate RUN --attacks clean,pgd20)"
    plain = order_attacks([k for k in records if "@" not in k])
    rest = order_attacks([k for k in records if "@" in k])
    lines = []
    if plain:
        lines.append(format_table([(label, records)], plain))
        ns = sorted({records[a].get("n") for a in plain}, key=str)
        lines.append(f"(accuracy in %, first {'/'.join(map(str, ns))} test images"
                     + (f", seed {records[plain[0]].get('seed')}" if records[plain[0]].get("seed") is not None
                        else "") + ")")
        lines += headline_lines(label, {a: records[a] for a in plain})
        if any(isinstance(records[a].get("per_class"), dict) for a in plain):
            lines.append(f"note: {label}: per-class accuracy (mean over classes / worst class): "
                         + "; ".join(per_class_text(a, records[a]) for a in plain))
    if rest:
        lines.append("")
        lines.append("| attack | eps | accuracy | n |")
        lines.append("|---|---|---|---|")
        for k in rest:
            r = records[k]
            e = r.get("eps")
            bn = " (train BN)" if "@bn=train" in k else ""
            lines.append(f"| {column_name(k.partition('@')[0])}{bn} | "
                         f"{eps_text(float(e)) if isinstance(e, int | float) else '-'} | "
                         f"{100 * r['accuracy']:.2f} | {r.get('n')} |")
    mc = ev.get("masking_checks")
    if isinstance(mc, dict) and isinstance(mc.get("checks"), dict):
        lines.append(f"note: {label}: masking checks: {check_summary(mc['checks'])}")
    return "\n".join(lines)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def certificate_text(cert: dict[str, Any]) -> str:
    """A shipped teacher's certificate as tables: its accuracies (%) in the evaluation table's form, the
    attacks' settings, then every other field."""
    acc = {k: v for k, v in (cert.get("accuracy") or {}).items() if isinstance(v, int | float)}
    attacks = order_attacks(list(acc))
    eps = cert.get("eps")
    radius = eps_text(float(eps)) if isinstance(eps, int | float) else eps
    row = (f"igam:{cert.get('name')}", {a: {"accuracy": acc[a]} for a in attacks})
    lines = [format_table([row], attacks),
             f"(accuracy in %, first {cert.get('n')} {cert.get('dataset')} test images, {cert.get('threat')} "
             f"eps {radius})", ""]
    settings = cert.get("attacks") if isinstance(cert.get("attacks"), dict) else {}
    if settings:
        lines += ["| attack | settings |", "|---|---|"]
        for a, s in settings.items():
            shown = {k: v for k, v in s.items() if k not in ("attack", "eps", "component_settings")} \
                if isinstance(s, dict) else s
            lines.append(f"| {column_name(a)} | {_value(shown)} |")
        lines.append("")
    model = cert.get("model") if isinstance(cert.get("model"), dict) else {}
    rows = {"model": ", ".join(f"{k} {_value(v)}" for k, v in model.items() if k not in ("mean", "std")),
            **{k: v for k, v in cert.items() if k not in ("accuracy", "attacks", "model", "name")}}
    lines += ["| field | value |", "|---|---|"]
    for k, v in rows.items():
        if isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()):
            v = "; ".join(f"{n}: " + ", ".join(f"{a} {_value(b)}" for a, b in x.items())
                          for n, x in v.items())
        lines.append(f"| {k} | {_value(v)} |")
    return "\n".join(lines)
