"""Pictures and reports: input-gradient grids (paper Figs. 1, 4, 6), loss landscapes and decision
regions (Fig. 7), training curves, and a self-contained HTML report of a run or an experiment.

    gradient_grid(models, x, y, class_names, path)   # any nn.Modules taking [0,1] NCHW
    plot_run_gradients([run, ...], out)              # `igam gradients`
    plot_run_landscape([run], index, eps, out=...)   # `igam landscape`
    plot_curves([run, ...], path)                    # training curves from log.csv / eval_log.csv
    plot_robustness_curve(run)                       # accuracy vs eps from `igam evaluate --eps-sweep`
    write_report(run_or_experiment_dir, out)         # `igam report`

Matplotlib runs headless (Agg); figures are plain `matplotlib.figure.Figure` objects, never pyplot.
"""

from __future__ import annotations

from igam.report.curves import curves_figure, plot_curves
from igam.report.gradients import (
    gradient_figure,
    gradient_grid,
    input_gradients,
    plot_run_gradients,
    run_gradient_figure,
    scale_gradients,
)
from igam.report.html import write_report
from igam.report.landscape import (
    Landscape,
    landscape_figure,
    loss_landscape,
    plot_run_landscape,
    run_landscapes,
)
from igam.report.robustness import plot_robustness_curve, robustness_figure

__all__ = ["Landscape", "curves_figure", "gradient_figure", "gradient_grid", "input_gradients",
           "landscape_figure", "loss_landscape", "plot_curves", "plot_robustness_curve", "plot_run_gradients",
           "plot_run_landscape", "robustness_figure", "run_gradient_figure", "run_landscapes",
           "scale_gradients", "write_report"]
