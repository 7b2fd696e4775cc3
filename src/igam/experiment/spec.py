"""Experiment files: their format (see igam.experiment), validation, miniatures, the stages' full
configurations and whether a stage is done (finished with the same configuration)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igam.attacks.presets import parse_preset
from igam.config import Config, all_keys, make_config, reads, used_by
from igam.data.subsets import split_subset, static_classes, subset_size
from igam.errors import IgamError, suggest
from igam.experiment.cluster import ClusterOptions, check_cluster
from igam.files import check_name, read_yaml
from igam.objectives import builds_own_model, check_method, trained_model_name
from igam.runs import Run
from igam.units import check_eps

IGNORED_KEYS = ("progress", "resume", "threads", "device", "tensorboard", "out_dir", "name",
                "teacher_cache", "double_backward")  # speed only: the same numbers up to float rounding
EXPERIMENT_KEYS = (
    "experiment",
    "description",
    "out_dir",
    "defaults",
    "stages",
    "evaluation",
    "notes",
    "primary_metric",
    "cluster",
)
MAX_STAGES = 1000  # stages of one experiment, sweeps expanded (each stage is a training run)
STAGE_KEYS = ("name", "title", "config", "row", "paper", "curve", "sweep")

# Rough CPU throughput (images/s, standard training, 2 cores, batch 128) and method cost factors, for
# --dry-run estimates only (docs/PERFORMANCE.md has the measured figures).
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
    miniature: bool = False  # `igam run --miniature`: a smoke test on synthetic stand-ins, not results
    cluster: ClusterOptions = field(default_factory=ClusterOptions)  # `cluster:` (igam run --executor slurm)


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
    """A swept value as part of a stage (folder) name: path separators, and dots or spaces at its end
    (which some file systems drop), become '_'."""
    text = str(v).replace("/", "_").replace("\\", "_")
    return re.sub(r"[. ]+$", lambda m: "_" * len(m.group()), text)


MINIATURE_DATA = {
    "mnist": "synthetic:28x28x1:10",
    "fashion-mnist": "synthetic:28x28x1:10",
    "cifar10": "synthetic:32x32x3:10",
    "cifar100": "synthetic:32x32x3:100",
    "svhn": "synthetic:32x32x3:10",
    "tiny-imagenet": "synthetic:64x64x3:200",
}


def miniature_dataset(name: str) -> str:
    """The synthetic stand-in of a dataset (same shape and classes); a class subset keeps its classes
    (cifar10:animals -> synthetic:32x32x3:10:2,3,4,5,6,7), or, given by class names, their number."""
    base, subset = split_subset(name)
    if base.startswith("synthetic"):
        return name
    mini = MINIATURE_DATA.get(base, "synthetic")
    if subset is None or base not in MINIATURE_DATA:
        return mini
    classes = static_classes(base, subset)
    if classes is None:
        return f"{mini.rpartition(':')[0]}:{subset_size(base, subset)}"
    return f"{mini}:{','.join(map(str, classes))}"


def miniaturize(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same stage on tiny synthetic stand-ins of its data (same shapes and classes), a width-4 model,
    two PGD steps and a few optimisation steps: a smoke test of a pipeline in seconds."""
    out = dict(cfg)
    if str(out.get("dataset") or "").strip():  # (a stage without one is refused by load_experiment)
        out["dataset"] = miniature_dataset(str(out["dataset"]))
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


MINIATURE_TAG = " (miniature)"  # on every row and curve label of a miniature: not the stage the file names
MINIATURE_NOTE = ("Miniature (`igam run --miniature`): every stage on a synthetic stand-in of its data (256 "
                  "training images); the models trained here are small-cnn (or madry-mnist) at width 4, for "
                  "at most 0.25 epochs and 2 PGD steps; only the clean and FGSM evaluations, on 64 images. "
                  "A smoke test of the pipeline, not results.")


def mark_smoke_test(ax: Any, exp: Experiment) -> None:
    """A miniature's picture (matplotlib axes `ax`) says on its face that it is a smoke test of the
    pipeline, not results (its tiny models sit at chance, so its points pile up)."""
    if exp.miniature:
        ax.set_title(ax.get_title() + MINIATURE_TAG)
        ax.text(0.5, 0.5, "SMOKE TEST\nigam run --miniature: not results", transform=ax.transAxes,
                ha="center", va="center", fontsize=20, color="#cf222e", alpha=0.3, rotation=18,
                weight="bold")


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
    raw = read_yaml(p, "Experiment file") or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise IgamError(
            f"'{path}' must be a mapping with a non-empty `stages:` list (see `igam run --help`)."
        )
    for key in raw:
        if key not in EXPERIMENT_KEYS:
            raise IgamError(f"Unknown experiment key '{key}' in '{path}'.{suggest(key, EXPERIMENT_KEYS)}")
    raw = _expand_env(raw)
    name = str(raw.get("experiment") or p.stem)
    _mapping(raw.get("defaults"), "defaults", path)
    defaults = dict(raw.get("defaults") or {})
    defaults.update(overrides or {})
    stages: list[Stage] = []
    for i, s in enumerate(raw["stages"]):
        if not isinstance(s, dict) or "name" not in s:
            raise IgamError(f"Stage {i + 1} of '{path}' needs a `name:` and a `config:` mapping.")
        try:  # the stage's run folder is out_dir/NAME: one folder name, never a path
            if isinstance(s["name"], int) and not isinstance(s["name"], bool):
                s["name"] = str(s["name"])  # `name: 2020` is the folder 2020
            check_name(s["name"], "name")
        except IgamError as e:
            raise IgamError(f"'{path}', stage {i + 1}: {e}") from None
        for key in s:
            if key not in STAGE_KEYS:
                raise IgamError(f"Unknown key '{key}' in stage '{s['name']}'.{suggest(key, STAGE_KEYS)}")
        _mapping(s.get("config"), f"stage '{s['name']}': config", path)
        _mapping(s.get("paper"), f"stage '{s['name']}': paper", path)
        sweep = _mapping(s.get("sweep"), f"stage '{s['name']}': sweep", path)
        for k, v in sweep.items():
            if not isinstance(v, list) or not v:
                raise IgamError(f"'{path}', stage '{s['name']}': sweep {k}: {v!r} must be a non-empty "
                                f"list of values, e.g. `sweep: {{{k}: [{v!r}, ...]}}`.")
        keys = list(sweep)
        count = math.prod(len(sweep[k]) for k in keys)
        if len(stages) + count > MAX_STAGES:
            made = (f"its sweep makes {count:,} stages ({' x '.join(str(len(sweep[k])) for k in keys)} "
                    "values)" if keys else "it is one stage more")
            raise IgamError(f"'{path}', stage '{s['name']}': {made}, and an experiment holds up to "
                            f"{MAX_STAGES} stages in all ({len(stages)} before this one); sweep fewer values "
                            "or split the experiment.")
        combos = list(itertools.product(*[sweep[k] for k in keys])) if keys else [()]
        for combo in combos:
            cfg = {**defaults, **dict(s.get("config") or {}), **dict(zip(keys, combo))}
            if miniature:
                cfg = miniaturize(cfg)
            suffix = "".join(f"-{k}={_fmt_value(v)}" for k, v in zip(keys, combo))
            try:
                check_name(f"{s['name']}{suffix}", "name")
            except IgamError as e:
                raise IgamError(f"'{path}', stage '{s['name']}': the stage name its sweep makes is refused: "
                                f"{e}") from None
            row, curve, tag = s.get("row", ""), s.get("curve", ""), MINIATURE_TAG if miniature else ""
            stages.append(
                Stage(
                    f"{s['name']}{suffix}",
                    cfg,
                    s.get("title", ""),
                    f"{row}{suffix}{tag}" if row else "",
                    dict(s.get("paper") or {}),
                    f"{curve}{tag}" if curve else "",
                )
            )
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise IgamError(
            f"Stage names in '{path}' repeat: {sorted({n for n in names if names.count(n) > 1})}."
        )
    evaluation = check_evaluation(raw.get("evaluation"), path, names)
    if miniature:
        evaluation = miniature_evaluation(evaluation)
    exp = Experiment(
        name,
        # a miniature without --out-dir goes beside the real runs, never into their folder
        Path(out_dir or str(raw.get("out_dir") or f"runs/{name}") + ("-miniature" if miniature else "")),
        stages,
        evaluation,
        (MINIATURE_NOTE + "\n\n" if miniature else "") + str(raw.get("description", "")),
        str(raw.get("primary_metric", "pgd20")),
        str(p),
        miniature,
        check_cluster(raw.get("cluster"), str(path)),
    )
    for st in exp.stages:
        resolve_stage(exp, st)  # validates keys, types and references
        if not str(st.config.get("dataset") or "").strip():
            raise IgamError(f"Stage '{st.name}' of '{path}' has no dataset: give it in the stage's config or "
                            "in the file's defaults (e.g. `dataset: cifar10`).")
        here = names.index(st.name)
        for ref in references(st):
            if ref == st.name:
                raise IgamError(f"Stage '{st.name}' refers to itself ('{{{ref}}}'): a stage can use only the "
                                "run of an earlier stage (e.g. its teacher). Name an earlier stage.")
            if ref in names[here:]:
                raise IgamError(
                    f"Stage '{st.name}' refers to '{{{ref}}}', which comes later in the file (stage "
                    f"{names.index(ref) + 1}; '{st.name}' is stage {here + 1}). Stages run in order and each "
                    f"may use only earlier ones: move '{ref}' above '{st.name}'"
                    + (" (two stages that refer to each other cannot both run first: break the cycle)."
                       if st.name in references(exp.stages[names.index(ref)]) else ".")
                )
            if ref not in names:
                raise IgamError(
                    f"Stage '{st.name}' refers to '{{{ref}}}', which is not a stage of '{path}'."
                    f"{suggest(ref, names[:here])}"
                )
    return exp


def references(stage: Stage) -> list[str]:
    """The names of the stages that `stage`'s configuration refers to as "{NAME}" (e.g. its teacher)."""
    return re.findall(r"\{([A-Za-z0-9_=.\-]+)\}", json.dumps(stage.config))


def _mapping(value: Any, what: str, path: str | Path) -> dict[str, Any]:
    """`value` as a mapping ({} for None); IgamError naming `what` for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise IgamError(f"'{path}': {what} must be a mapping of key: value, not {type(value).__name__} "
                        f"({str(value)[:60]}).")
    return value


EVAL_KEYS = ("attacks", "rows", "n", "seed", "checks", "batch_size", "check_n", "title", "notes")


def check_evaluation(blocks: Any, path: str | Path, stages: list[str]) -> list[dict[str, Any]]:
    """The `evaluation:` blocks, checked before any training: types, stage names, and every attack name
    (with an optional @eps=...), so that --dry-run catches what would otherwise fail after all training."""
    if blocks is None:
        return []
    if not isinstance(blocks, list):
        raise IgamError(f"'{path}': evaluation must be a list of blocks (attacks: [...], n: ...), not "
                        f"{type(blocks).__name__}.")
    for i, ev in enumerate(blocks):
        where = f"'{path}': evaluation block {i + 1}"
        if not isinstance(ev, dict):
            raise IgamError(f"{where} must be a mapping with an `attacks:` list.")
        for key in ev:
            if key not in EVAL_KEYS:
                raise IgamError(f"{where}: unknown key '{key}'.{suggest(str(key), EVAL_KEYS)} Keys: "
                                f"{', '.join(EVAL_KEYS)}.")
        attacks = ev.get("attacks")
        if not isinstance(attacks, list) or not attacks or not all(isinstance(a, str) for a in attacks):
            raise IgamError(f"{where}: attacks must be a non-empty list of attack names, "
                            "e.g. [clean, pgd20].")
        for a in attacks:
            base, _, eps = a.partition("@eps=")
            try:
                if base != "clean":
                    parse_preset(base)
                if eps:
                    check_eps(eps)
            except IgamError as e:
                raise IgamError(f"{where}: {e}") from None
        for key in ("n", "seed", "batch_size", "check_n"):
            v = ev.get(key)
            if key == "batch_size" and v == "auto":  # the largest that fits (igam.evaluate.auto_batch_size)
                continue
            low = 0 if key == "seed" else 1
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise IgamError(f"{where}: {key}={v!r} must be a whole number"
                                + (" (0 or more)." if key == "seed" else " of at least 1")
                                + (" or auto." if key == "batch_size" else "." if key != "seed" else ""))
        if ev.get("checks") is not None and not isinstance(ev["checks"], bool):
            raise IgamError(f"{where}: checks={ev['checks']!r} must be true or false.")
        rows = ev.get("rows")
        if rows is not None and (not isinstance(rows, list) or not all(isinstance(r, str) for r in rows)):
            raise IgamError(f"{where}: rows must be a list of stage names.")
        for r in rows or []:
            if r not in stages:
                raise IgamError(f"Evaluation rows name unknown stage '{r}'.{suggest(r, stages)}")
    return list(blocks)


def resolve_stage(exp: Experiment, stage: Stage) -> Config:
    """The stage's full configuration, with "{stage}" references replaced by run directories."""

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return re.sub(r"\{([A-Za-z0-9_=.\-]+)\}", lambda m: str(exp.out_dir / m.group(1)), v)
        return v

    cfg = {k: sub(v) for k, v in stage.config.items()}
    cfg.update(out_dir=str(exp.out_dir), name=stage.name)
    try:
        out = make_config(overrides=cfg)
        check_method(out.method)
    except IgamError as e:
        raise IgamError(f"Stage '{stage.name}': {e}") from None
    if builds_own_model(out.method):  # e.g. finetune: `model` is the adapted teacher, as its run records
        earlier = exp.stages[: exp.stages.index(stage)] if stage in exp.stages else []
        refs = set(re.findall(r"\{([A-Za-z0-9_=.\-]+)\}", json.dumps(stage.config)))
        planned = {str(exp.out_dir / s.name): resolve_stage(exp, s).model for s in earlier if s.name in refs}
        name = trained_model_name(out, planned)
        if name:
            out = out.replace(model=name)
    return out




PATH_KEYS = ("data_dir", "init_from", "teacher", "teacher_dir")  # compared as the folders or files they name


def _where(value: Any) -> Any:
    """A path-valued setting as the absolute path it names from here (`../shared/data` and its absolute
    path are one folder); names such as igam:NAME or robustbench:... stay as they are."""
    if not isinstance(value, str) or not value or re.match(r"^[A-Za-z][\w+-]*:(?![\\/])", value):
        return value
    try:
        return str(Path(value).expanduser().resolve())
    except (OSError, ValueError, RuntimeError):  # e.g. a NUL byte (a damaged config.yaml): not a path
        return value


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys that decide what a stage computes (a key some methods read matters only to the stages
    whose method reads it: igam.config.reads), with path-valued keys resolved, so that a relative and an
    absolute spelling of one folder agree."""
    try:
        used = reads(Config.from_dict({k: v for k, v in cfg.items() if k in all_keys()}))
    except (IgamError, TypeError, ValueError):  # a config saved by another version: compare every key
        used = set(cfg)
    optional = set(used_by())
    skip = set(IGNORED_KEYS) | {k for k in optional if k not in used}
    return {k: (_where(v) if k in PATH_KEYS else v) for k, v in cfg.items() if k not in skip}


def stage_status(exp: Experiment, stage: Stage) -> str:
    """done (finished with the same config), stale (finished with another config), partial, or todo."""
    run_dir = exp.out_dir / stage.name
    if not (run_dir / Run.META).exists():
        return "todo"
    meta = Run(run_dir).meta
    saved = Run(run_dir).config
    now = resolve_stage(exp, stage).to_dict()
    defaults = Config().to_dict()
    # a key added to igam after the run was made counts as unchanged while it keeps its default
    saved = {**{k: defaults[k] for k in now if k not in (saved or {})}, **(saved or {})}
    same = _comparable(saved) == _comparable(now)
    if meta.get("status") == "finished":
        return "done" if same else "stale"
    return "partial" if same else "stale"
