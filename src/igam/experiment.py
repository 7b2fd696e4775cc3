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

"{stage}" is replaced by that stage's run directory, ${VAR} by an environment variable. A stage whose run
finished with the same configuration is reused, so a rerun after a crash or an edit does only what is
left. results.md / results.json / tradeoff.png are written into out_dir.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from igam.config import Config, make_config
from igam.errors import IgamError, suggest
from igam.runs import atomic_write_text, read_json, write_json

IGNORED_KEYS = ("progress", "resume", "threads", "device", "tensorboard", "out_dir", "name")
EXPERIMENT_KEYS = (
    "experiment",
    "description",
    "out_dir",
    "defaults",
    "stages",
    "evaluation",
    "notes",
    "primary_metric",
)
STAGE_KEYS = ("name", "title", "config", "row", "paper", "curve", "sweep")

# Rough CPU throughput (images/s, standard training, 2 cores, batch 128) and method cost factors, for
# --dry-run estimates only (docs/PERFORMANCE.md has the measured figures).
CPU_IMAGES_PER_S = {
    "madry-mnist": 1500,
    "small-cnn": 1000,
    "small-cnn-bn": 800,
    "resnet20": 550,
    "preact-resnet18": 60,
    "wrn-16-4": 95,
    "wrn-32-10": 4,
}
# ... and on one A100-class GPU (fp32/TF32), equally rough.
GPU_IMAGES_PER_S = {
    "madry-mnist": 40000,
    "small-cnn": 40000,
    "small-cnn-bn": 30000,
    "resnet20": 20000,
    "preact-resnet18": 8000,
    "wrn-16-4": 8000,
    "wrn-32-10": 1200,
}
DATASET_SIZES = {
    "mnist": 60000,
    "fashion-mnist": 60000,
    "cifar10": 50000,
    "cifar100": 50000,
    "svhn": 73257,
    "tiny-imagenet": 100000,
}


@dataclass
class Stage:
    name: str
    config: dict[str, Any]
    title: str = ""
    row: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    curve: str = ""


@dataclass
class Experiment:
    name: str
    out_dir: Path
    stages: list[Stage]
    evaluation: list[dict[str, Any]]
    description: str = ""
    primary_metric: str = "pgd20"
    source: str = ""


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):

        def env(m: re.Match) -> str:
            name, _, default = m.group(1).partition(":-")
            return os.environ.get(name) or default

        return re.sub(r"\$\{([^}]+)\}", env, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def _fmt_value(v: Any) -> str:
    return str(v).replace("/", "_")


MINIATURE_DATA = {
    "mnist": "synthetic:28x28x1:10",
    "fashion-mnist": "synthetic:28x28x1:10",
    "cifar10": "synthetic:32x32x3:10",
    "cifar100": "synthetic:32x32x3:100",
    "svhn": "synthetic:32x32x3:10",
    "tiny-imagenet": "synthetic:64x64x3:200",
}


def miniaturize(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same stage on tiny synthetic stand-ins of its data (same shapes and classes), a width-4 model,
    two PGD steps and a few optimisation steps: a smoke test of a pipeline in seconds."""
    out = dict(cfg)
    ds = str(out.get("dataset", "synthetic"))
    out["dataset"] = MINIATURE_DATA.get(ds, ds if ds.startswith("synthetic") else "synthetic")
    model = str(out.get("model", "small-cnn"))
    out["model"] = "madry-mnist" if model == "madry-mnist" else "small-cnn"
    out.update(
        width=4,
        train_subset=256,
        test_subset=128,
        eval_n=64,
        batch_size=min(int(out.get("batch_size", 32)), 32),
        epochs=min(float(out.get("epochs", 1)), 0.25),
        steps=min(int(out.get("steps", 2)), 2),
        eval_attack="",
        progress=False,
        tensorboard=False,
        log_every=1,
        checkpoint_every=1000,
    )
    for key in ("disc_layers",):
        out[key] = min(int(out.get(key, 4)), 3)
    return out


def miniature_evaluation(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cheap = ("clean", "fgsm")
    out = []
    for b in blocks:
        attacks = [a for a in b["attacks"] if a in cheap]
        if attacks:
            out.append({**b, "attacks": attacks, "n": 64, "checks": False})
    return out


def load_experiment(
    path: str | Path,
    out_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    miniature: bool = False,
) -> Experiment:
    """Parse and check an experiment file (every stage's config is validated now, before any work)."""
    p = Path(path)
    if not p.is_file():
        raise IgamError(f"Experiment file '{path}' does not exist.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise IgamError(f"Experiment file '{path}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise IgamError(
            f"'{path}' must be a mapping with a non-empty `stages:` list (see `igam run --help`)."
        )
    for key in raw:
        if key not in EXPERIMENT_KEYS:
            raise IgamError(f"Unknown experiment key '{key}' in '{path}'.{suggest(key, EXPERIMENT_KEYS)}")
    raw = _expand_env(raw)
    name = str(raw.get("experiment") or p.stem)
    defaults = dict(raw.get("defaults") or {})
    defaults.update(overrides or {})
    stages: list[Stage] = []
    for i, s in enumerate(raw["stages"]):
        if not isinstance(s, dict) or "name" not in s:
            raise IgamError(f"Stage {i + 1} of '{path}' needs a `name:` and a `config:` mapping.")
        for key in s:
            if key not in STAGE_KEYS:
                raise IgamError(f"Unknown key '{key}' in stage '{s['name']}'.{suggest(key, STAGE_KEYS)}")
        sweep = s.get("sweep") or {}
        keys = list(sweep)
        combos = list(itertools.product(*[sweep[k] for k in keys])) if keys else [()]
        for combo in combos:
            cfg = {**defaults, **dict(s.get("config") or {}), **dict(zip(keys, combo))}
            if miniature:
                cfg = miniaturize(cfg)
            suffix = "".join(f"-{k}={_fmt_value(v)}" for k, v in zip(keys, combo))
            row = s.get("row", "")
            stages.append(
                Stage(
                    f"{s['name']}{suffix}",
                    cfg,
                    s.get("title", ""),
                    f"{row}{suffix}" if row else "",
                    dict(s.get("paper") or {}),
                    s.get("curve", ""),
                )
            )
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise IgamError(
            f"Stage names in '{path}' repeat: {sorted({n for n in names if names.count(n) > 1})}."
        )
    evaluation = list(raw.get("evaluation") or [])
    if miniature:
        evaluation = miniature_evaluation(evaluation)
    exp = Experiment(
        name,
        Path(out_dir or raw.get("out_dir") or f"runs/{name}"),
        stages,
        evaluation,
        str(raw.get("description", "")),
        str(raw.get("primary_metric", "pgd20")),
        str(p),
    )
    for st in exp.stages:
        resolve_stage(exp, st)  # validates keys, types and references
        for ref in re.findall(r"\{([A-Za-z0-9_=.\-]+)\}", json.dumps(st.config)):
            if ref not in names[: names.index(st.name)]:
                raise IgamError(
                    f"Stage '{st.name}' refers to '{{{ref}}}', which is not an earlier stage."
                    f"{suggest(ref, names)}"
                )
    for ev in exp.evaluation:
        for r in ev.get("rows", []):
            if r not in names:
                raise IgamError(f"Evaluation rows name unknown stage '{r}'.{suggest(r, names)}")
    return exp


def resolve_stage(exp: Experiment, stage: Stage) -> Config:
    """The stage's full configuration, with "{stage}" references replaced by run directories."""

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return re.sub(r"\{([A-Za-z0-9_=.\-]+)\}", lambda m: str(exp.out_dir / m.group(1)), v)
        return v

    cfg = {k: sub(v) for k, v in stage.config.items()}
    cfg.update(out_dir=str(exp.out_dir), name=stage.name)
    try:
        return make_config(overrides=cfg)
    except IgamError as e:
        raise IgamError(f"Stage '{stage.name}': {e}") from None


IGAM_KEYS = ("preset", "lambda_adv", "lambda_diff", "lambda_diff_auto", "gradient_target", "pixel_scale",
             "diff_reduction", "disc_input_norm", "adv_loss", "disc_layers", "disc_channels", "disc_every",
             "disc_lr", "disc_optimizer", "igam_start", "grad_matching", "fd_step", "fd_scheme",
             "amp_input_grad")


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys that decide what a stage computes (IGAM keys only matter to igam/igr stages)."""
    skip = set(IGNORED_KEYS) | (set() if cfg.get("method") in ("igam", "igr") else set(IGAM_KEYS))
    return {k: v for k, v in cfg.items() if k not in skip}


def stage_status(exp: Experiment, stage: Stage) -> str:
    """done (finished with the same config), stale (finished with another config), partial, or todo."""
    run_dir = exp.out_dir / stage.name
    if not (run_dir / "meta.json").exists():
        return "todo"
    meta = read_json(run_dir / "meta.json")
    saved = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    now = resolve_stage(exp, stage).to_dict()
    defaults = Config().to_dict()
    # a key added to igam after the run was made counts as unchanged while it keeps its default
    saved = {**{k: defaults[k] for k in now if k not in (saved or {})}, **(saved or {})}
    same = _comparable(saved) == _comparable(now)
    if meta.get("status") == "finished":
        return "done" if same else "stale"
    return "partial" if same else "stale"


def estimate_seconds(cfg: Config, gpu: bool = False) -> float:
    """A rough estimate of a stage's training time on a 2-core CPU (or one GPU), for --dry-run."""
    table = GPU_IMAGES_PER_S if gpu else CPU_IMAGES_PER_S
    base = cfg.dataset.split(":")[0]
    n = cfg.train_subset or DATASET_SIZES.get(base, 10000)
    model = cfg.model
    ips = table.get(model, 300 * (40 if gpu else 1))
    if model == "small-cnn" and cfg.width:
        ips = ips * (16 / max(cfg.width, 16)) ** 1.5
    factor = {
        "standard": 1.0,
        "finetune": 0.6,
        "pgd-at": cfg.steps + 1.0,
        "trades": cfg.steps + 2.0,
        "igam": 3.5,
        "igr": 3.0,
    }.get(cfg.method, 1.0)
    if cfg.method == "finetune":
        ips = table.get(cfg.teacher_model or "madry-mnist", table["madry-mnist"])
    if cfg.method in ("igam", "igr"):
        start = cfg.igam_start.strip()
        frac = float(start) if re.fullmatch(r"0?\.\d+", start) else 0.0
        factor = frac + (1 - frac) * factor
    return cfg.epochs * n * factor / ips


def plan(exp: Experiment) -> list[tuple[Stage, str, float, float]]:
    """(stage, status, estimated CPU seconds, estimated GPU seconds) for every stage."""
    out = []
    for s in exp.stages:
        cfg = resolve_stage(exp, s)
        out.append((s, stage_status(exp, s), estimate_seconds(cfg), estimate_seconds(cfg, gpu=True)))
    return out


def format_plan(exp: Experiment) -> str:
    lines = [
        f"experiment {exp.name} -> {exp.out_dir}",
        "",
        "| stage | method | model | dataset | epochs | status | est. 2-core CPU | est. 1 GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpu = gpu = 0.0
    rows = plan(exp)
    for st, status, sec, gsec in rows:
        cfg = resolve_stage(exp, st)
        if status != "done":
            cpu, gpu = cpu + sec, gpu + gsec
        lines.append(
            f"| {st.name} | {cfg.method} | {cfg.model if cfg.method != 'finetune' else 'teacher head'} | "
            f"{cfg.dataset} | {cfg.epochs:g} | {status} | {_hms(sec)} | {_hms(gsec)} |"
        )
    lines += [
        "",
        f"stages left: {sum(s != 'done' for _, s, _, _ in rows)}; estimated training time: {_hms(cpu)} "
        f"on a 2-core CPU, {_hms(gpu)} on one A100-class GPU (rough, plus evaluation; measured figures in "
        "docs/PERFORMANCE.md)",
    ]
    for ev in exp.evaluation:
        lines.append(
            f"evaluation: {', '.join(ev['attacks'])} on {ev.get('n', 1000)} test images"
            + (f" for {', '.join(ev['rows'])}" if ev.get("rows") else "")
        )
    return "\n".join(lines)


def _hms(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


# ---------------------------------------------------------------------------------------------
def run_experiment(
    path: str | Path,
    *,
    dry_run: bool = False,
    out_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    only: list[str] | None = None,
    miniature: bool = False,
    results_only: bool = False,
    log=print,
) -> Path:
    """Run every stage that is not done, evaluate the rows, write results.md/json and the report
    (results_only: only rebuild those from the evaluations already made)."""
    from igam.train import train

    exp = load_experiment(path, out_dir, overrides, miniature)
    if results_only:
        write_results(exp, log=log)
        return exp.out_dir
    log(format_plan(exp))
    if dry_run:
        return exp.out_dir
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exp.source, exp.out_dir / "experiment.yaml")
    for st in exp.stages:
        if only and st.name not in only:
            continue
        status = stage_status(exp, st)
        if status == "done":
            log(f"igam run: {st.name}: done, reused")
            continue
        run_dir = exp.out_dir / st.name
        if status == "stale":
            moved = run_dir.with_name(f"{st.name}.stale-{int(time.time())}")
            run_dir.rename(moved)
            log(f"igam run: {st.name}: its config changed; the old run is kept as {moved.name}")
        cfg = resolve_stage(exp, st).replace(resume=status == "partial")
        log(f"igam run: {st.name}: training ({cfg.method}, {cfg.model}, {cfg.dataset})")
        train(cfg, log=log)
    evaluate_experiment(exp, log=log)
    return exp.out_dir


def _row_stages(exp: Experiment, ev: dict[str, Any]) -> list[Stage]:
    rows = ev.get("rows")
    return [s for s in exp.stages if (s.name in rows if rows else (s.row or s.curve))]


def evaluate_experiment(exp: Experiment, log=print) -> dict[str, Any]:
    """Evaluate each row stage under each evaluation block (results already in eval.json are reused)."""
    from igam.evaluate import evaluate_run, result_key
    from igam.utils import resolve_device

    for ev in exp.evaluation:
        n, seed = int(ev.get("n", 1000)), int(ev.get("seed", 0))
        for st in _row_stages(exp, ev):
            run_dir = exp.out_dir / st.name
            if not (run_dir / "model.safetensors").exists():
                continue
            # on the stage's device (device=cuda, or auto with a GPU), not on evaluate_run's default CPU
            device = str(resolve_device(resolve_stage(exp, st).device))
            have = read_json(run_dir / "eval.json") if (run_dir / "eval.json").exists() else {}
            todo = [
                a
                for a in ev["attacks"]
                if not (
                    isinstance(have.get(result_key(a)), dict)
                    and have[result_key(a)].get("n") == n
                    and have[result_key(a)].get("seed") == seed
                )
            ]
            checks = bool(ev.get("checks")) and "check:fgsm" not in json.dumps(have.get("masking_checks", {}))
            # 'pgd10@eps=4/255' is pgd10 at another radius: evaluate each radius as one call
            groups: dict[str | None, list[str]] = {}
            for a in todo or (["clean"] if checks else []):
                base, _, eps = a.partition("@eps=")
                groups.setdefault(eps or None, []).append(base)
            for eps, attacks in groups.items():
                evaluate_run(
                    run_dir,
                    attacks,
                    n=n,
                    seed=seed,
                    eps=eps,
                    batch_size=int(ev.get("batch_size", 500)),
                    checks=checks and eps is None,
                    check_n=int(ev.get("check_n", min(n, 500))),
                    device=device,
                    log=log,
                )
    return write_results(exp, log=log)


def write_results(exp: Experiment, log=print) -> dict[str, Any]:
    """results.json, results.md, tradeoff.png and report.html from the runs' eval.json files as they are."""
    from igam.attacks.presets import column_name

    results = collect_results(exp)
    write_json(exp.out_dir / "results.json", results)
    atomic_write_text(exp.out_dir / "results.md", results_markdown(exp, results, column_name))
    try:
        plot_tradeoff(exp, results, exp.out_dir / "tradeoff.png")
    except Exception as e:  # a plot must never lose the results
        log(f"igam run: trade-off plot skipped ({e})")
    try:
        from igam.report import write_report

        write_report(exp.out_dir)
    except Exception as e:  # noqa: BLE001
        log(f"igam run: report skipped ({type(e).__name__}: {e})")
    log(f"igam run: results in {exp.out_dir / 'results.md'}")
    return results


def collect_results(exp: Experiment) -> dict[str, Any]:
    out: dict[str, Any] = {"experiment": exp.name, "rows": []}
    for st in exp.stages:
        run_dir = exp.out_dir / st.name
        if not (run_dir / "meta.json").exists():
            continue
        meta = read_json(run_dir / "meta.json")
        ev = read_json(run_dir / "eval.json") if (run_dir / "eval.json").exists() else {}
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
                "train_time_s": meta.get("train_time_s"),
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
    cfg = resolve_stage(exp, st)
    keys = ["method", "model", "dataset", "epochs", "train_subset"]
    if cfg.method in ("igam", "igr"):
        keys += ["lambda_adv", "lambda_diff", "lambda_diff_auto", "preset", "grad_matching", "igam_start"]
    if cfg.method in ("pgd-at", "trades"):
        keys += ["eps", "steps"]
    return {k: getattr(cfg, k) for k in keys}


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
        "Robust accuracy under each attack, eval-mode BatchNorm.",
        "",
        "| Model | " + " | ".join(_column(c, column_name) for c in cols) + " | masking checks | train time |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for r in results["rows"]:
        if not (r["row"] or r["curve"]) or not r["accuracy"]:
            continue
        cells = []
        for c in cols:
            v = r["accuracy"].get(c)
            p = r["paper"].get(c)
            cells.append(("-" if v is None else f"{v:.1f}") + (f" ({p:g})" if p is not None else ""))
        mc = {True: "pass", False: "FAIL: " + ", ".join(r["masking_failed"]), None: "-"}[r["masking_checks"]]
        t = _hms(r["train_time_s"]) if r["train_time_s"] else "-"
        lines.append(f"| {r['row'] or r['stage']} | " + " | ".join(cells) + f" | {mc} | {t} |")
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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
