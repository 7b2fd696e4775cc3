"""Robustness per compute: the frontier pictures and tables of an experiment.

Two pictures per experiment (written by `igam run`'s results step, shown by `igam report`):
- frontier-clean.png: robust accuracy (AutoAttack where it was measured, else the primary metric) against
  clean accuracy, one line per `curve` along its swept knob, points labelled by the knob;
- frontier-cost.png: the same robust accuracy against the training cost in passes per training image
  (log scale).
On both the Pareto front is marked: the points no other point beats on both axes (higher clean accuracy,
or lower cost, and higher robust accuracy). A second seed of a curve's point (a row whose configuration
differs from a curve stage's only in `seed`) is drawn hollow in the curve's colour and counts for the front.

The cost is the machine-independent count every run records (meta.json `passes_per_image`, by network):
forward + backward passes of student, teacher and discriminator, a double backward counted as two. The
teacher's own training is not counted: the question is what to do when a robust model for another task
already exists.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from igam.attacks.presets import column_name
from igam.experiment.results import curve_points, matched_clean
from igam.experiment.spec import Experiment, mark_smoke_test
from igam.files import write_figure

DOUBLE_BACKWARD_PASSES = 2.0  # a double backward costs about two to three first-order passes
FRONTIER_FILES = ("frontier-clean.png", "frontier-cost.png")


SMOOTH = ("gelu", "silu", "softplus")
_ACTIVATION_TAG = re.compile(r"\s*[(\[](relu|leaky-relu|gelu|silu|softplus)[)\]]", re.IGNORECASE)


def _family(series: str) -> str:
    """A curve's method, for its colour: the label without an activation tag ('PGD-7 (GELU)' -> 'PGD-7')."""
    return _ACTIVATION_TAG.sub("", series).strip() or series


def total_passes(passes: dict[str, dict[str, float]] | None) -> float | None:
    """Passes per training image over the whole run, all networks together (a double backward counted as
    DOUBLE_BACKWARD_PASSES); None for runs that predate the count."""
    if not passes:
        return None
    total = 0.0
    for counts in passes.values():
        c = counts or {}
        total += float(c.get("forward", 0)) + float(c.get("backward", 0))
        total += DOUBLE_BACKWARD_PASSES * float(c.get("double_backward", 0))
    return total


def pareto_front(points: list[tuple[float, float]], *, lower_x_better: bool = False) -> list[int]:
    """Indices of the points on the Pareto front, sorted by x: no other point is at least as good on both
    axes and strictly better on one. y (robust accuracy) is always better higher; x is better higher (clean
    accuracy) or, with lower_x_better, lower (cost). Equal points are all on the front."""
    sign = -1.0 if lower_x_better else 1.0
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(sign * xo >= sign * x and yo >= y and (sign * xo > sign * x or yo > y)
                        for j, (xo, yo) in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return sorted(out, key=lambda i: (points[i][0], points[i][1]))


def frontier_metric(results: dict[str, Any], primary: str) -> str:
    """autoattack where every row that has the primary metric has it too (an experiment whose AutoAttack is
    still running plots the primary metric for all rows rather than AutoAttack for a few), else the
    experiment's primary metric, else the robust accuracy measured on the most rows (a miniature's fgsm,
    say); the primary metric when there is none."""
    counts: dict[str, int] = {}
    for r in results["rows"]:
        for k in r["accuracy"]:
            if k != "clean" and (r["curve"] or r["row"]):
                counts[k] = counts.get(k, 0) + 1
    if "autoattack" in counts and counts["autoattack"] >= counts.get(primary, 0):
        return "autoattack"
    if primary in counts:
        return primary
    return max(sorted(counts), key=lambda k: counts[k]) if counts else primary


def _comparable(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in config.items() if k != "seed"}


def swept_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The settings that differ between these stage configs (a curve's knob), seed left out."""
    keys = set().union(*configs) - {"seed"} if configs else set()
    return sorted(k for k in keys if len({str(c.get(k)) for c in configs}) > 1)


def frontier_points(exp: Experiment, results: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One point per evaluated row: series (its curve, else its row), clean, robust, cost (total passes,
    None when unknown), stage, label (the knob's value along the curve), repeat (a second seed of a curve
    stage, drawn hollow in that curve's colour)."""
    configs = {st.name: st.config for st in exp.stages}
    pts = curve_points(results, metric)
    costs = {r["stage"]: total_passes(r.get("passes_per_image")) for r in results["rows"]}
    curves = {r["stage"]: r["curve"] for r in results["rows"] if r["curve"]}
    out: list[dict[str, Any]] = []
    for series, p in pts.items():
        for clean, robust, stage in p:
            repeat = ""
            if stage not in curves:  # a row of its own: a second seed of a curve stage?
                mine = _comparable(configs.get(stage, {}))
                repeat = next((s for s in curves if _comparable(configs.get(s, {})) == mine), "")
            out.append({"series": curves.get(repeat, series), "stage": stage, "clean": clean,
                        "robust": robust, "cost": costs.get(stage), "repeat_of": repeat, "label": ""})
    for series in {q["series"] for q in out}:
        mine = [q for q in out if q["series"] == series]
        keys = swept_keys([configs.get(q["stage"], {}) for q in mine if not q["repeat_of"]])
        for q in mine:
            c = configs.get(q["repeat_of"] or q["stage"], {})
            q["label"] = ",".join(str(c.get(k)) for k in keys)
            q["knob"] = ",".join(keys)
    return out


def fronts(points: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The stages on each Pareto front: 'clean' (clean vs robust), 'cost' (cost vs robust)."""
    clean = pareto_front([(q["clean"], q["robust"]) for q in points])
    priced = [q for q in points if q["cost"]]
    cost = pareto_front([(q["cost"], q["robust"]) for q in priced], lower_x_better=True)
    return {"clean": [points[i]["stage"] for i in clean], "cost": [priced[i]["stage"] for i in cost]}


def frontier_results(exp: Experiment, results: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of the frontier: metric, points, and the stages on each front."""
    metric = frontier_metric(results, exp.primary_metric)
    pts = frontier_points(exp, results, metric)
    return {"metric": metric, "points": pts, "fronts": fronts(pts) if pts else {"clean": [], "cost": []}}


def _fmt_cost(c: float | None) -> str:
    return "-" if c is None else f"{c:.3g}"


def frontier_markdown(exp: Experiment, results: dict[str, Any], column_name) -> str:
    """The ranking section of results.md: every curve's cost and best point, the most robust model at
    each training budget (the cost front), and the curves ranked at matched clean accuracy."""
    fr = frontier_results(exp, results)
    metric, pts = fr["metric"], fr["points"]
    if not pts:
        return ""
    name = column_name(metric)
    on_clean, on_cost = set(fr["fronts"]["clean"]), set(fr["fronts"]["cost"])
    lines = [
        "",
        f"## {name} per compute and per clean accuracy",
        "",
        f"Cost: passes per training image over the whole run, all networks (student, teacher, "
        f"discriminator; a double backward counted as {DOUBLE_BACKWARD_PASSES:g}); the teacher's own "
        "training is not counted. Pictures: frontier-clean.png and frontier-cost.png (Pareto fronts marked). "
        "Second seeds count as points of their curve.",
        "",
        f"| method | points | passes/img | best {name} | its clean | its setting | on the cost front | "
        "on the clean front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    series = sorted({q["series"] for q in pts},
                    key=lambda s: (min((q["cost"] or float("inf")) for q in pts if q["series"] == s), s))
    for s in series:
        mine = [q for q in pts if q["series"] == s]
        best = max(mine, key=lambda q: (q["robust"], q["clean"]))
        costs = sorted({_fmt_cost(q["cost"]) for q in mine})
        setting = f"{best['knob']}={best['label']}" if best.get("label") else "-"
        n_cost = sum(q["stage"] in on_cost for q in mine)
        n_clean = sum(q["stage"] in on_clean for q in mine)
        lines.append(f"| {s} | {len(mine)} | {'/'.join(costs)} | {best['robust']:.1f} | "
                     f"{best['clean']:.1f} | {setting} | {n_cost or '-'} | {n_clean or '-'} |")
    by_stage = {q["stage"]: q for q in pts}
    if fr["fronts"]["cost"]:
        lines += ["", "**At equal compute**: the most robust model trained with at most the given passes "
                  "per image (the cost Pareto front: a budget buys the last row at or below it).", "",
                  f"| passes/img at most | {name} | clean | method | stage |", "|---|---|---|---|---|"]
        for st in fr["fronts"]["cost"]:
            q = by_stage[st]
            lines.append(f"| {_fmt_cost(q['cost'])} | {q['robust']:.1f} | {q['clean']:.1f} | {q['series']} | "
                         f"`{st}` |")
    grid, matched = matched_clean(curve_points(results, metric))
    if matched:
        lines += ["", f"**At equal clean accuracy**: the curves (2+ points) ranked by {name} interpolated "
                  "along each curve (never extrapolated; seed-0 points only).", "",
                  "| clean | ranking |", "|---|---|"]
        for i, g in enumerate(grid):
            ranked = sorted(((v[i], k) for k, v in matched.items() if v[i] is not None), reverse=True)
            lines.append(f"| {g:g} | " + " > ".join(f"{k} {v:.1f}" for v, k in ranked) + " |")
    return "\n".join(lines) + "\n"


def plot_frontiers(exp: Experiment, results: dict[str, Any], out_dir: Path) -> list[Path]:
    """frontier-clean.png and frontier-cost.png in out_dir (the second only when runs recorded their
    passes); [] when no row has clean and robust accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fr = frontier_results(exp, results)
    metric, pts = fr["metric"], fr["points"]
    if not pts:
        return []
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors, *plt.get_cmap("Set1").colors]
    series = sorted({q["series"] for q in pts}, key=lambda s: (_family(s), s))
    families = sorted({_family(s) for s in series})
    # one colour per method; a smooth-activation student's curve dashed with square markers
    colors = {s: palette[families.index(_family(s)) % len(palette)] for s in series}
    configs = {st.name: st.config for st in exp.stages}
    smooth = {s: any(str(configs.get(q["stage"], {}).get("activation", "")).lower() in SMOOTH
                     for q in pts if q["series"] == s) for s in series}
    written = []
    for fname, xkey, front_key, xlabel in (
            (FRONTIER_FILES[0], "clean", "clean", "clean accuracy (%)"),
            (FRONTIER_FILES[1], "cost", "cost", "training cost: passes per training image (log scale)")):
        drawn = [q for q in pts if q[xkey] is not None]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(10.5, 6))
        for s in series:
            main = sorted((q for q in drawn if q["series"] == s and not q["repeat_of"]),
                          key=lambda q: (q[xkey], q["robust"]))
            extra = [q for q in drawn if q["series"] == s and q["repeat_of"]]
            marker = "s" if smooth[s] else "o"
            if main:
                ax.plot([q[xkey] for q in main], [q["robust"] for q in main], marker,
                        linestyle="--" if smooth[s] else "-", color=colors[s], label=s, markersize=6,
                        linewidth=1.3)
            if extra:
                ax.plot([q[xkey] for q in extra], [q["robust"] for q in extra], marker, color=colors[s],
                        markerfacecolor="none", markersize=7, linestyle="none",
                        label=None if main else s)
            for q in main:
                if q["label"]:
                    ax.annotate(q["label"], (q[xkey], q["robust"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=colors[s])
        front = [q for q in drawn if q["stage"] in set(fr["fronts"][front_key])]
        front.sort(key=lambda q: (q[xkey], q["robust"]))
        if front:
            ax.step([q[xkey] for q in front], [q["robust"] for q in front],
                    where="post" if xkey == "cost" else "pre", color="black", linestyle="--", linewidth=1,
                    alpha=0.7, label="Pareto front")
            ax.plot([q[xkey] for q in front], [q["robust"] for q in front], "o", markersize=13,
                    markerfacecolor="none", markeredgecolor="black", alpha=0.6)
        if xkey == "cost":
            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            ticks = [m * 10.0 ** k for k in decades for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
            if len(ticks) < 4:  # a narrow range: more of them
                ticks = [m * 10.0 ** k for k in decades for m in (1, 1.5, 2, 3, 5, 7)
                         if lo <= m * 10.0 ** k <= hi]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        knobs = sorted({q["knob"] for q in pts if q.get("knob")})
        note = (("points labelled by " + "; ".join(knobs) + "; " if knobs else "") + "hollow: second seed"
                + ("; dashed: smooth activation" if any(smooth.values()) else ""))
        ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="gray")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{column_name(metric)} accuracy (%)")
        what = "clean accuracy" if xkey == "clean" else "training cost"
        ax.set_title(f"{exp.name}: {column_name(metric)} accuracy vs {what}")
        mark_smoke_test(ax, exp)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        path = Path(out_dir) / fname
        write_figure(fig, path, dpi=120, format="png")
        plt.close(fig)
        written.append(path)
    return written
