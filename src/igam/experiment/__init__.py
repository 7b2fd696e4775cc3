"""`igam run EXPERIMENT.yaml`: a whole pipeline of stages (teacher, fine-tuning, students, baselines),
each a run, then the evaluation and the paper-format results table.

An experiment file:

    experiment: mnist-to-cifar10            # name; runs go to out_dir (default runs/<name>)
    defaults: {data_dir: ${IGAM_DATA}, seed: 0}   # keys for every stage
    stages:
      - name: teacher                       # the run directory is out_dir/teacher
        config: {method: pgd-at, dataset: mnist, model: madry-mnist}
      - name: teacher_ft
        config: {method: finetune, teacher: "{teacher}", dataset: cifar10, adapter: gray+crop28}
      - name: igam
        row: IGAM-MNIST                     # a row of the results table ...
        paper: {clean: 93.6, pgd20: 43.5}   # ... next to the paper's numbers
        curve: IGAM                         # a point of the robust-vs-clean trade-off plot
        sweep: {lambda_diff: [1, 3]}        # optional: one stage per value (igam-lambda_diff=1, ...)
        config: {method: igam, teacher: "{teacher_ft}", dataset: cifar10}
    evaluation:
      - {attacks: [clean, fgsm, pgd5, pgd10, pgd20], n: 1000}
      - {attacks: [pgd100x5, autoattack], n: 500, rows: [igam], checks: true}
    cluster:                                # optional: `igam run --executor slurm` (the command line wins)
      partition: gpu
      time: "8:00:00"                       # per job: minutes, H:M:S or D-H:M:S
      gpus_per_job: 1
      sbatch: {account: myproject, cpus-per-task: 8}   # further #SBATCH options

"{stage}" is replaced by that stage's run directory, ${VAR} by an environment variable. A stage whose run
finished with the same configuration is reused, so a rerun after a crash or an edit does only what is
left. results.md / results.json / tradeoff.png and the frontier pictures (frontier-clean.png,
frontier-cost.png: robust accuracy against clean accuracy and against passes per training image, Pareto
fronts marked; experiment/frontier.py) are written into out_dir.

`igam run --jobs N` runs up to N tasks (a stage's training, a stage's evaluation) at once as their inputs
become ready (experiment/scheduler.py), in local slots or, with `--executor slurm`, as SLURM jobs through
submitit (experiment/executors.py); experiment/stages.py holds the work of one stage, the same everywhere.
"""

from igam.experiment.costs import estimate_seconds
from igam.experiment.frontier import frontier_results, pareto_front, plot_frontiers, total_passes
from igam.experiment.results import collect_results, curve_points, matched_clean, results_markdown
from igam.experiment.runner import evaluate_experiment, format_plan, plan, run_experiment, write_results
from igam.experiment.scheduler import StagesFailed
from igam.experiment.spec import Experiment, Stage, load_experiment, resolve_stage, stage_status

__all__ = ["Experiment", "Stage", "StagesFailed", "collect_results", "curve_points", "estimate_seconds",
           "evaluate_experiment", "format_plan", "frontier_results", "load_experiment",
           "matched_clean", "pareto_front", "plan", "plot_frontiers", "resolve_stage", "results_markdown",
           "run_experiment", "stage_status", "total_passes", "write_results"]
