"""The `igam` command line: one small function per verb; no training logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from igam.config import config_help, make_config, parse_override_args
from igam.errors import IgamError

EPILOG_OVERRIDES = ("Any configuration key can be given as key=value or --key value, after an optional "
                    "--config FILE.yaml; later values win. Unknown keys are errors.")


def _config_from(args: argparse.Namespace, extra: list[str], **forced):
    overrides = parse_override_args(list(args.overrides or []) + list(extra))
    overrides.update({k: v for k, v in forced.items() if k not in overrides})
    return make_config(args.config, overrides)


def cmd_train(args, extra) -> int:
    from igam.train import train

    cfg = _config_from(args, extra)
    print(train(cfg))
    return 0


def cmd_evaluate(args, extra) -> int:
    from igam.evaluate import evaluate_run

    if extra:
        raise IgamError(f"Unexpected arguments {extra}; see `igam evaluate --help`.")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    rows = []
    for run in args.runs:
        res = evaluate_run(run, attacks, n=args.n, batch_size=args.batch_size, seed=args.seed, bn=args.bn,
                           data_dir=args.data_dir, device=args.device)
        rows.append((Path(run).name, res))
    print(format_table(rows, attacks))
    return 0


def format_table(rows, attacks) -> str:
    head = "| Model | " + " | ".join(a.upper() if a.startswith("pgd") or a == "fgsm" else a.capitalize()
                                       for a in attacks) + " |"
    lines = [head, "|" + "---|" * (len(attacks) + 1)]
    for name, res in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * res[a]['accuracy']:.2f}" for a in attacks) + " |")
    return "\n".join(lines)


def cmd_info(args, extra) -> int:
    from igam.runs import read_json, resolve_run

    run_dir = resolve_run(args.run)
    out = {"run": str(run_dir), "meta": read_json(run_dir / "meta.json")}
    for name in ("metrics.json", "eval.json"):
        if (run_dir / name).exists():
            out[name[:-5]] = read_json(run_dir / name)
    if not args.json:
        meta = out["meta"]
        print(f"run      {run_dir}\nstatus   {meta.get('status')}\nmethod   {meta.get('method')}\n"
              f"model    {meta['model']['name']} ({meta['model']['num_classes']} classes, input "
              f"{meta['data']['shape']})\ndataset  {meta['data']['dataset']}\nseed     {meta.get('seed')}\n"
              f"version  {meta.get('version')} (git {str(meta.get('git_commit'))[:10]}, torch {meta.get('torch')})")
        if meta.get("adapter"):
            print(f"adapter  {meta['adapter']}")
        for key in ("metrics", "eval"):
            if key in out:
                print(f"{key:<8} {json.dumps(out[key], default=str)}")
    else:
        print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_models(args, extra) -> int:
    from igam.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_demo(args, extra) -> int:
    from igam.demo import demo

    demo(out_dir=args.out_dir, data_dir=args.data_dir, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="igam", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transfer adversarial robustness from a robust teacher to a student of another task by "
                    "matching input gradients (IGAM, Chan, Tay & Ong, CVPR 2020).",
        epilog="Start with `igam demo`. Every verb has --help.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name, fn, help, config=False, epilog=""):
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        if config:
            sp.add_argument("--config", metavar="FILE.yaml", help="YAML file of configuration keys")
            sp.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
        return sp

    verb("train", cmd_train, "Train a model: standard, pgd-at, trades, finetune, igam or igr (method=...).",
         config=True, epilog=EPILOG_OVERRIDES + "\n\nExamples:\n  igam train dataset=mnist model=madry-mnist "
         "epochs=2 --data-dir ../shared/data\n  igam train --config experiments/cpu/teacher.yaml seed=1\n\n"
         + config_help())

    ev = verb("evaluate", cmd_evaluate, "Evaluate runs under attacks; writes RUN/eval.json and prints a table.")
    ev.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    ev.add_argument("--attacks", default="clean", help="comma-separated: clean (more with igam.attacks)")
    ev.add_argument("--n", type=int, default=10000, help="number of test images (first n)")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--seed", type=int, default=0, help="seed of random starts")
    ev.add_argument("--bn", choices=["eval", "train"], default="eval",
                    help="BatchNorm mode: eval, or train to reproduce the official evaluation (labelled)")
    ev.add_argument("--data-dir", default=None, help="data root (default: the run's own, else $IGAM_DATA)")
    ev.add_argument("--device", default="cpu")

    info = verb("info", cmd_info, "Print a run's metadata, metrics and evaluation results.")
    info.add_argument("run", metavar="RUN")
    info.add_argument("--json", action="store_true", help="print everything as JSON")

    verb("models", cmd_models, "List the architectures igam can create by name.")

    d = verb("demo", cmd_demo, "The main job: a small real robustness transfer, end to end, on CPU.")
    d.add_argument("--out-dir", default="runs/demo", help="where the demo's runs and report go")
    d.add_argument("--data-dir", default=None, help="data root with mnist.npz / cifar10.npz (default: "
                   "$IGAM_DATA, else ./data; synthetic data when absent)")
    d.add_argument("--quick", action="store_true", help="a reduced run for tests (seconds, not minutes)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    # `igam train --data-dir X` is the same as data_dir=X
    try:
        return int(args.fn(args, extra) or 0)
    except IgamError as e:
        print(f"igam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("igam: interrupted; resume a training run with resume=true.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
