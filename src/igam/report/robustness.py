"""Robustness curves: accuracy against the L-inf radius eps, from RUN/robustness_curve.json (written by
`igam evaluate RUN --attacks ... --eps-sweep ...`). One line per attack (and the per-image worst case
over them), the worst class as a dotted line of the same colour, the large eps where accuracy must reach
about 0 as a grey vertical line; several runs overlay with one colour each.

    plot_robustness_curve(run)            # RUN/robustness_curve.png from RUN/robustness_curve.json
    robustness_figure({"igam": curve})    # a matplotlib Figure of curve dicts
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from igam.errors import IgamError
from igam.files import read_json_object
from igam.report.common import save_figure
from igam.runs import Run, resolve_run
from igam.units import eps_text

STYLES = ("-", "--", "-.", (0, (5, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P")


def read_curve(run: str | Path) -> dict[str, Any] | None:
    """A run's robustness_curve.json as a dict, or None when the run has none.

    Raises:
        IgamError: when the file is not valid JSON or holds no list of curves with points.
    """
    path = Run(resolve_run(run)).curve_path
    if not path.exists():
        return None
    curve = read_json_object(path)
    curves = curve.get("curves")

    def number(v: Any, optional: bool = False) -> bool:
        if v is None:
            return optional
        return (isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < 1e300
                and (isinstance(v, int) or math.isfinite(v)))

    def point_ok(p: Any) -> bool:
        return (isinstance(p, dict) and number(p.get("eps")) and number(p.get("accuracy"))
                and number(p.get("worst_class"), True)
                and isinstance(p.get("eps_text", ""), str | int | float))

    if not isinstance(curves, list) or not all(
            isinstance(c, dict) and isinstance(c.get("points"), list) and all(map(point_ok, c["points"]))
            for c in curves) or not number(curve.get("large_eps"), True):
        raise IgamError(f"'{path}' holds no robustness curves (a list under 'curves', each with 'points' of "
                        "finite numeric eps and accuracy); "
                        "write it again with `igam evaluate RUN --attacks pgd20 --eps-sweep ...`.")
    return curve


def robustness_figure(curves: dict[str, dict[str, Any]], title: str = "Robustness curves") -> Figure:
    """Accuracy (%) against eps of one or more runs' curve dicts (run label -> robustness_curve.json
    content). Attacks are told apart by line style and marker, runs by colour (a single run: colours by
    attack). Points are evenly spaced on the x axis and labelled with their eps, since sweeps are usually
    geometric (1/255, 2/255, 4/255, ...).

    Raises:
        IgamError: when no curve has a point.
    """
    import matplotlib as mpl

    lines = [(run, c) for run, data in curves.items() for c in data.get("curves", []) if c.get("points")]
    if not lines:
        raise IgamError("No robustness curve to draw: run `igam evaluate RUN --attacks pgd20 --eps-sweep "
                        "1/255,2/255,4/255,8/255,16/255` first.")
    texts: dict[float, str] = {}
    for _, c in lines:
        for p in c["points"]:
            texts.setdefault(float(p["eps"]), str(p.get("eps_text") or eps_text(float(p["eps"]))))
    all_eps = sorted(texts)
    pos = {e: i for i, e in enumerate(all_eps)}
    attacks = list(dict.fromkeys(str(c.get("attack")) for _, c in lines))
    runs = list(curves)
    many_runs = len(runs) > 1
    cmap = mpl.colormaps["tab10"]
    fig = Figure(figsize=(max(5.5, 0.75 * len(all_eps) + 3.0), 4.2), layout="constrained")
    ax = fig.subplots()
    dotted = False
    for run, c in lines:
        a = attacks.index(str(c.get("attack")))
        color = cmap((runs.index(run) if many_runs else a) % cmap.N)
        style = STYLES[a % len(STYLES)] if many_runs else "-"
        pts = sorted(c["points"], key=lambda p: float(p["eps"]))
        xs = [pos[float(p["eps"])] for p in pts]
        label = (f"{run}: " if many_runs else "") + str(c.get("label") or c.get("attack"))
        ax.plot(xs, [100 * float(p["accuracy"]) for p in pts], linestyle=style,
                marker=MARKERS[a % len(MARKERS)], ms=4.5, lw=1.8, color=color, label=label)
        worst = [(x, p["worst_class"]) for x, p in zip(xs, pts)
                 if isinstance(p.get("worst_class"), int | float)]
        if worst and not many_runs:
            ax.plot([x for x, _ in worst], [100 * float(w) for _, w in worst], ":", lw=1.2, color=color)
            dotted = True
    large = {float(d["large_eps"]) for d in curves.values() if isinstance(d.get("large_eps"), int | float)}
    for e in large:
        at = [pos[x] for x in all_eps if abs(x - e) <= 1e-9]  # drawn only when the sweep went that far
        if at:
            ax.axvline(at[0], color="#888888", lw=1, ls="--")
            ax.annotate("large eps: must reach ~0%", (at[0], 98), ha="right", va="top", fontsize=7.5,
                        color="#555555", rotation=90)
    ax.set_xticks(range(len(all_eps)), [texts[e] for e in all_eps])
    ax.set_xlabel(r"$\epsilon$ ($L_\infty$ radius, pixel units of [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if dotted:  # one entry for the dotted worst-class lines
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls=":", lw=1.2, color="#444444"))
        labels.append("worst class (dotted, same colour)")
    ax.legend(handles, labels, fontsize=7.5, frameon=False, loc="best")
    ns = sorted({str(d.get("n")) for d in curves.values()})
    if title:
        ax.set_title(f"{title} (n = {'/'.join(ns)} test images)", fontsize=10.5)
    return fig


def plot_robustness_curve(run: str | Path, path: str | Path | None = None, pdf: bool = False) -> Path:
    """Draw RUN/robustness_curve.json to `path` (default RUN/robustness_curve.png; a PDF beside it on
    request) and return the PNG's path.

    Raises:
        IgamError: when the run has no robustness_curve.json (evaluate it with --eps-sweep first).
    """
    run_obj = Run(resolve_run(run))
    curve = read_curve(run_obj.dir)
    if curve is None:
        raise IgamError(f"'{run_obj.dir}' has no {Run.CURVE}; write it with `igam evaluate {run_obj.dir} "
                        "--attacks pgd20 --eps-sweep 1/255,2/255,4/255,8/255,16/255`.")
    fig = robustness_figure({run_obj.name: curve}, title=f"Robustness curve: {run_obj.name}")
    return save_figure(fig, path or run_obj.curve_png_path, pdf=pdf)
