"""Typed configuration: defaults, then a YAML file, then `key=value` / `--key value` overrides.

Every key has a help string and a group; unknown keys and values of the wrong type are errors that name
the closest valid key. The core keys are the fields of :class:`Config`; a method brings its own keys from
its file (igam.registry.KEYS, registered by igam.objectives.register_objective), and they behave the same
everywhere: help, overrides, YAML, validation, config.yaml. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import yaml

import igam.registry as registry
from igam.errors import IgamError, NonFiniteValue, suggest
from igam.files import atomic_write_text, check_name, read_yaml
from igam.registry import Key
from igam.units import check_eps, non_finite, parse_fraction

__all__ = ["ALIASES", "GROUPS", "Config", "all_keys", "apply_overrides", "check_eps", "config_help",
           "config_notes", "core_keys", "group_keys", "groups", "load_yaml", "make_config", "method_names",
           "methods_help", "parse_fraction", "parse_override_args", "save_yaml", "used_by", "validate"]


GROUPS = ("run", "data", "model", "optim", "attack", "teacher", "eval", "log")  # the core keys' groups
_section = ["run"]


def section(name: str) -> None:
    """Inside the Config class body: the group the keys below belong to (see GROUPS)."""
    assert name in GROUPS, name
    _section[0] = name


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta = {"help": help, "choices": choices, "group": _section[0]}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every setting of a run, flat (`key=value`; key names are unique), each key in one group that `igam
    VERB --help` lists by verb. The fields below are the core keys (groups GROUPS); a method brings its
    own keys from its file (igam.registry.KEYS, e.g. the igam, distill and finetune groups), read as
    attributes like the core ones (`cfg.lambda_adv`). Numbers typed as fractions (eps=8/255) are kept as
    typed in config.yaml and parsed by igam.units where they are used."""

    # --- run -----------------------------------------------------------------------------------
    section("run")
    name: str = opt("", "run name (default: METHOD-MODEL-DATASET-SEED)")
    out_dir: str = opt("runs", "directory that holds run directories")
    seed: int = opt(0, "random seed (data order, augmentation, initialisation, attacks)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = opt(False, "continue an interrupted run in out_dir/name from its last good checkpoint")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms(True) (slower on GPU)")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    # --- data ----------------------------------------------------------------------------------
    section("data")
    dataset: str = opt("", "required for training: mnist | fashion-mnist | cifar10 | cifar100 | svhn | "
                       "tiny-imagenet | imagefolder:PATH | npz:PATH | synthetic[:HxWxC:K] (a synthetic "
                       "stand-in, for smoke tests); add :CLASSES for some classes, relabelled 0..K-1 in the "
                       "order given: cifar10:animals, cifar10:vehicles, cifar10:0,1,8,9, cifar10:cat,dog")
    data_dir: str = opt("", "data root (default: $IGAM_DATA, else ./data)")
    download: bool = opt(False, "download a named dataset into data_dir when its files are missing")
    train_subset: int = opt(0, "use only the first N training images (0: all)")
    test_subset: int = opt(0, "use only the first N test images (0: all)")
    augment: str = opt("auto", "auto | none | flip | crop | crop-flip (auto: crop-flip for colour data, "
                       "none for grey)", ("auto", "none", "flip", "crop", "crop-flip"))
    crop_padding: int = opt(4, "zero padding of the random crop, in pixels (Madry/IGAM used 2)")
    noise: str = opt("0", "uniform noise U(-noise, noise) added to training inputs (official IGAM "
                     "CIFAR-100 run: 8/255)")
    batch_size: int = opt(128, "training batch size (per process under torchrun)")
    eval_batch_size: int = opt(500, "evaluation batch size")
    # --- model ---------------------------------------------------------------------------------
    section("model")
    model: str = opt("small-cnn", "architecture from the zoo (`igam models`), timm:NAME or torchvision:NAME")
    activation: str = opt("default", "default | relu | leaky-relu | softplus | silu | gelu (zoo models)")
    width: int = opt(0, "width multiplier / base channels of zoo models that have one (0: model default)")
    normalize: str = opt("dataset", "input normalisation inside the model: dataset (per-channel mean/std "
                         "of the training set) | none | per-image | l2",
                         ("dataset", "none", "per-image", "l2"))
    init_from: str = opt("", "start from the weights of this run directory (e.g. a standard-trained "
                         "student, as the official IGAM schedule does)")
    # --- optimisation --------------------------------------------------------------------------
    section("optim")
    epochs: float = opt(10.0, "training epochs (fractions allowed)")
    optimizer: str = opt("sgd", "sgd | adam", ("sgd", "adam"))
    lr: float = opt(0.01, "learning rate (0.01 suits the default small-cnn; Madry/IGAM: 0.1 for WRN, SGD)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay (applied to weights of conv/linear layers only)")
    schedule: str = opt("cosine", "cosine | step | constant", ("cosine", "step", "constant"))
    lr_milestones: list = opt([0.5, 0.75], "step schedule: fractions of training where lr *= lr_gamma")
    lr_gamma: float = opt(0.1, "step schedule factor")
    warmup_epochs: float = opt(0.0, "linear learning-rate warm-up")
    grad_clip: float = opt(0.0, "clip the student's gradient norm (0: off)")
    # --- method --------------------------------------------------------------------------------
    section("run")
    method: str = opt("standard", "training objective, a registered method (the list above; `igam train "
                      "--help`)")
    # --- attacks used for training (the adversarial methods) -----------------------------------
    section("attack")
    eps: str = opt("8/255", "L-inf radius in [0,1] pixel units; fractions like 8/255 allowed")
    step_size: str = opt("2/255", "PGD step size")
    steps: int = opt(7, "PGD steps for adversarial training (Madry: 7 CIFAR, 40 MNIST)")
    random_start: bool = opt(True, "PGD starts from a uniform random point of the eps-ball")
    eps_warmup_epochs: float = opt(0.0, "adversarial training methods: "
                                        "grow the training eps and step size linearly from 0 over these "
                                        "epochs (steadies MNIST PGD-AT at eps 0.3)")
    attack_bn: str = opt("eval", "BatchNorm mode while crafting training attacks: eval | train",
                         ("eval", "train"))
    # --- teacher and adapter (the methods that learn from a robust model) -------------------------
    section("teacher")
    teacher: str = opt("", "teacher: a run directory, igam:NAME (shipped, e.g. igam:mnist-linf-0.3; "
                       "`igam models`), robustbench:DATASET/THREAT/NAME (e.g. "
                       "robustbench:cifar10/Linf/Carmon2019Unlabeled), or a .safetensors/.pt/.pth file with "
                       "teacher_model (MadryLab robustness checkpoints and wrapper prefixes are recognised)")
    teacher_model: str = opt("", "architecture of a foreign teacher checkpoint")
    teacher_classes: int = opt(0, "classes of a foreign teacher checkpoint's own head")
    teacher_in_shape: str = opt("", "input shape CxHxW of a foreign teacher (e.g. 1x28x28)")
    teacher_width: int = opt(0, "width of a foreign teacher checkpoint's zoo architecture, as width= of "
                             "`igam models` (e.g. 16 for a madry-mnist trained at width=16; 0: its default)")
    teacher_normalize: str = opt("", "input normalisation a foreign teacher was trained with, kept inside "
                                 "it: mnist | cifar10 | cifar100 | imagenet | MEAN,../STD,.. (empty: [0, 1] "
                                 "pixels, or the checkpoint's own normaliser)")
    teacher_dataset: str = opt("", "the dataset a foreign teacher (weights file) was trained on: mnist | "
                               "cifar10 | ... | npz:PATH, with :CLASSES for a class subset (cifar10:animals; "
                               "implied by robustbench:DATASET/...; none: skip the check); its clean "
                               "accuracy on 200 of its test images is checked before fine-tuning (near "
                               "chance: refused; weak: a warning)")
    teacher_dir: str = opt("", "where robustbench: teachers' weights are, in RobustBench's layout "
                           "DIR/DATASET/THREAT/NAME.pt (default: DATA_ROOT/robustbench)")
    adapter: str = opt("auto", "input adapter from target to teacher input: auto | identity | gray (3 -> 1 "
                       "channels) | rgb (1 -> 3) | resize[N] | crop[N] | pad[N] | random-pad[N] | "
                       "transpose-conv (a learned 3x3 stride-2 transposed convolution: HxW -> 2Hx2W, no N; "
                       "it outputs the teacher's channels when it is the last resize/crop/pad/transpose-conv "
                       "step, else keeps its input's; it starts as x2 linear interpolation of the channel "
                       "average for fewer channels (3 -> 1: grey) or of channel o mod C, is trained by "
                       "finetune "
                       "with the new logit layer and frozen for the student), composed with +: gray+crop28 "
                       "(CIFAR-10 -> MNIST teacher), rgb+pad (MNIST -> CIFAR-10 teacher); auto: gray/rgb, "
                       "then crop or resize")
    teacher_bn: str = opt("eval", "teacher BatchNorm mode: eval (paper) | train (official code)",
                          ("eval", "train"))
    # --- evaluation during training --------------------------------------------------------------
    section("eval")
    eval_every: float = opt(1.0, "evaluate every N epochs (0: only at the end)")
    eval_n: int = opt(1000, "test images used by evaluations during training (0: all)")
    eval_attack: str = opt("", "attack preset also evaluated during training, e.g. pgd10 (empty: none)")
    eval_bn: str = opt("eval", "BatchNorm mode at evaluation: eval | train (reproduces the official "
                       "evaluation; labelled as such)", ("eval", "train"))
    # --- logging and checkpoints -----------------------------------------------------------------
    section("log")
    log_every: int = opt(50, "write a CSV/TensorBoard row every N steps")
    checkpoint_every: int = opt(500, "write a resumable checkpoint every N steps (and at every epoch end)")
    keep_checkpoints: int = opt(2, "resumable checkpoints kept on disk")
    nan_policy: str = opt("skip", "NaN/Inf in a loss or gradient: skip (drop the step, go on) | stop",
                          ("skip", "stop"))
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard events")
    amp: str = opt("none", "mixed precision on GPU: none | bf16 | fp16", ("none", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the modules that allow it (teacher, discriminator, "
                        "evaluation; student in finite-difference mode)")
    channels_last: bool = opt(False, "channels-last memory format on GPU")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        object.__setattr__(self, "_extra", {})

    def __getattr__(self, name: str) -> Any:
        """A method's key (igam.registry.KEYS): its value in this config, else its default."""
        if name.startswith("_"):
            raise AttributeError(name)
        key = registry.KEYS.get(name)
        if key is None:
            raise AttributeError(f"Config has no key '{name}'")
        extra = self.__dict__.get("_extra", {})
        return extra[name] if name in extra else _default(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config of already-coerced values: core keys as fields, method keys kept beside them."""
        cfg = cls(**{k: v for k, v in values.items() if k in _CORE})
        cfg._extra.update({k: v for k, v in values.items() if k not in _CORE})
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Every key, core and registered, with its value (a method key left at its default included)."""
        out = dataclasses.asdict(self)
        out.update({k: getattr(self, k) for k in registry.KEYS})
        return out

    def replace(self, **kw: Any) -> Config:
        return apply_overrides(self, kw)


def _default(key: Key) -> Any:
    return list(key.default) if isinstance(key.default, list | tuple) else key.default


_CORE: dict[str, Key] = {
    f.name: Key(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(),  # type: ignore[misc]
                f.metadata["help"], f.metadata["group"], f.metadata.get("choices"))
    for f in dataclasses.fields(Config)
}
_CORE_TYPES = get_type_hints(Config)


def core_keys() -> dict[str, Key]:
    """The core keys (Config's fields) by name."""
    return dict(_CORE)


def all_keys() -> dict[str, Key]:
    """Every configuration key by name: the core keys (Config's fields), then those the registered methods
    brought (igam.registry.KEYS), each with its default, help, group and choices."""
    return {**_CORE, **registry.KEYS}


def groups() -> tuple[str, ...]:
    """The key groups in help order: the core GROUPS, then the groups the methods' keys brought."""
    extra = [k.group for k in registry.KEYS.values()]
    return GROUPS + tuple(dict.fromkeys(g for g in extra if g not in GROUPS))


def method_names() -> tuple[str, ...]:
    """The registered methods (`method=`), in registration order."""
    return tuple(registry.METHODS)


# names other tools use for our keys: only suggested in the error, never silently accepted
ALIASES = {"learning_rate": "lr", "learningrate": "lr", "bs": "batch_size", "wd": "weight_decay",
           "max_epochs": "epochs", "n_epochs": "epochs", "num_epochs": "epochs", "arch": "model",
           "architecture": "model", "data": "dataset", "data_root": "data_dir", "root": "data_dir",
           "output_dir": "out_dir", "epsilon": "eps", "alpha": "step_size", "pgd_steps": "steps",
           "num_steps": "steps", "beta": "trades_beta", "gpu": "device", "clip": "grad_clip",
           "max_grad_norm": "grad_clip", "resume_from": "resume", "objective": "method", "run_name": "name"}


def _type(key: str) -> type:
    return _CORE_TYPES[key] if key in _CORE else registry.KEYS[key].type


def _coerce(key: str, value: Any) -> Any:
    typ = _type(key)
    if value is None:
        raise IgamError(f"Config key '{key}' has no value; write {key}=VALUE.")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteValue(non_finite(key, value))
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).strip())
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            out = parse_fraction(value, key)
            return out
        if typ is list:
            if isinstance(value, list | tuple):
                return [parse_fraction(v, key) for v in value]
            s = str(value).strip().strip("[]")
            return [parse_fraction(v, key) for v in s.split(",") if v.strip()]
        if isinstance(value, dict | list):
            raise ValueError
        return str(value)
    except NonFiniteValue:
        raise
    except (ValueError, TypeError, IgamError):
        want = {bool: "true/false", int: "an integer", float: "a number", list: "a comma-separated list",
                str: "a string"}[typ]
        raise IgamError(f"Config key '{key}' needs {want}, got {value!r}.") from None




def _check_choice(key: str, value: Any) -> None:
    choices = all_keys()[key].choices
    if choices and value not in choices:
        raise IgamError(f"{key}={value!r} is not allowed.{suggest(str(value), choices)} "
                        f"Choose one of: {', '.join(choices)}.")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of cfg with overrides applied (keys may use - or _).

    Raises:
        IgamError: an unknown key (naming the closest one), a value of the wrong type or outside its
            choices, or a config that fails `validate`.
    """
    values = cfg.to_dict()
    known = all_keys()
    for raw_key, value in overrides.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            hint = f" Did you mean '{ALIASES[key]}'?" if key in ALIASES else suggest(key, known)
            raise IgamError(f"Unknown config key '{raw_key}'.{hint} Run `igam train --help` for the list of "
                            "keys.")
        values[key] = _coerce(key, value)
        _check_choice(key, values[key])
    out = Config.from_dict(values)
    validate(out)
    return out


def _method(cfg: Config) -> registry.MethodInfo | None:
    return registry.METHODS.get(cfg.method)


GRAD_CLIP_MIN = 1e-3  # a smaller clip moves the weights by at most lr x grad_clip per step: no training
BIG = 2**31 - 1  # counts of images, steps and the like


class Range(NamedTuple):
    """The values a numeric key accepts: lo .. hi (inclusive unless *_open), or exactly `off` (a value that
    switches the feature off, e.g. grad_clip=0), and why, said in the error."""

    lo: float
    hi: float
    why: str
    lo_open: bool = False
    hi_open: bool = False
    off: float | None = None


# Every numeric core key's range, in one place (a method's keys declare theirs in its file). The reason
# is part of the error message: it says what the key
# does and why values outside make no sense (typical values in brackets).
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1, "a seed for torch, NumPy and Python's generators"),
    # (the machine's own limit, a multiple of its CPUs, is checked where the run starts: utils.check_threads)
    "threads": Range(0, BIG, "CPU threads for torch; 0 keeps torch's default"),
    "train_subset": Range(0, BIG, "the first N training images (0: all)"),
    "test_subset": Range(0, BIG, "the first N test images (0: all)"),
    "crop_padding": Range(0, 64, "pixels of zero padding around each image"),
    "batch_size": Range(1, 2**20, "images per training step; a batch of more than about a million images "
                        "cannot be held in memory"),
    "eval_batch_size": Range(1, 2**20, "images per evaluation batch; more than about a million cannot be "
                             "held in memory"),
    "width": Range(0, 1024, "base channels / widening of a zoo model"),
    "epochs": Range(0, 1e6, "passes over the training data (fractions allowed)", lo_open=True),
    # no floor on learning rates: the scale of a gradient depends on the objective; a rate too small to
    # move any weight is caught by the guard's never-moved rule at the end of the run
    "lr": Range(0, math.inf, "the learning rate (typical: 0.01 to 0.1 for SGD, 1e-3 for Adam)", lo_open=True),
    "momentum": Range(0, 1, "SGD momentum m weighs past gradients by m, m^2, ...: at m >= 1 they never fade "
                      "and the updates grow without bound (typical: 0.9)", hi_open=True),
    "weight_decay": Range(0, 1, "L2 weight decay: each step shrinks the weights by lr x weight_decay; "
                          "above 1 that overwhelms the loss (typical: 5e-4)"),
    "lr_gamma": Range(0, 1, "the step schedule multiplies lr by lr_gamma at each milestone: 0 would stop "
                      "training there and more than 1 would raise lr (typical: 0.1)", lo_open=True),
    "warmup_epochs": Range(0, 1e6, "epochs of linear learning-rate warm-up"),
    "grad_clip": Range(GRAD_CLIP_MIN, math.inf, "the clip bounds the gradient's norm, so each step moves the "
                       "weights by at most about lr x grad_clip; below 1e-3 the run would hardly train "
                       "(typical: 1 to 10; 0 turns clipping off)", off=0.0),
    "steps": Range(0, 1000, "PGD steps per training batch (Madry et al.: 7 on CIFAR, 40 on MNIST)"),
    "eps_warmup_epochs": Range(0, 1e6, "epochs over which the training eps grows from 0"),
    "teacher_classes": Range(0, 100_000, "classes of a foreign teacher's head (0: read from the file)"),
    "teacher_width": Range(0, 1024, "width= of a foreign teacher's zoo architecture (0: its default)"),
    "eval_every": Range(0, 1e6, "epochs between evaluations during training (0: only at the end)"),
    "eval_n": Range(0, BIG, "test images of the evaluations during training (0: all)"),
    "log_every": Range(1, BIG, "steps per logged row"),
    "checkpoint_every": Range(1, BIG, "steps between checkpoints"),
    "keep_checkpoints": Range(1, 10_000, "checkpoints kept on disk (2 or more lets a corrupted newest one "
                              "fall back to the previous one)"),
}


def _num(v: float) -> str:
    return "inf" if v == math.inf else f"{v:g}" if isinstance(v, float) else f"{v}"


def check_range(key: str, value: float) -> None:
    """Refuse a value of a numeric key outside its `RANGES` entry, with the reason and the range.

    Raises:
        IgamError: naming key, value, the allowed range and why (NonFiniteValue for NaN/Inf).
    """
    r = RANGES[key]
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteValue(non_finite(key, value))
    if r.off is not None and value == r.off:
        return
    low = value <= r.lo if r.lo_open else value < r.lo
    high = value >= r.hi if r.hi_open else value > r.hi
    if not (low or high):
        return
    shown = f"{key}={value}" if len(str(value)) <= 24 else f"{key}={float(value):.4g}"  # (a 300-digit int)
    span = (f"{'(' if r.lo_open else '['}{_num(r.lo)}, {_num(r.hi)}{')' if r.hi_open else ']'}"
            + (f" or {_num(r.off)}" if r.off is not None else ""))
    if low and value < 0 <= r.lo:
        what = f"{shown} must not be negative"
    elif low and r.lo_open:
        what = f"{shown} must be positive" if r.lo == 0 else f"{shown} must be above {_num(r.lo)}"
    elif low:
        what = f"{shown} must be at least {_num(r.lo)}"
    else:
        what = f"{shown} must be below {_num(r.hi)}" if r.hi_open else f"{shown} is more than {_num(r.hi)}"
    raise IgamError(f"{what}: {r.why}. Choose a value in {span}.")


def check_ranges(cfg: Config) -> None:
    """`check_range` on every numeric key of cfg (and each lr milestone)."""
    for key in RANGES:
        check_range(key, getattr(cfg, key))


def validate(cfg: Config) -> None:
    """Checks that a type cannot express: the method is registered; the core keys' ranges; every key's own
    check (igam.registry.Key.check); the cross-key checks the method files registered
    (igam.registry.CHECKS); and the chosen method's own check (igam.registry.MethodInfo.check).

    Raises:
        IgamError: naming the key, the value and the fix.
    """
    if cfg.method not in registry.METHODS:
        known = sorted(registry.METHODS)
        raise IgamError(f"method={cfg.method!r} is not a training objective.{suggest(cfg.method, known)} "
                        f"Choose one of: {', '.join(known)}.")
    for key in ("eps", "step_size"):
        check_eps(getattr(cfg, key), key)
    check_eps(cfg.noise, "noise")  # a radius of uniform noise in [0, 1] pixel units
    # the settings that would make every step a no-op get their own words before the range table's
    if cfg.lr == 0:
        raise IgamError("lr=0 makes every training step a no-op (the weights never change); give a positive "
                        "lr.")
    check_ranges(cfg)
    info = _method(cfg)
    if info is not None and info.adversarial and 0 < cfg.epochs <= cfg.eps_warmup_epochs:
        raise IgamError(f"eps_warmup_epochs={cfg.eps_warmup_epochs:g} is not shorter than "
                        f"epochs={cfg.epochs:g}: the eps ramp would never reach eps={cfg.eps}, yet the run "
                        "would be recorded as trained at it. Give eps_warmup_epochs below epochs (e.g. "
                        f"{cfg.epochs * 0.2:g}), or 0 for no ramp.")
    if cfg.name:  # one folder directly inside out_dir, never a path (the default name: train.run_name)
        check_name(cfg.name, "name")
    for key, value in cfg.to_dict().items():  # paths and names reach the file system: no NUL there
        if isinstance(value, str) and "\x00" in value:
            raise IgamError(f"{key}={value[:60]!r} holds a NUL character, which no path or name can hold; "
                            "remove it.")
    # adversarial training that makes no adversarial examples would be recorded under a name it is not
    no_attack = ("eps=0" if check_eps(cfg.eps) == 0 else
                 "steps=0" if cfg.method in ("pgd-at", "trades") and cfg.steps == 0 else
                 "step_size=0" if cfg.method in ("pgd-at", "trades") and check_eps(cfg.step_size) == 0 else
                 "trades_beta=0" if cfg.method == "trades" and cfg.trades_beta == 0 else "")
    if info is not None and info.adversarial and no_attack:
        key = no_attack.split("=")[0]
        example = {"eps": " (e.g. eps=8/255, or 0.3 on MNIST)", "steps": " (e.g. steps=7)",
                   "step_size": " (e.g. step_size=2/255)", "trades_beta": " (e.g. trades_beta=6)"}[key]
        raise IgamError(f"method={cfg.method} with {no_attack} learns from clean images only: it would be "
                        f"recorded as {cfg.method} but is standard training. Give a positive {key}{example}, "
                        "or use method=standard.")
    if any(not 0 <= m <= 1 for m in cfg.lr_milestones):
        raise IgamError(f"lr_milestones={cfg.lr_milestones} must be fractions of training in [0, 1], "
                        "e.g. 0.5,0.75.")
    for key in registry.KEYS.values():
        if key.check is not None:
            key.check(getattr(cfg, key.name), key.name)
    for check in registry.CHECKS:
        check(cfg)
    if info is not None and info.check is not None:
        info.check(cfg)


def reads(cfg: Config) -> set[str]:
    """The keys outside the common groups that cfg's run reads: what its method declares (keys or group
    names, igam.registry.MethodInfo.reads, which may depend on cfg), plus the teacher's keys when the
    network trained is the teacher's (model=teacher)."""
    info = _method(cfg)
    declared = info.reads(cfg) if info is not None and callable(info.reads) else (info.reads if info else ())
    names = set(declared) | ({"teacher"} if cfg.model == "teacher" else set())
    keys = all_keys()
    return {k for k, spec in keys.items() if k in names or spec.group in names}


def used_by() -> dict[str, tuple[str, ...]]:
    """{key: the registered methods that can read it} for the keys some methods read and others do not
    (every method key, the attack keys of the adversarial methods, the teacher's keys); a method whose
    reads depend on its settings counts every key it can read."""
    out: dict[str, list[str]] = {}
    keys = all_keys()
    for name, info in registry.METHODS.items():
        declared = info.reads(None) if callable(info.reads) else info.reads
        for k, spec in keys.items():
            if k in declared or spec.group in declared:
                out.setdefault(k, []).append(name)
    attack = ("step_size", "steps", "random_start", "eps_warmup_epochs", "attack_bn")
    for k in (*registry.KEYS, *group_keys("teacher"), *attack):
        out.setdefault(k, [])
    return {k: tuple(out[k]) for k in keys if k in out}  # in declaration order


def config_notes(cfg: Config) -> list[str]:
    """What a run would silently ignore or half-do: keys set away from their default that its method does
    not read (kept in config.yaml, no effect), and the method's own notes (e.g. a free-at run too short to
    see every training image once). Text lines for `igam train` to print before it starts."""
    info = _method(cfg)
    if info is None:
        return []
    default, used = Config(), reads(cfg)
    unused = [f"{k}={getattr(cfg, k)}" for k in used_by()
              if k not in used and getattr(cfg, k) != getattr(default, k)]
    notes = []
    if unused:
        one = len(unused) == 1
        notes.append(f"method={cfg.method} does not use {', '.join(unused)}: config.yaml records "
                     f"{'it' if one else 'them'}, but {'it has' if one else 'they have'} no effect on this "
                     "run.")
    note = info.extra.get("notes")
    if callable(note):
        notes += list(note(cfg))
    return notes


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A --config file as a mapping: safe YAML (no Python tags, no alias bombs, no deep nesting).

    Raises:
        IgamError: when it is missing, unreadable, malformed, hostile or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise IgamError(f"Config file '{path}' does not exist.")
    try:
        data = read_yaml(p, "Config file") or {}
    except OSError as e:
        raise IgamError(f"Cannot read config file '{path}' ({e.strerror or e}).") from None
    if not isinstance(data, dict):
        raise IgamError(f"Config file '{path}' must hold a mapping of key: value, not {type(data).__name__}.")
    return data


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """['lr=0.1', '--epochs', '3', '--resume'] -> {'lr': '0.1', 'epochs': '3', 'resume': 'true'}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            body = a[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                k, v = body, args[i + 1]
                i += 1
            else:
                k, v = body, "true"
        elif "=" in a:
            k, v = a.split("=", 1)
        else:
            raise IgamError(f"Cannot read argument '{a}': write overrides as key=value or --key value.")
        if not k:
            raise IgamError(f"Cannot read argument '{a}': the key is empty.")
        out[k] = v
        i += 1
    return out


def make_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or base), then a YAML file, then overrides; a preset (igam.registry.PRESETS, e.g. IGAM's
    paper | official) fills the keys not given explicitly."""
    cfg = base or Config()
    given: dict[str, Any] = {}
    if config_file:
        given.update(load_yaml(config_file))
    given.update({str(k).replace("-", "_"): v for k, v in (overrides or {}).items()})
    cfg = apply_overrides(cfg, given)
    preset_name = getattr(cfg, "preset", "") if "preset" in registry.KEYS else ""
    if preset_name:
        preset = {k: v for k, v in registry.PRESETS[preset_name].items() if k not in given}
        cfg = apply_overrides(cfg, preset)
    validate(cfg)
    return cfg


def group_keys(*names: str) -> tuple[str, ...]:
    """The configuration keys of the given groups (`groups()`), in declaration order.

    Raises:
        ValueError: a group no key belongs to.
    """
    unknown_groups = set(names) - set(groups())
    if unknown_groups:
        raise ValueError(f"unknown config groups {sorted(unknown_groups)}; groups are {groups()}")
    return tuple(k for k, spec in all_keys().items() if spec.group in names)


def methods_help() -> str:
    """The method list of `igam train --help`: every registered method with a line on what it trains."""
    width = max((len(m) for m in registry.METHODS), default=8)
    return "\n".join(["methods (method=...; docs/METHODS.md has papers, equations and passes per image):"]
                     + [f"  {m:<{width}} {info.help}" for m, info in registry.METHODS.items()])


def config_help(only: tuple[str, ...] | None = None) -> str:
    """The key reference of `igam VERB --help`: the keys of the groups `only` (all by default), group by
    group."""
    lines = ["configuration keys (key=value or --key value; defaults in brackets):"]
    keys = all_keys()
    for group in (g for g in groups() if only is None or g in only):
        lines.append(f" [{group}]")
        for spec in (s for s in keys.values() if s.group == group):
            lines.append(f"  {spec.name:<18} {spec.help} [{_default(spec)}]")
    return "\n".join(lines)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
