"""The `igam` command line: one small function per verb; no training logic lives here.

`split_argv` reads a command line once, in the typed order: the verb's own options (and positionals) go to
argparse, the configuration overrides (`key=value`, `--key value`) to the verb, as `cmd_VERB(args,
overrides)`."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from pathlib import Path

from igam.config import config_help, make_config, methods_help, parse_override_args
from igam.errors import IgamError

CONFIG_VERBS = {"train", "finetune", "transfer"}  # verbs whose every argument is a configuration key
OVERRIDE_VERBS = CONFIG_VERBS | {"run"}  # verbs that take configuration overrides (run: for every stage)
EPILOG_OVERRIDES = (
    "Any configuration key can be given as key=value or --key value, after an optional "
    "--config FILE.yaml; later values win. Unknown keys are errors."
)


def _config_from(args: argparse.Namespace, overrides: list[str], **forced):
    given = parse_override_args(overrides)
    given.update({k: v for k, v in forced.items() if k not in given})
    return make_config(args.config, given)


def _print_notes(cfg) -> None:
    """Settings the run would silently ignore or half-use (igam.config.config_notes), on stderr."""
    from igam.config import config_notes

    for note in config_notes(cfg):
        print(f"igam: note: {note}", file=sys.stderr)


def cmd_train(args, overrides) -> int:
    from igam.train import train

    cfg = _config_from(args, overrides)
    _print_notes(cfg)
    print(train(cfg))
    return 0


def cmd_finetune(args, overrides) -> int:
    from igam.train import train

    cfg = _config_from(args, overrides, method="finetune", epochs="10")
    if cfg.method != "finetune":
        raise IgamError("`igam finetune` always uses method=finetune; use `igam train` for other methods.")
    _print_notes(cfg)
    print(train(cfg))
    return 0


def cmd_transfer(args, overrides) -> int:
    from igam.train import train

    cfg = _config_from(args, overrides, method="igam")
    if cfg.method not in ("igam", "igr"):
        raise IgamError(f"`igam transfer` trains method=igam (or the igr control), not {cfg.method}.")
    _print_notes(cfg)
    print(train(cfg))
    return 0


def cmd_run(args, overrides) -> int:
    from igam.experiment import StagesFailed, run_experiment
    from igam.experiment.cluster import ClusterOptions, parse_gpus, parse_sbatch, parse_time

    given = parse_override_args(overrides)
    cluster = ClusterOptions(
        partition=args.partition,
        time=parse_time(args.time) if args.time is not None else None,
        gpus_per_job=parse_gpus(args.gpus_per_job) if args.gpus_per_job is not None else 0,
        sbatch=parse_sbatch(args.sbatch or []),
    )
    if args.executor != "slurm" and (args.partition or args.time or args.gpus_per_job or args.sbatch):
        raise IgamError("--partition, --time, --gpus-per-job and --sbatch are SLURM settings; add "
                        "--executor slurm (or drop them to run on this machine).")
    try:
        run_experiment(
            args.experiment,
            dry_run=args.dry_run,
            out_dir=args.out_dir,
            overrides=given,
            only=args.only.split(",") if args.only is not None else None,
            miniature=args.miniature,
            results_only=args.results_only,
            jobs=args.jobs,
            executor=args.executor,
            cluster=cluster,
            live=sys.stdout.isatty(),
        )
    except StagesFailed as e:
        print(f"igam run: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args, overrides) -> int:
    import igam.progress as progress
    from igam.api import benchmark, spec_folder
    from igam.attacks.checks import older_notes, warning_block
    from igam.attacks.checks import summary as check_summary
    from igam.attacks.presets import check_queries
    from igam.evaluate import evaluate_run, validate_attacks
    from igam.models import shipped
    from igam.records import record_notes
    from igam.summary import format_sweep_table, format_table, headline_lines, per_class_text, sweep_notes
    from igam.units import check_eps, eps_text

    attacks = [a.strip().lower() for a in args.attacks.split(",") if a.strip()]
    validate_attacks(attacks)
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            raise IgamError(f"--batch-size={args.batch_size!r}: give a number of images, or auto.") from None
    for key in ("n", "batch_size", "check_n", "check_queries"):
        if getattr(args, key) != "auto" and getattr(args, key) < 1:
            raise IgamError(f"--{key.replace('_', '-')}={getattr(args, key)} must be at least 1.")
    check_queries(args.check_queries, "--check-queries")
    if args.eps_sweep is not None and args.eps is not None:
        raise IgamError("Give --eps (one radius) or --eps-sweep (several), not both.")
    specs = [str(r) for r in args.runs if is_model_spec(str(r))]
    if specs and args.model_info:
        raise IgamError(f"--model-info describes run folders; {specs[0]} is not one (a shipped teacher's "
                        "certificate is in `igam info igam:NAME`). Drop --model-info for it.")
    rows, warnings, notes, curves = [], [], [], []
    log = progress.write
    for run in args.runs:
        common = dict(batch_size=args.batch_size, seed=args.seed, bn=args.bn, eps=args.eps,
                      checks=args.checks, check_n=args.check_n, check_queries=args.check_queries,
                      eps_sweep=args.eps_sweep, threads=args.threads, log=log, progress=not args.no_progress)
        if str(run) in specs:  # igam:NAME, robustbench:...: evaluated into runs/NAME (or --out-dir/NAME)
            folder = spec_folder(str(run), args.out_dir or "runs")
            result = benchmark(str(run), None, attacks=attacks, n=args.n, data_dir=args.data_dir, out=folder,
                               device=args.device, **common)
            res = {**result.records, "masking_checks": result.masking_checks,
                   **({"eps_sweep": result.eps_sweep} if result.eps_sweep is not None else {})}
            print(f"igam: {run}: results in {result.path}", file=sys.stderr)
            if str(run).startswith(shipped.PREFIX):
                cert = shipped.certificate(str(run))
                notes.append(f"{run}: its certificate: " + ", ".join(
                    f"{k} {100 * v:.2f}" for k, v in cert["accuracy"].items() if isinstance(v, int | float))
                    + f" (% on the first {cert['n']} test images, eps {eps_text(float(cert['eps']))})")
            label = str(run)
        else:
            res = evaluate_run(run, attacks, n=args.n, data_dir=args.data_dir, device=args.device,
                               **common)
            label = Path(run).name
        if args.model_info:
            from igam.report.modelinfo import write_model_info

            print(f"igam: {write_model_info(run)}", file=sys.stderr)
        label += " (train-mode BN)" if args.bn == "train" else ""
        records = {k: r for k, r in res.items() if k not in ("masking_checks", "eps_sweep")}
        notes += [f"{label}: {line}" for k, r in records.items() for line in record_notes(k, r)]
        if "eps_sweep" in res:
            from igam.report.robustness import plot_robustness_curve
            from igam.runs import Run

            curves.append((label, res["eps_sweep"]))
            if str(run) not in specs:
                print(f"igam: {Run(run).curve_path}, {plot_robustness_curve(run)}", file=sys.stderr)
            notes += [f"{label}: {line}" for line in sweep_notes(res["eps_sweep"])]
        else:
            rows.append((label, records))
            notes.append(f"{label}: per-class accuracy (mean over classes / worst class): " + "; ".join(
                per_class_text(a, r) for a, r in records.items()))
        mc = res["masking_checks"]
        notes.append(f"{label}: masking checks: {check_summary(mc['checks'])}")
        notes += [f"{label}: {line}" for line in older_notes(mc["checks"])]
        if mc["failed"]:
            warnings.append(warning_block(str(run), mc["checks"]))
    used = sorted({rec["n"] for _, res in rows for rec in res.values()} | {c["n"] for _, c in curves})
    images = (f"first {args.n} test images" if used == [args.n] else
              f"{'/'.join(map(str, used))} test images (all of the test set; --n {args.n} asked for more)")
    stale = sorted({f"{label}: status {rec['run_status']}" for label, res in rows for rec in res.values()
                    if rec.get("run_status")})
    if curves:
        print(format_sweep_table(curves))
    else:
        print(format_table(rows, list(dict.fromkeys(k for _, res in rows for k in res))))
    print(
        f"(accuracy in %, {images}, seed {args.seed}, BatchNorm {args.bn}"
        + (f", eps {eps_text(check_eps(args.eps))}" if args.eps else "")
        + ("; curves in RUN/robustness_curve.json and .png" if curves else "")
        + "; details in RUN/eval.json)"
    )
    for label, res in rows:  # the field's headline: per image, the worst case over the attacks run
        for line in headline_lines(label, res):
            print(line)
    for line in notes:
        print(f"note: {line}")
    for line in stale:
        print(f"WARNING: {line}: weights of an earlier finish, not of the latest training (see eval.json)")
    for w in warnings:
        print(w, file=sys.stderr)
    if warnings and args.strict:
        print(f"igam: {len(warnings)} run(s) failed gradient-masking or admission checks (--strict).",
              file=sys.stderr)
        return 1
    return 0


def is_model_spec(text: str) -> bool:
    """A model named rather than a run folder: igam:NAME or robustbench:... (a path of that name wins)."""
    return text.startswith(("igam:", "robustbench:")) and not Path(text).exists()


def cmd_info(args, overrides) -> int:
    from igam.files import read_json
    from igam.models import shipped
    from igam.records import read_eval
    from igam.runs import Run, resolve_run
    from igam.summary import certificate_text, eval_text, format_sweep_table

    def warn(text: str) -> None:
        print(text, file=sys.stderr)

    if str(args.run).startswith(shipped.PREFIX):  # a shipped teacher: its certificate
        cert = shipped.certificate(args.run)
        problem = shipped.weights_mismatch(args.run)  # the certificate holds only for the certified file
        print(json.dumps({**cert, "weights_match_certificate": not problem}, indent=2) if args.json else
              shipped.describe(cert) + "\n\n" + certificate_text(cert)
              + f"\n\nweights: {'MISMATCH' if problem else 'sha256 matches the certificate'}")
        if problem:
            raise IgamError(f"{problem} The certificate above describes the certified file, not this one.")
        return 0
    folder = Path(args.run)
    if folder.is_dir() and not (folder / Run.META).exists() and (folder / Run.EVAL).exists():
        ev = read_eval(folder, log=warn)  # `igam evaluate igam:NAME` keeps only eval.json
        print(json.dumps({"folder": str(folder), "eval": ev}, indent=2, default=str) if args.json
              else f"folder   {folder} (the evaluation of a model that is not a run)\n\n"
              + eval_text(ev, folder.name))
        return 0
    run_dir = resolve_run(args.run)
    out = {"run": str(run_dir), "meta": Run(run_dir).meta}  # checked: a damaged field is one clear error
    for name in (Run.METRICS, Run.EVAL, Run.CURVE):
        if (run_dir / name).exists():  # eval.json's damaged records are left out with a warning
            out[name[:-5]] = read_eval(run_dir, log=warn) if name == Run.EVAL else read_json(run_dir / name)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    meta = out["meta"]
    print(
        f"run      {run_dir}\nstatus   {meta.get('status')}\nmethod   {meta.get('method')}\n"
        f"model    {meta['model']['name']} ({meta['model']['num_classes']} classes, input "
        f"{meta['data'].get('shape')})\ndataset  {meta['data']['dataset']}\nseed     {meta.get('seed')}\n"
        f"version  {meta.get('version')} (git {str(meta.get('git_commit'))[:10]}, "
        f"torch {meta.get('torch')})"
    )
    if meta.get("teacher"):
        print(f"teacher  {meta['teacher']}")
    if meta.get("adapter"):
        print(f"adapter  {meta['adapter']}")
    if meta.get("passes_per_image"):
        from igam.experiment.results import format_passes

        print(f"cost     {format_passes(meta['passes_per_image'])} passes per training image (forward/"
              f"backward[/double]: S student, T teacher, D discriminator)"
              + (f", {meta['train_time_s']} s" if meta.get("train_time_s") else ""))
    final = (out.get("metrics") or {}).get("final") or {}
    if final:
        print("training " + ", ".join(
            f"{k} {100 * v:.2f}%" if k.endswith("_acc") and isinstance(v, int | float) else
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
            + " (the last evaluation during training)")
    print("\n" + eval_text(out.get("eval") or {}, run_dir.name))
    if isinstance(out.get("robustness_curve"), dict):
        print("\nrobustness curve (the latest --eps-sweep):\n"
              + format_sweep_table([(run_dir.name, out["robustness_curve"])]))
    print(f"\n(every field: igam info {args.run} --json)")
    return 0


def cmd_models(args, overrides) -> int:
    """`igam models`: the zoo, the library prefixes, and RobustBench's teachers where its extra is there."""
    from igam.models import describe_models, robustbench_zoo, shipped

    print("Architectures (model=NAME; width=W scales a zoo model's channels; parameters at the default "
          "width for 10 classes, 1x28x28 inputs for madry-mnist, else 3x32x32):")
    print("\n".join(f"  {line}" for line in describe_models()))
    print("\nShipped teachers (teacher=igam:NAME; offline, certificate in `igam info igam:NAME`):")
    print("\n".join(f"  {shipped.describe(shipped.certificate(n))}" for n in shipped.list_shipped())
          or "  none")
    names = robustbench_zoo.list_robustbench("cifar10", "Linf")
    if names:
        print(f"\nRobustBench teachers (teacher=robustbench:DATASET/THREAT/NAME; cifar10/Linf has "
              f"{len(names)}, also cifar100, imagenet and L2, corruptions):")
        print("\n".join(f"  robustbench:cifar10/Linf/{n}" for n in names))
    else:
        print("\nRobustBench teachers: pip install 'igam[robustbench]' to list and load them.")
    return 0


def cmd_demo(args, overrides) -> int:
    from igam.demo import demo

    demo(out_dir=args.out_dir, data_dir=args.data_dir, quick=args.quick)
    return 0


def _print_outputs(path, pdf: bool) -> int:
    """Print where a picture went (and its PDF twin)."""
    print(path)
    if pdf:
        print(path.with_suffix(".pdf"))
    return 0


def cmd_gradients(args, overrides) -> int:
    from igam.report.gradients import plot_run_gradients

    if args.n < 1:
        raise IgamError(f"--n={args.n}: show at least 1 test image.")
    path = plot_run_gradients(
        args.runs,
        out=args.out,
        n=args.n,
        seed=args.seed,
        data_dir=args.data_dir,
        pdf=args.pdf,
        device=args.device,
        percentile=args.percentile,
    )
    return _print_outputs(path, args.pdf)


def cmd_landscape(args, overrides) -> int:
    from igam.report.landscape import plot_run_landscape

    if args.grid < 2:
        raise IgamError(f"--grid={args.grid}: the grid needs at least 2 points per axis (21 is the default).")
    path = plot_run_landscape(
        args.runs,
        args.index,
        eps=args.eps,
        n=args.grid,
        out=args.out,
        pdf=args.pdf,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device,
    )
    return _print_outputs(path, args.pdf)


def cmd_report(args, overrides) -> int:
    from igam.report.common import MAX_FIGURE_IMAGES
    from igam.report.html import write_report

    if args.n < 1:
        raise IgamError(f"--n={args.n}: show at least 1 test image in the gradient grid.")
    if args.n > MAX_FIGURE_IMAGES:
        raise IgamError(f"--n={args.n}: the gradient grid shows one image per row, and more than "
                        f"{MAX_FIGURE_IMAGES} rows cannot be read; give --n {MAX_FIGURE_IMAGES} or fewer.")
    print(
        write_report(
            args.path,
            args.out,
            n=args.n,
            seed=args.seed,
            data_dir=args.data_dir,
            device=args.device,
            gradients=not args.no_gradients,
            landscape_index=args.landscape,
            log=lambda s: print(s, file=sys.stderr),
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="igam",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transfer adversarial robustness from a robust teacher to a student of another task by "
        "matching input gradients (IGAM, Chan, Tay & Ong, CVPR 2020).",
        epilog="Start with `igam demo`. Every verb has --help.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    p.verbs = {}  # type: ignore[attr-defined]

    def verb(name, fn, help, config=False, epilog="", description=""):
        sp = sub.add_parser(
            name,
            help=help,
            description=description or help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        p.verbs[name] = sp  # type: ignore[attr-defined]
        if config:
            sp.add_argument("--config", metavar="FILE.yaml", help="YAML file of configuration keys")
            # named for --help; split_argv hands the overrides to the verb itself, in the typed order
            sp.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
        return sp

    verb(
        "train",
        cmd_train,
        "Train a model with any registered method (method=...; the list below).",
        config=True,
        epilog=EPILOG_OVERRIDES + "\n\nExamples:\n  igam train dataset=mnist model=madry-mnist "
        "epochs=2 --data-dir ../shared/data\n"
        "  igam train --config experiments/configs/mnist-teacher.yaml seed=1\n"
        "  igam train method=igr lambda_diff=1 activation=gelu dataset=cifar10\n\n"
        + methods_help() + "\n\n" + config_help(),
    )

    verb(
        "finetune",
        cmd_finetune,
        "Fine-tune a robust teacher on the target task (paper 4.1, eq. 6): freeze "
        "it, train a new logit layer (and a learned adapter) on natural target images; "
        "finetune_layers=last-K|all trains more of it (transfer through weights).",
        config=True,
        epilog="method=finetune, epochs=10 and Adam at finetune_lr are defaults. With epochs=100 the result "
        "is the paper's FT-<source> baseline.\n\nExample:\n  igam finetune "
        "teacher=runs/pgd-at-madry-mnist-mnist-s0 dataset=cifar10 adapter=gray+crop28 epochs=10 "
        "--data-dir ../shared/data\n\n" + EPILOG_OVERRIDES + " (`igam train --help` lists every key.)\n\n"
        + config_help(("run", "data", "optim", "teacher", "finetune", "eval", "log")),
    )
    verb(
        "transfer",
        cmd_transfer,
        "Train a student with IGAM (paper 4.2, eqs. 7-14) from a fine-tuned teacher.",
        config=True,
        epilog="method=igam is the default, method=igr the J_t = 0 control.\n\nExample:\n"
        "  igam transfer teacher=runs/finetune-... dataset=cifar10 model=resnet20 lambda_adv=1 "
        "lambda_diff=auto epochs=5\n\n" + EPILOG_OVERRIDES + " (`igam train --help` lists every key.)\n\n"
        + config_help(("run", "data", "model", "optim", "teacher", "igam", "eval", "log")),
    )
    r = verb(
        "run",
        cmd_run,
        "Run a whole experiment file: teacher, fine-tuning, students, baselines, evaluation, "
        "results.md (paper-format table), trade-off plot and report. Finished stages are reused.",
        epilog="The file format is described in igam/experiment/__init__.py and docs/EXPERIMENTS.md.\n"
        "Ready files: experiments/paper/*.yaml (the paper's tables, GPU scale), experiments/cpu/*.yaml.\n\n"
        "Examples:\n  igam run experiments/cpu/mnist-to-cifar10.yaml --dry-run\n"
        "  igam run experiments/paper/table1-mnist-to-cifar10.yaml data_dir=/data seed=1\n"
        "  igam run experiments/cpu/animals-to-vehicles.yaml --jobs 2          # two stages at once\n"
        "  igam run experiments/paper/table3-to-cifar100.yaml --executor slurm --partition gpu \\\n"
        "      --time 8:00:00 --gpus-per-job 1 --sbatch cpus-per-task=8\n\n"
        "A stage that fails does not stop the stages that do not need it; the exit status is 1 when any\n"
        "failed (the summary names them and their logs), and rerunning the same command retries them.\n"
        "Ctrl-C stops the local slots or cancels the SLURM jobs it submitted, and says which.\n"
        "docs/DISTRIBUTED.md compares this with torchrun (one stage on many GPUs).",
    )
    r.add_argument("experiment", metavar="EXPERIMENT.yaml")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="keys applied to every stage")  # --help
    r.add_argument("--dry-run", action="store_true", help="print the plan with estimated costs, run nothing")
    r.add_argument("--out-dir", default=None, help="where the stages' runs go (default: the file's out_dir)")
    r.add_argument("--only", default=None,
                   help="comma-separated stage names to run (others skipped); a sweep's points and second "
                   "seeds are stages of their own (e.g. igam-lambda_diff_auto=7, igam-seed=1; see --dry-run)")
    r.add_argument(
        "--miniature",
        action="store_true",
        help="smoke-test the pipeline in seconds: tiny synthetic "
        "stand-ins of every dataset (same shapes), width-4 models, a few steps, cheap attacks",
    )
    r.add_argument("--jobs", default=None, metavar="N|auto",
                   help="run up to N stages (trainings and evaluations) at once as their inputs become "
                   "ready; default 1: one after another in this process. Local slots get cores // N torch "
                   "threads each (unless a stage sets threads), or one GPU each (CUDA_VISIBLE_DEVICES); "
                   "auto: one per GPU (1 without GPUs). With --executor slurm: at most N jobs queued or "
                   "running (default: every ready stage)")
    r.add_argument("--executor", default="local", metavar="local|slurm",
                   help="local (this machine, default) or slurm: one SLURM job per task through submitit, "
                   "per-job logs in each stage's jobs/ folder")
    r.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's, or the file's "
                   "cluster: block)")
    r.add_argument("--time", default=None, metavar="LIMIT",
                   help="SLURM time limit per job: minutes, HOURS:MINUTES:SECONDS or "
                   "DAYS-HOURS:MINUTES:SECONDS")
    r.add_argument("--gpus-per-job", default=None, metavar="G", help="GPUs per SLURM job (default 0)")
    r.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE",
                   help="another #SBATCH option, repeatable: --sbatch account=proj --sbatch cpus-per-task=8 "
                   "--sbatch exclusive (a bare KEY is a flag)")
    r.add_argument(
        "--results-only",
        action="store_true",
        help="train and evaluate nothing: rebuild results.md/json, the pictures (tradeoff.png when a row "
        "has PGD, frontier-clean.png / frontier-cost.png when rows have curves) and report.html from the "
        "evaluations already made; an error when no stage has run yet",
    )
    ev = verb(
        "evaluate",
        cmd_evaluate,
        "Evaluate runs under attacks; writes RUN/eval.json and prints a table.",
        description="Evaluate runs under attacks; writes RUN/eval.json and prints a table. Every option can "
        "also be written key=value: `attacks=clean,pgd20 n=1000` is `--attacks clean,pgd20 --n 1000` (a "
        "switch: checks=true).",
        epilog="Examples:\n"
        "  igam evaluate runs/igam_student --attacks clean,pgd20,autoattack --n 1000\n"
        "  igam evaluate runs/igam_student attacks=clean,pgd20,autoattack n=1000   # the same, as key=value\n"
        "  igam evaluate runs/standard runs/igam_student --attacks clean,fgsm,pgd20 --n 1000 --checks "
        "--strict\n"
        "  igam evaluate runs/igam_student --attacks pgd20 --eps-sweep 2/255,4/255,8/255,large --n 500\n\n"
        "With two or more attacks at one radius, a `headline:` line gives the accuracy under the worst of "
        "them per image. `igam info RUN` prints eval.json.",
    )
    ev.add_argument("runs", nargs="+", metavar="RUN",
                    help="run directories, or models named as teachers are: igam:NAME (a shipped teacher: "
                    "re-check its certificate), robustbench:DATASET/THREAT/NAME; their eval.json goes to "
                    "--out-dir/NAME")
    ev.add_argument(
        "--attacks",
        default="clean",
        help="comma-separated: clean, fgsm, pgdK (pgd5/7/10/20/40/50/100), pgdKxR (R restarts), "
        "pgdK-cw (margin loss), pgdK-fixed (the paper's fixed step), square, squareQ (Q queries); AutoAttack "
        "through the reference implementation (pyautoattack): autoattack (standard version), "
        "autoattack-plus, autoattack-rand, and its components apgd-ce, apgd-dlr, apgd-t, fab, fab-t, "
        "aa-square. Defaults: eps 0.3 on 1x28x28 data, 8/255 otherwise; PGD-K step max(2.5 eps / K, "
        "s * eps / eps0) with the fixed step s = 0.01 at eps0 = 0.3 (1x28x28) or 2/255 at 8/255, so PGD-K "
        "reaches the boundary",
    )
    ev.add_argument("--n", type=int, default=10000, help="number of test images (first n)")
    ev.add_argument("--batch-size", default="500",
                    help="images per attack batch, or auto: the largest that fits in GPU memory (500 on a "
                    "CPU)")
    ev.add_argument(
        "--eps",
        default=None,
        help="L-inf radius, e.g. 0.3 or 8/255 (default: the dataset's); the PGD step keeps its ratio to eps",
    )
    ev.add_argument(
        "--eps-sweep",
        default=None,
        help="robustness curve: run every attack of --attacks at each of these radii, e.g. "
        "1/255,2/255,4/255,8/255,16/255 (`large`: 0.5 on MNIST-like inputs, 64/255 otherwise, where accuracy "
        "must reach about 0; --checks adds it); writes RUN/robustness_curve.json and .png and prints the "
        "accuracy per radius (instead of --eps)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of random starts")
    ev.add_argument(
        "--bn",
        choices=["eval", "train"],
        default="eval",
        help="BatchNorm mode: eval, or train to reproduce the official evaluation (labelled)",
    )
    ev.add_argument(
        "--checks",
        action="store_true",
        help="also run the gradient-masking sweeps (FGSM, PGD step and eps sweeps, PGD at a "
        "large eps, Square) on the first --check-n images (RobustBench's admission checks, a deterministic "
        "forward and no optimisation at inference, run on every evaluation)",
    )
    ev.add_argument("--check-n", type=int, default=500, help="images used by the --checks sweeps")
    ev.add_argument(
        "--check-queries", type=int, default=1000, help="queries of the Square attack of --checks"
    )
    ev.add_argument("--strict", action="store_true",
                    help="exit with status 1 when a masking or admission check fails")
    ev.add_argument("--model-info", action="store_true",
                    help="also write RUN/model_info.json, RobustBench's model-info record (clean_acc, "
                    "reported, autoattack_acc, eps, architecture, ...)")
    ev.add_argument("--out-dir", default=None,
                    help="where igam:NAME and robustbench: models keep their eval.json (default: runs, as "
                    "runs/igam-NAME)")
    ev.add_argument("--data-dir", default=None, help="data root (default: the run's own, else $IGAM_DATA)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ev.add_argument("--no-progress", action="store_true",
                    help="no progress bars on stderr (progress=false is the same)")
    ev.usage = (ev.format_usage().removeprefix("usage: ").rstrip()
                + "\n       igam evaluate RUN [RUN ...] [attacks=A,B,...] [n=N] [key=value ...]")

    info = verb("info", cmd_info, "Print a run's metadata, metrics and evaluation results.")
    info.add_argument("run", metavar="RUN")
    info.add_argument("--json", action="store_true", help="print everything as JSON")

    verb("models", cmd_models, "List the architectures igam can create by name.")

    d = verb("demo", cmd_demo, "The main job: a small real robustness transfer, end to end, on CPU.")
    d.add_argument("--out-dir", default="runs/demo", help="where the demo's runs and report go")
    d.add_argument(
        "--data-dir",
        default=None,
        help="data root with mnist.npz / cifar10.npz (default: "
        "$IGAM_DATA, else ./data; synthetic data when absent)",
    )
    d.add_argument("--quick", action="store_true", help="a reduced run for tests (seconds, not minutes)")

    g = verb(
        "gradients",
        cmd_gradients,
        "Draw input gradients of runs side by side (paper Figs. 1, 4): test "
        "images, then each run's d CE / d input.",
        epilog="Example:\n  igam gradients runs/standard runs/igam --n 8 --out gradients.png --pdf",
    )
    g.add_argument("runs", nargs="+", metavar="RUN", help="run directories (all with the same input shape)")
    g.add_argument("--n", type=int, default=8, help="number of test images (rows)")
    g.add_argument(
        "--out",
        default=None,
        help="PNG file (default: RUN/gradients.png, or ./gradients.png for several runs)",
    )
    g.add_argument("--pdf", action="store_true", help="also write a PDF beside the PNG")
    g.add_argument("--seed", type=int, default=0, help="seed of the random choice of test images")
    g.add_argument(
        "--percentile",
        type=float,
        default=99.0,
        help="per-image scale: this percentile of |gradient| maps to full colour (100: max)",
    )
    g.add_argument("--data-dir", default=None, help="data root (default: the run's own, else $IGAM_DATA)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")

    ls = verb(
        "landscape",
        cmd_landscape,
        "Plot the loss surface and decision regions around one test image "
        "along the adversarial and a random direction (paper Fig. 7).",
        epilog="Example:\n  igam landscape runs/igam --index 53 --eps 16/255\n  igam landscape "
        "runs/standard runs/igam --index 53 --out fig7.png   # one column per run",
    )
    ls.add_argument("runs", nargs="+", metavar="RUN", help="run directories (one column each)")
    ls.add_argument("--index", type=int, required=True, help="test image index")
    ls.add_argument(
        "--eps",
        default=None,
        help="half-width of the plotted square, e.g. 0.6 or 16/255 "
        "(default: twice the dataset's eps: 0.6 for 1x28x28 inputs, 16/255 otherwise)",
    )
    ls.add_argument("--grid", type=int, default=21, help="grid points per axis")
    ls.add_argument("--out", default=None, help="PNG file (default: RUN/landscape-INDEX.png)")
    ls.add_argument("--pdf", action="store_true", help="also write a PDF beside the PNG")
    ls.add_argument("--seed", type=int, default=0, help="seed of the random direction")
    ls.add_argument("--data-dir", default=None, help="data root (default: the run's own, else $IGAM_DATA)")
    ls.add_argument("--device", default="cpu")
    ls.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")

    rp = verb(
        "report",
        cmd_report,
        "Write one self-contained HTML report of a run or of an experiment "
        "directory (runs as subdirectories): tables, training curves, input gradients.",
        epilog="Example:\n  igam report runs/igam\n  igam report runs/cpu-experiment --out report.html",
    )
    rp.add_argument("path", metavar="RUN|EXPERIMENT_DIR", help="a run directory or a directory of runs")
    rp.add_argument("--out", default=None, help="HTML file (default: PATH/report.html)")
    rp.add_argument("--n", type=int, default=8, help="test images in the gradient grid")
    rp.add_argument("--seed", type=int, default=0, help="seed of the random choice of test images")
    rp.add_argument(
        "--no-gradients", action="store_true", help="leave out the gradient grid (then no dataset is needed)"
    )
    rp.add_argument(
        "--landscape",
        type=int,
        default=None,
        metavar="INDEX",
        help="also plot the loss landscape around this test image (single runs)",
    )
    rp.add_argument("--data-dir", default=None, help="data root (default: the run's own, else $IGAM_DATA)")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    for name, sp in p.verbs.items():  # type: ignore[attr-defined]
        # the verbs with classic options read key=value too (split_argv): say so where the help does not
        opts = [(o, a.nargs == 0) for a in sp._actions for o in a.option_strings
                if o.startswith("--") and o != "--help"]
        if name in OVERRIDE_VERBS or not opts or "key=value" in (sp.description or ""):
            continue
        flag, switch = next(((o, sw) for o, sw in opts if not sw), opts[0])
        key = flag.removeprefix("--").replace("-", "_")
        example = f"{key}=true is {flag}" if switch else f"{key}=VALUE is {flag} VALUE"
        sp.description = f"{sp.description} Every option can also be written key=value ({example})."
    return p


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # a value, not an option (as argparse reads it)
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")  # the key of a key=value override (not a path with a '=')


def _option(sp: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    """The verb's option that `token` names as argparse reads it: exactly (`--n`, `-h`), as `--n=8`, or as
    the beginning of --long options (`--att` is --attacks; an ambiguous one, `--o` on `igam run`, names one
    of them and argparse refuses it). None when it names none."""
    actions = sp._option_string_actions
    if token in actions:
        return actions[token]
    if not token.startswith("--") or token == "--":
        return None
    name = token.partition("=")[0]
    hits = [actions[name]] if name in actions else [a for o, a in actions.items() if o.startswith(name)]
    return hits[0] if hits else None


def _option_like(token: str) -> bool:
    """Whether argparse reads `token` as an option rather than a value (a negative number, `-` and a token
    with a space are values)."""
    return token.startswith("-") and token != "-" and not NEGATIVE_NUMBER.match(token) and " " not in token


def _flag(sp: argparse.ArgumentParser, token: str) -> list[str] | None:
    """On a verb with classic options, `key=value` is `--key value` when --key is one of its options ('-' and
    '_' alike): `igam evaluate RUN attacks=clean,pgd20 n=100` works like the flags. A switch is key=true or
    key=false (`progress=false` is --no-progress). None when `token` is no such key=value.

    Raises:
        IgamError: a switch given a value other than true/false (1/0, yes/no, on/off).
    """
    key, eq, value = token.partition("=")
    if not eq or token.startswith("-"):
        return None
    options = {o.lstrip("-").replace("-", "_"): (o, a) for a in sp._actions for o in a.option_strings
               if o.startswith("--")}
    found, negated = options.get(key.replace("-", "_")), options.get("no_" + key.replace("-", "_"))
    flag = value.strip().lower()
    if found is None and negated is not None and negated[1].nargs == 0:  # progress=false: --no-progress
        if flag not in TRUE + FALSE:
            raise IgamError(f"{key}={value!r}: write {key}=true or {key}=false.")
        return [] if flag in TRUE else [negated[0]]
    if found is None:
        return None
    opt, action = found
    if action.nargs != 0:
        return [opt, value]
    if flag not in TRUE + FALSE:  # a switch: key=true turns it on, key=false leaves it off
        raise IgamError(f"{key}={value!r}: {opt} is a switch; write {key}=true or {key}=false.")
    return [opt] if flag in TRUE else []


def split_argv(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, list[str], list[str]]:
    """`igam VERB TOKENS...` read once, in the typed order, before argparse sees it: (VERB, what the verb's
    parser reads: its own options with their values, then its positionals, the configuration overrides).

    One grammar on every verb, in any order. A token naming one of the verb's options (`_option`) is that
    option, with the next token as its value when it takes one. On train, finetune, transfer and run every
    other token is an override, read later by `igam.config.parse_override_args` (`key=value`, `--key value`,
    `--key=value`, a bare `--key` for true), except run's EXPERIMENT.yaml: its first token that is neither.
    On the other verbs `key=value` is the option --key (`_flag`), other tokens are positionals (RUN ...),
    and an option the verb does not have, or a positional beyond those it takes, is returned among the
    overrides, which those verbs refuse. After `--`, no token is an option of the verb.

    Raises:
        IgamError: a switch written key=VALUE with a VALUE that is not true or false.
    """
    verb, tokens = argv[0], argv[1:]
    sp = parser.verbs[verb]  # type: ignore[attr-defined]
    takes_overrides = verb in OVERRIDE_VERBS
    room = sum(1 if a.nargs in (None, "?") else len(tokens) for a in sp._actions  # positionals it takes
               if not a.option_strings and a.dest != "overrides")
    options: list[str] = []
    positionals: list[str] = []
    overrides: list[str] = []
    ended = False  # after `--`
    i = 0
    while i < len(tokens):
        t, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        i += 1
        action = None if ended else _option(sp, t)
        flag = None if ended or takes_overrides or action is not None else _flag(sp, t)
        if t == "--" and not ended:  # what follows is never an option of the verb
            ended = True
        elif action is not None:  # one of the verb's options, with its value
            options.append(t)
            if (action.nargs != 0 and "=" not in t and nxt is not None and not _option_like(nxt)
                    and (takes_overrides or _flag(sp, nxt) is None)):
                options.append(nxt)
                i += 1
        elif flag is not None:  # evaluate RUN n=100: --n 100
            options += flag
        elif takes_overrides and (t.startswith("--") or "=" in t and KEY.fullmatch(t.partition("=")[0])):
            overrides.append(t)
            if (t.startswith("--") and "=" not in t and nxt is not None and not nxt.startswith("--")
                    and "=" not in nxt and (ended or _option(sp, nxt) is None)):
                overrides.append(nxt)  # --key value
                i += 1
        elif room and (ended or not _option_like(t)):  # RUN ..., run's EXPERIMENT.yaml
            positionals.append(t)
            room -= 1
        else:  # a bad override (refused by parse_override_args), or what this verb does not take
            overrides.append(t)
    return verb, options + (["--", *positionals] if positionals else []), overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] not in parser.verbs:  # type: ignore[attr-defined]
        if _option(parser, argv[0]) is not None or not _option_like(argv[0]):
            parser.parse_args(argv[:1])  # --help, or argparse's error naming the verbs
        parser.print_help()
        return 2
    try:
        verb, own, overrides = split_argv(parser, argv)
    except IgamError as e:
        print(f"igam: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args([verb, *own])
    try:
        if overrides and verb not in OVERRIDE_VERBS:
            raise IgamError(f"`igam {verb}` does not take {' '.join(overrides)!r}; see `igam {verb} --help`.")
        if isinstance(getattr(args, "device", None), str):  # evaluate, gradients, landscape, report
            from igam.utils import resolve_device

            resolve_device(args.device)
        threads = getattr(args, "threads", 0) if args.verb not in CONFIG_VERBS else 0
        if threads is not None and threads < 0:
            raise IgamError(f"--threads={threads} must not be negative (0: torch's default).")
        from igam.utils import torch_threads

        with torch_threads(threads or 0):  # the verbs that compute outside a training run
            return int(args.fn(args, overrides) or 0)
    except IgamError as e:
        print(f"igam: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`igam models | head`): nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush of stdout does not fail again
        return 1
    except OSError as e:  # the environment, not the input: a full disk, permissions, a vanished file
        where = f" ('{str(e.filename)[:300]}')" if e.filename else ""
        trains = verb in OVERRIDE_VERBS | {"demo"}
        if e.errno == errno.ENAMETOOLONG:
            print(f"igam: error: {e.strerror}{where}: use a shorter path.", file=sys.stderr)
            return 2
        print(
            f"igam: error: {e.strerror or e}{where}. Free disk space or fix permissions"
            + ("; an interrupted training run continues with resume=true." if trains else
               ", then run the same command again."),
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        hint = ("rerun the same `igam run` command to resume: finished stages and evaluations are reused"
                if verb == "run" else "resume a training run with resume=true")
        print(f"igam: interrupted; {hint}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
