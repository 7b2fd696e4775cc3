"""The results of an experiment: results.json from the runs' eval.json files, the paper-format
results.md table, matched-clean-accuracy comparisons and the robust-vs-clean trade-off plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import igam.registry as registry
from igam.attacks.checks import summary
from igam.experiment.costs import hms
from igam.experiment.spec import Experiment, Stage, mark_smoke_test, resolve_stage
from igam.files import write_figure
from igam.records import read_eval
from igam.runs import Run


def masking_summary(mc: Any) -> str | None:
    """'pass (3 of 7 ran)' / 'FAIL: converged (5 of 7 ran)' for an eval.json masking_checks section."""
    if not isinstance(mc, dict) or not isinstance(mc.get("checks"), dict):
        return None
    return summary(mc["checks"])


def collect_results(exp: Experiment, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"experiment": exp.name, "rows": []}
    for st in exp.stages:
        run_dir = exp.out_dir / st.name
        if not (run_dir / Run.META).exists():
            continue
        meta = Run(run_dir).meta
        ev = read_eval(run_dir, log)  # damaged records left out, with a warning
        acc = {
            k: round(100 * v["accuracy"], 2) for k, v in ev.items() if isinstance(v, dict) and "accuracy" in v
        }
        out["rows"].append(
            {
                "stage": st.name,
                "row": st.row,
                "curve": st.curve,
                "method": meta.get("method"),
                "model": meta.get("model", {}).get("name"),
                "accuracy": acc,
                "paper": st.paper,
                "n": {k: v.get("n") for k, v in ev.items() if isinstance(v, dict) and "n" in v},
                "masking_checks": (ev.get("masking_checks") or {}).get("passed"),
                "masking_failed": (ev.get("masking_checks") or {}).get("failed", []),
                "masking_summary": masking_summary(ev.get("masking_checks")),
                "train_time_s": meta.get("train_time_s"),
                "passes_per_image": meta.get("passes_per_image"),
                "epochs": meta.get("epochs"),
                "time_per_epoch_s": (
                    round(meta["train_time_s"] / meta["epochs"], 1)
                    if meta.get("train_time_s") and meta.get("epochs")
                    else None
                ),
                "config": _stage_summary(exp, st),
            }
        )
    return out


def _stage_summary(exp: Experiment, st: Stage) -> dict[str, Any]:
    """The keys that tell a stage apart; `model` is the network the run trained (meta.json: a fine-tuned
    teacher's is `adapted:BODY`, whatever cfg.model says), else cfg.model."""
    cfg = resolve_stage(exp, st)
    info = registry.METHODS.get(cfg.method)
    keys = ["method", "model", "dataset", "epochs", "train_subset", *(info.summary if info else ())]
    if getattr(cfg, "teacher_term", "none") != "none":
        keys += ["teacher_term"]
    out = {k: getattr(cfg, k) for k in keys}
    run = Run(exp.out_dir / st.name)
    if run.meta_path.exists():
        out["model"] = (run.meta.get("model") or {}).get("name", out["model"])
    return out


def results_markdown(exp: Experiment, results: dict[str, Any], column_name) -> str:
    cols: list[str] = []
    for ev in exp.evaluation:
        cols += [a for a in ev["attacks"] if a not in cols]
    lines = [
        f"# {exp.name}",
        "",
        exp.description.strip(),
        "",
        "Accuracy (%) on the first n test images; paper's number in brackets where it reports one. "
        "Robust accuracy under each attack, eval-mode BatchNorm. passes/img: the training cost that does not "
        "depend on the machine, forward/backward passes per training image over the whole run (S student, "
        "T teacher, D discriminator; a third number counts double backwards).",
        "",
        "| Model | " + " | ".join(_column(c, column_name) for c in cols)
        + " | masking checks | passes/img | train time |",
        "|---|" + "---|" * (len(cols) + 3),
    ]
    for r in results["rows"]:
        if not (r["row"] or r["curve"]) or not r["accuracy"]:
            continue
        cells = []
        for c in cols:
            v = r["accuracy"].get(c)
            p = r["paper"].get(c)
            cells.append(("-" if v is None else f"{v:.1f}") + (f" ({p:g})" if p is not None else ""))
        mc = r.get("masking_summary") or {True: "pass", False: "FAIL: " + ", ".join(r["masking_failed"]),
                                          None: "-"}[r["masking_checks"]]
        t = hms(r["train_time_s"]) if r["train_time_s"] else "-"
        pp = format_passes(r.get("passes_per_image"))
        lines.append(f"| {r['row'] or r['stage']} | " + " | ".join(cells) + f" | {mc} | {pp} | {t} |")
    pts = curve_points(results, exp.primary_metric)
    grid, matched = matched_clean(pts)
    if matched:
        metric = _column(exp.primary_metric, column_name)
        lines += [
            "",
            f"{metric} accuracy (%) at matched clean accuracy: each trade-off curve (2+ stages with the same "
            "`curve`) interpolated linearly between its measured points; '-' outside the curve's measured "
            "range (never extrapolated).",
            "",
            "| curve | points | " + " | ".join(f"clean {g:g}" for g in grid) + " |",
            "|---|---|" + "---|" * len(grid),
        ]
        for k, vals in sorted(matched.items()):
            cells = ["-" if v is None else f"{v:.1f}" for v in vals]
            lines.append(f"| {k} | {len(pts[k])} | " + " | ".join(cells) + " |")
    ns = sorted({f"{k}: n={v}" for r in results["rows"] for k, v in r["n"].items()})
    lines += [
        "",
        "Evaluated on: " + "; ".join(ns) if ns else "",
        "",
        "Stages (full configs in each run's config.yaml):",
        "",
    ]
    for r in results["rows"]:
        tpe = f", {r['time_per_epoch_s']} s/epoch" if r.get("time_per_epoch_s") else ""
        lines.append(f"- `{r['stage']}`: " + ", ".join(f"{k}={v}" for k, v in r["config"].items()) + tpe)
    return "\n".join(lines) + "\n"


def format_passes(passes: dict[str, dict[str, float]] | None) -> str:
    """'S 16/16 · T 4/4 · D 8.8/8.8' (forward/backward[/double backward] per training image by network,
    networks that cost nothing left out); '-' for runs that predate the count."""
    if not passes:
        return "-"
    parts = []
    for net, tag in (("student", "S"), ("teacher", "T"), ("discriminator", "D")):
        c = passes.get(net) or {}
        f, b, d = (float(c.get(k, 0)) for k in ("forward", "backward", "double_backward"))
        if f or b or d:
            parts.append(f"{tag} {f:.3g}/{b:.3g}" + (f"/{d:.3g}" if d else ""))
    return " · ".join(parts) or "0"


def _column(name: str, column_name) -> str:
    base, _, eps = name.partition("@eps=")
    return column_name(base) + (f" (eps {eps})" if eps else "")


def curve_points(results: dict[str, Any], metric: str) -> dict[str, list[tuple[float, float, str]]]:
    """(clean, robust, stage) per `curve` label, sorted by clean accuracy; a row without one is a point."""
    pts: dict[str, list[tuple[float, float, str]]] = {}
    for r in results["rows"]:
        a = r["accuracy"]
        if "clean" in a and metric in a and (r["curve"] or r["row"]):
            pts.setdefault(r["curve"] or r["row"], []).append((a["clean"], a[metric], r["stage"]))
    return {k: sorted(v) for k, v in pts.items()}


def matched_clean(pts: dict[str, list[tuple[float, float, str]]], levels: int = 6
                  ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Robust accuracy of every curve (2+ points) at the same clean accuracies: `levels` evenly spaced
    whole-number levels across all curves' clean ranges, interpolated linearly between a curve's measured
    points, None outside its measured range (never extrapolated)."""
    import numpy as np

    curves = {k: p for k, p in pts.items() if len(p) >= 2}
    if not curves:
        return [], {}
    lo = math.ceil(min(p[0][0] for p in curves.values()))
    hi = max(lo, math.floor(max(p[-1][0] for p in curves.values())))
    grid = sorted({float(round(lo + (hi - lo) * i / max(1, levels - 1))) for i in range(levels)})
    out: dict[str, list[float | None]] = {}
    for k, p in curves.items():
        xs, ys = [q[0] for q in p], [q[1] for q in p]
        out[k] = [float(np.interp(g, xs, ys)) if xs[0] <= g <= xs[-1] else None for g in grid]
    return grid, out


def plot_tradeoff(exp: Experiment, results: dict[str, Any], path: Path) -> Path | None:
    """Robust (primary metric) vs clean accuracy: one line per `curve`, other rows as single points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = exp.primary_metric
    pts = curve_points(results, metric)
    if not pts:
        return None
    configs = {st.name: st.config for st in exp.stages}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    # distinct colours for up to ~26 entries: lines first, then single points with varied markers
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors, *plt.get_cmap("Set1").colors]
    order = sorted(pts.items(), key=lambda kv: (len(kv[1]) == 1, kv[0]))
    swept: set[str] = set()
    for i, (label, p) in enumerate(order):
        color = palette[i % len(palette)]
        style = "o-" if len(p) > 1 else "sD^vPX*h"[i % 8]
        ax.plot([q[0] for q in p], [q[1] for q in p], style, label=label, markersize=7, color=color)
        # label a curve's points with the settings that differ along it (the swept lambda)
        cfgs = [configs.get(q[2], {}) for q in p]
        keys = sorted(k for k in set().union(*cfgs) if len({str(c.get(k)) for c in cfgs}) > 1)
        swept.update(keys)
        for q, c in zip(p, cfgs):
            if keys:
                ax.annotate(",".join(str(c.get(k)) for k in keys), (q[0], q[1]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
    if swept:
        ax.text(0.99, 0.01, "points labelled by " + ", ".join(sorted(swept)), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(f"{exp.name}: robustness vs clean accuracy")
    mark_smoke_test(ax, exp)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    write_figure(fig, path, dpi=120, format="png")
    plt.close(fig)
    return path
