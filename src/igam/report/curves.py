"""Training curves from a run's logs (log.csv per logged step, eval_log.csv per evaluation): the
cross-entropy, the IGAM terms L_adv (eq. 14) and L_diff (eq. 13), the discriminator's loss and accuracy,
input-gradient statistics, and clean / robust test accuracy per epoch. Only columns present are drawn;
several runs overlay in one figure (one colour per run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from igam.errors import IgamError
from igam.report.common import run_labels, save_figure
from igam.runs import Run, read_log, resolve_run


@dataclass(frozen=True)
class Panel:
    title: str
    columns: tuple[str, ...]
    ylabel: str
    log_y: bool = False
    unit_range: bool = False  # accuracies: y in [0, 1]


# panels for the columns we know (log.csv; the same names in eval_log.csv are held-out values drawn with
# markers); any other numeric column gets a panel of its own
KNOWN = (
    Panel("Training cross-entropy", ("ce",), "loss"),
    Panel("Adversarial loss $L_{adv}$ (eq. 14)", ("l_adv",), "loss"),
    Panel(r"Gradient difference $L_{diff}$ (eq. 13)", ("l_diff",), "loss"),
    Panel("Discriminator loss", ("disc_loss",), "loss"),
    Panel("Discriminator accuracy", ("disc_acc_student", "disc_acc_teacher"), "accuracy", unit_range=True),
    Panel(r"Input-gradient alignment cos($J_s$, $J_t$)", ("cos_js_jt",), "cosine"),
    Panel(r"Input-gradient norms $\|J_s\|$, $\|J_t\|$", ("js_norm", "jt_norm"), "L2 norm", log_y=True),
    Panel(r"$\lambda_{diff}$ (weight of $L_{diff}$)", ("lambda_diff",), "weight", log_y=True),
    Panel("TRADES KL term", ("kl",), "KL"),
    Panel("Training accuracy (batch)", ("acc", "adv_acc"), "accuracy", unit_range=True),
    Panel("Parameter-gradient norm", ("grad_norm",), "L2 norm", log_y=True),
)
SKIP = {"step", "epoch", "lr", "images_per_s", "skipped_steps"}
LABELS = {"disc_acc_student": "on student gradients", "disc_acc_teacher": "on teacher gradients",
          "js_norm": r"$\|J_s\|$ student", "jt_norm": r"$\|J_t\|$ teacher", "clean_acc": "clean",
          "acc": "clean batch", "adv_acc": "adversarial batch", "cos_js_jt": "training batch"}


def series_label(col: str) -> str:
    """'pgd10_acc' -> 'PGD10', 'clean_acc' -> 'clean', 'eval:js_norm' -> '||J_s|| student (held-out)'."""
    if col.startswith("eval:"):
        inner = col[5:]
        if inner.endswith("acc"):
            return series_label(inner)
        base = series_label(inner).replace("training batch", "").strip()
        return f"{base} (held-out)" if base else "held-out"
    if col in LABELS:
        return LABELS[col]
    if col.endswith("_acc"):
        name = col[:-4]
        return name.upper() if name.startswith(("pgd", "fgsm", "aa", "cw")) else name.replace("_", " ")
    return col


def _numeric_columns(rows: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and k not in SKIP:
                cols[k] = None
    return list(cols)


def _series(rows: list[dict], col: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(col)
        if isinstance(v, float) and math.isfinite(v):
            xs.append(r["epoch"] if isinstance(r.get("epoch"), float) else r.get("step", len(xs)))
            ys.append(v)
    return xs, ys


def plan_panels(logs: list[list[dict]], evals: list[list[dict]]) -> list[Panel]:
    """The panels to draw for these runs' logs: known groups first (training values as lines, held-out
    values from eval_log.csv as markers), then leftover columns, then test accuracy per evaluation."""
    train: dict[str, None] = {}
    for rows in logs:
        train.update(dict.fromkeys(_numeric_columns(rows)))
    held: dict[str, None] = {}
    for rows in evals:
        held.update(dict.fromkeys(_numeric_columns(rows)))
    accs = [c for c in held if c.endswith("acc")]
    held_other = [c for c in held if c not in accs]
    panels = []
    for p in KNOWN:
        cols = (tuple(c for c in p.columns if c in train)
                + tuple("eval:" + c for c in p.columns if c in held_other))
        if cols:
            panels.append(Panel(p.title, cols, p.ylabel, p.log_y, p.unit_range))
    known = {c for p in KNOWN for c in p.columns}
    panels += [Panel(c, (c,), c, unit_range=c.endswith("acc")) for c in train if c not in known]
    panels += [Panel(f"{c} (held-out)", ("eval:" + c,), c) for c in held_other if c not in known]
    if accs:
        ordered = sorted(accs, key=lambda c: c != "clean_acc")  # clean first
        panels.append(Panel("Test accuracy per evaluation (clean / robust)",
                            tuple("eval:" + c for c in ordered), "accuracy", unit_range=True))
    return panels


def curves_figure(runs: list[str | Path] | dict[str, str | Path], title: str = "Training curves"):
    """A figure of every logged quantity of one or more runs (a list of run dirs or name -> run dir)."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    if isinstance(runs, dict):
        names, dirs = list(runs), [resolve_run(r) for r in runs.values()]
    else:
        dirs = [resolve_run(r) for r in runs]
        names = run_labels(dirs)
    if not dirs:
        raise IgamError("Give at least one run directory for training curves.")
    logs = [read_log(d, Run.LOG) for d in dirs]
    evals = [read_log(d, Run.EVAL_LOG) for d in dirs]
    panels = plan_panels(logs, evals)
    if not panels:
        raise IgamError(f"No training logs to plot: {', '.join(str(d) for d in dirs)} hold no log.csv or "
                        "eval_log.csv rows yet.")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_h = 0.35 + 0.22 * math.ceil(len(dirs) / 4) if len(dirs) > 1 else 0.0
    W, H = 4.6 * ncols, 3.2 * nrows + 0.55 + legend_h
    fig = Figure(figsize=(W, H), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.08, w_pad=0.08)
    cmap = mpl.colormaps["tab10" if len(dirs) <= 10 else "tab20"]
    styles = ["-", "--", ":", "-."]
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, panel in zip(axes, panels):
        many_cols = len(panel.columns) > 1
        for r, (name, rows, erows) in enumerate(zip(names, logs, evals)):
            for c, col in enumerate(panel.columns):
                src, key = (erows, col[5:]) if col.startswith("eval:") else (rows, col)
                xs, ys = _series(src, key)
                if not xs:
                    continue
                label_parts = ([name] if len(dirs) > 1 else []) + ([series_label(col)] if many_cols else [])
                ax.plot(xs, ys, styles[c % len(styles)], color=cmap(r % cmap.N), lw=1.5,
                        marker="o" if col.startswith("eval:") or len(xs) < 3 else None, ms=3.5,
                        label=": ".join(label_parts) or None)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        values = [float(y) for line in ax.get_lines() for y in line.get_ydata()]
        if panel.log_y and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        if panel.unit_range:
            lo = min([min(line.get_ydata()) for line in ax.get_lines()] or [0.0])
            ax.set_ylim(max(0.0, min(lo, 1.0) - 0.05), 1.02)
        if many_cols:
            ax.legend(fontsize=7.5, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if len(dirs) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=cmap(r % cmap.N), lw=2, label=name) for r, name in enumerate(names)]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(dirs)), fontsize=8.5,
                   frameon=False)
        for ax, panel in zip(axes, panels):
            if len(panel.columns) > 1:  # colour = run, line style = quantity: keep only the styles
                ax.legend(handles=[Line2D([], [], color="#444444", ls=styles[c % len(styles)],
                                          label=series_label(col))
                                   for c, col in enumerate(panel.columns)], fontsize=7.5, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12, weight="bold")
    return fig


def plot_curves(runs: list[str | Path] | dict[str, str | Path], path: str | Path, pdf: bool = False,
                title: str = "Training curves") -> Path:
    """Write the training curves of one or more runs as PNG (and PDF on request)."""
    return save_figure(curves_figure(runs, title), path, pdf=pdf)
