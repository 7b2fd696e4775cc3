"""Typed configuration: dataclass defaults, then a YAML file, then `key=value` / `--key value` overrides.

Every key is a field of :class:`Config` with a help string; unknown keys and values of the wrong
type are errors that name the closest valid key. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import yaml

from igam.errors import IgamError, NonFiniteValue, suggest
from igam.files import atomic_write_text, read_yaml
from igam.registry import OBJECTIVES
from igam.units import check_eps, check_start, non_finite, parse_fraction

__all__ = ["ALIASES", "FIELDS", "GROUPS", "METHOD_HELP", "METHODS", "PRESETS", "Config", "apply_overrides",
           "check_eps", "config_help", "config_notes", "group_keys", "load_yaml", "make_config",
           "methods_help", "parse_fraction", "parse_override_args", "save_yaml", "validate"]


GROUPS = ("run", "data", "model", "optim", "attack", "teacher", "igam", "distill", "finetune", "eval", "log")
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


# The built-in methods (for the help text). What `method` accepts is the objective registry
# (igam.objectives.OBJECTIVES, checked where a run starts), so registered plug-ins are methods too.
METHODS = ("standard", "pgd-at", "trades", "fast-at", "n-fgsm", "free-at", "finetune", "igam", "igr",
           "kd-noise")
# one line per built-in method for `igam train --help` (docs/METHODS.md has the equations and costs)
METHOD_HELP = {
    "standard": "cross-entropy on clean images",
    "pgd-at": "PGD adversarial training (Madry et al. 2018): PGD-`steps` of `step_size` within `eps`",
    "trades": "TRADES (Zhang et al. 2019): CE + trades_beta KL(f(x) || f(x')), x' by PGD on the KL",
    "fast-at": "fast AT (Wong et al. 2020): FGSM from a random start, step fast_alpha (1.25 eps), projected",
    "n-fgsm": "N-FGSM (de Jorge et al. 2022): FGSM of step eps from x + U(-k eps, k eps), k = nfgsm_noise, "
              "no projection",
    "free-at": "free AT (Shafahi et al. 2019): each batch free_replays times, the perturbation carried over; "
               "epochs count gradient steps (epochs / free_replays passes over the data)",
    "finetune": "a robust teacher's new logit layer on the target task (paper eq. 6; `igam finetune`)",
    "igam": "IGAM (paper eqs. 7-14): CE + lambda_adv L_adv + lambda_diff ||J_s - J_t||^2 from a fine-tuned "
            "teacher",
    "igr": "input-gradient regularisation, IGAM's J_t = 0 control: CE + lambda_diff ||J_s||^2 (smooth "
           "students: activation=gelu)",
    "kd-noise": "distillation from the fine-tuned teacher on x + N(0, kd_sigma^2) at kd_temperature "
                "(Srinivas & Fleuret 2018: Jacobian matching's first-order equivalent)",
}


@dataclass
class Config:
    """Every setting of a run, flat (`key=value`; key names are unique), each key in one group (GROUPS:
    run, data, model, optim, attack, teacher, igam, finetune, eval, log) that `igam VERB --help` lists by
    verb. Numbers typed as fractions (eps=8/255) are kept as typed in config.yaml and parsed by
    igam.units where they are used."""

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
    dataset: str = opt("synthetic", "mnist | fashion-mnist | cifar10 | cifar100 | svhn | tiny-imagenet | "
                       "imagefolder:PATH | npz:PATH | synthetic[:HxWxC:K]; add :CLASSES for some classes, "
                       "relabelled 0..K-1 in the order given: cifar10:animals, cifar10:vehicles, "
                       "cifar10:0,1,8,9, cifar10:cat,dog")
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
    method: str = opt("standard", "training objective: " + " | ".join(METHODS) + " (see methods above)")
    # --- attacks used for training (pgd-at, trades, fast-at, n-fgsm, free-at) ----------------------
    section("attack")
    eps: str = opt("8/255", "L-inf radius in [0,1] pixel units; fractions like 8/255 allowed")
    step_size: str = opt("2/255", "PGD step size")
    steps: int = opt(7, "PGD steps for adversarial training (Madry: 7 CIFAR, 40 MNIST)")
    random_start: bool = opt(True, "PGD starts from a uniform random point of the eps-ball")
    eps_warmup_epochs: float = opt(0.0, "adversarial training (pgd-at, trades, fast-at, n-fgsm, free-at): "
                                        "grow the training eps and step size linearly from 0 over these "
                                        "epochs (steadies MNIST PGD-AT at eps 0.3)")
    attack_bn: str = opt("eval", "BatchNorm mode while crafting training attacks: eval | train",
                         ("eval", "train"))
    trades_beta: float = opt(6.0, "TRADES robustness weight")
    fast_alpha: str = opt("0", "fast-at: FGSM step size (0: 1.25 eps, Wong et al.)")
    nfgsm_noise: float = opt(2.0, "n-fgsm: noise U(-k eps, k eps) before the FGSM step of eps; this is k "
                             "(de Jorge et al.: 2)")
    free_replays: int = opt(4, "free-at: steps on each minibatch in a row, m (Shafahi et al.: 8 CIFAR, 4 "
                            "ImageNet); epochs still count gradient steps")
    # --- teacher and adapter (finetune, igam) -----------------------------------------------------
    section("teacher")
    teacher: str = opt("", "teacher: a run directory, igam:NAME (shipped, e.g. igam:mnist-linf-0.3; "
                       "`igam models`), robustbench:DATASET/THREAT/NAME (e.g. "
                       "robustbench:cifar10/Linf/Carmon2019Unlabeled), or a .safetensors/.pt/.pth file with "
                       "teacher_model (MadryLab robustness checkpoints and wrapper prefixes are recognised)")
    teacher_model: str = opt("", "architecture of a foreign teacher checkpoint")
    teacher_classes: int = opt(0, "classes of a foreign teacher checkpoint's own head")
    teacher_in_shape: str = opt("", "input shape CxHxW of a foreign teacher (e.g. 1x28x28)")
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
    # --- IGAM (paper eqs. 7-14) ------------------------------------------------------------------
    section("igam")
    preset: str = opt("", "paper | official: sets the gradient target, scaling, discriminator input and "
                      "schedule of IGAM (see docs/IGAM.md)")
    lambda_adv: float = opt(1.0, "weight of the adversarial discriminator loss L_adv (eq. 14)")
    lambda_diff: str = opt("auto", "weight of L_diff = ||J_s - J_t||^2 (eq. 13); 'auto' scales it to "
                           "lambda_diff_auto / E||J_t||^2 on the first batches")
    lambda_diff_auto: float = opt(2.3, "target of lambda_diff=auto: lambda_diff * E||J_t||^2")
    gradient_target: str = opt("ce", "differentiate the cross-entropy (paper eq. 8) or the true-class "
                               "probability p_y (official code)", ("ce", "true-prob"))
    pixel_scale: float = opt(1.0, "gradients taken w.r.t. x * pixel_scale (official code: 255)")
    diff_reduction: str = opt("mean", "L_diff over the batch: mean (paper) | sum (official)", ("mean", "sum"))
    disc_input_norm: str = opt("none", "gradient normalisation before the discriminator: none | "
                               "zero-mean-l2 (official)", ("none", "zero-mean-l2"))
    adv_loss: str = opt("saturating", "student's adversarial loss: saturating (minimax, eq. 14; the default, "
                        "measured better in docs/RESULTS.md) | non-saturating (GAN trick)",
                        ("saturating", "non-saturating"))
    disc_layers: int = opt(4, "discriminator conv layers (Appendix A: 4 or 5)")
    disc_channels: int = opt(8, "discriminator channels of the first layer, doubled per layer (8 or 16)")
    disc_every: int = opt(5, "discriminator update every k student steps")
    disc_lr: float = opt(0.0, "discriminator learning rate (0: the student's lr and schedule)")
    disc_optimizer: str = opt("sgd", "sgd | adam", ("sgd", "adam"))
    igam_start: str = opt("0", "when the IGAM terms switch on: a step (1000), an epoch (5ep) or a "
                          "fraction of training (0.875 = official); plain cross-entropy before")
    grad_matching: str = opt("exact", "student gradient of the matching terms: exact (double backprop) | "
                             "finite-difference (Hessian-vector product from first-order passes)",
                             ("exact", "finite-difference"))
    fd_step: float = opt(1e-2, "finite-difference step h relative to ||x|| / ||v||")
    fd_scheme: str = opt("central", "finite-difference scheme: central (two extra passes, error O(h^2)) | "
                         "forward (one extra pass reusing the pass at x, error O(h); use fd_step=1e-3)",
                         ("central", "forward"))
    amp_input_grad: bool = opt(False, "run the IGAM input-gradient path under amp too (exact mode; default: "
                               "it stays float32)")
    double_backward: str = opt("lean", "exact mode's double backward through the student's convolutions and "
                               "train-mode BatchNorm: lean (the same derivatives from leaner kernels; "
                               "docs/IGAM.md) | torch (PyTorch's own formulas); equal up to float rounding",
                               ("lean", "torch"))
    teacher_cache: str = opt("auto", "compute the teacher's input gradient of each training image once and "
                             "reuse it: auto (on exactly when exact: augment none, noise 0, teacher_bn eval, "
                             "no random adapter) | on (refused where it would be wrong) | off",
                             ("auto", "on", "off"))
    # --- distillation from the fine-tuned teacher (kd-noise) ----------------------------------------
    section("distill")
    kd_temperature: float = opt(4.0, "kd-noise: softmax temperature T (the KL is scaled by T^2)")
    kd_sigma: float = opt(0.1, "kd-noise: standard deviation of the Gaussian input noise, pixels in [0, 1]")
    kd_weight: float = opt(1.0, "kd-noise: weight of T^2 KL(teacher || student) on noisy inputs")
    # --- finetune --------------------------------------------------------------------------------
    section("finetune")
    finetune_lr: float = opt(3e-3, "Adam learning rate of the new logit layer (and learned adapter); past a "
                             "point a higher one (or more epochs) buys the fine-tuned teacher clean accuracy "
                             "with its robustness: 3e-3 balances them (measured: docs/RESULTS.md; the "
                             "official code: 1e-3)")
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
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> Config:
        return apply_overrides(self, kw)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# names other tools use for our keys: only suggested in the error, never silently accepted
ALIASES = {"learning_rate": "lr", "learningrate": "lr", "bs": "batch_size", "wd": "weight_decay",
           "max_epochs": "epochs", "n_epochs": "epochs", "num_epochs": "epochs", "arch": "model",
           "architecture": "model", "data": "dataset", "data_root": "data_dir", "root": "data_dir",
           "output_dir": "out_dir", "epsilon": "eps", "alpha": "step_size", "pgd_steps": "steps",
           "num_steps": "steps", "beta": "trades_beta", "gpu": "device", "clip": "grad_clip",
           "max_grad_norm": "grad_clip", "resume_from": "resume", "objective": "method", "run_name": "name"}
_TYPES = get_type_hints(Config)


def _coerce(key: str, value: Any) -> Any:
    typ = _TYPES[key]
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
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise IgamError(f"{key}={value!r} is not allowed.{suggest(str(value), choices)} "
                        f"Choose one of: {', '.join(choices)}.")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of cfg with overrides applied (keys may use - or _)."""
    values = cfg.to_dict()
    for raw_key, value in overrides.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS:
            hint = f" Did you mean '{ALIASES[key]}'?" if key in ALIASES else suggest(key, FIELDS)
            raise IgamError(f"Unknown config key '{raw_key}'.{hint} Run `igam train --help` for the list of "
                            "keys.")
        values[key] = _coerce(key, value)
        _check_choice(key, values[key])
    out = Config(**values)
    validate(out)
    return out


FD_STEP_MIN = 1e-6  # below this the finite-difference step is lost in float32 rounding
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


# Every numeric key's range, in one place. The reason is part of the error message: it says what the key
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
    "trades_beta": Range(0, 1e6, "TRADES' weight of the robustness term (Zhang et al.: 1 to 6)"),
    "nfgsm_noise": Range(0, 1e3, "N-FGSM's noise in multiples of eps (de Jorge et al.: 2)"),
    "free_replays": Range(1, 1000, "free-at's steps on each minibatch in a row (Shafahi et al. use 4-10)"),
    "teacher_classes": Range(0, 100_000, "classes of a foreign teacher's head (0: read from the file)"),
    "lambda_adv": Range(0, 1e12, "weight of the adversarial discriminator loss"),
    "lambda_diff_auto": Range(0, 1e12, "target of lambda_diff=auto"),
    "pixel_scale": Range(0, 1e6, "input scale of the gradients (1: [0, 1] pixels, 255: 0-255 pixels)",
                         lo_open=True),
    "disc_layers": Range(1, 8, "each layer halves the gradient map and doubles the channels"),
    "disc_channels": Range(1, 1024, "channels of the discriminator's first layer"),
    "disc_every": Range(1, BIG, "student steps between two discriminator updates"),
    "disc_lr": Range(0, math.inf, "the discriminator's learning rate (0: the student's)"),
    "fd_step": Range(FD_STEP_MIN, 1.0, "the finite-difference step relative to ||x|| / ||v||; below 1e-6 it "
                     "vanishes in float32 (typical: 1e-2 central, 1e-3 forward)"),
    "kd_temperature": Range(0, 1e6, "the softmax temperature of distillation (typical: 4)", lo_open=True),
    "kd_sigma": Range(0, 1e3, "the standard deviation of the input noise, in [0, 1] pixel units"),
    "kd_weight": Range(0, 1e12, "the weight of the distillation term"),
    "finetune_lr": Range(0, math.inf, "the fine-tuning learning rate (typical: 1e-3 to 3e-3)", lo_open=True),
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
    """Cross-field checks that a type cannot express."""
    if cfg.method not in METHODS and cfg.method not in OBJECTIVES:
        known = sorted({*METHODS, *OBJECTIVES})
        raise IgamError(f"method={cfg.method!r} is not a training objective.{suggest(cfg.method, known)} "
                        f"Choose one of: {', '.join(known)}.")
    for key in ("eps", "step_size"):
        check_eps(getattr(cfg, key), key)
    check_eps(cfg.noise, "noise")  # a radius of uniform noise in [0, 1] pixel units
    if cfg.lambda_diff != "auto" and parse_fraction(cfg.lambda_diff, "lambda_diff") < 0:
        raise IgamError(f"lambda_diff={cfg.lambda_diff} must not be negative (a negative weight would reward "
                        "gradients unlike the teacher's); give a number >= 0 or auto.")
    check_start(cfg.igam_start, "igam_start")
    # the settings that would make every step a no-op get their own words before the range table's
    for key in ("lr", "finetune_lr"):
        if getattr(cfg, key) == 0:
            raise IgamError(f"{key}=0 makes every training step a no-op (the weights never change); give a "
                            f"positive {key}.")
    if cfg.pixel_scale == 0:
        raise IgamError("pixel_scale=0 divides every input gradient by 0, so every IGAM step would be "
                        "skipped; use 1 (inputs in [0, 1]) or 255 (the official code's 0-255 pixels).")
    if 0 <= cfg.fd_step < FD_STEP_MIN:
        raise IgamError(f"fd_step={cfg.fd_step:g} is below {FD_STEP_MIN:g}: the finite-difference step "
                        "vanishes in float32, so every finite-difference IGAM step would be skipped (0/0). "
                        "Use e.g. fd_step=1e-2 (the default) or 1e-3.")
    check_ranges(cfg)
    if cfg.disc_channels * 2 ** (cfg.disc_layers - 1) > 8192:
        raise IgamError(f"disc_channels={cfg.disc_channels} doubled over disc_layers={cfg.disc_layers} gives "
                        f"{cfg.disc_channels * 2 ** (cfg.disc_layers - 1)} channels in the last layer (at "
                        "most 8192); lower one of them (Appendix A: 5 layers of 16 channels).")
    check_eps(cfg.fast_alpha, "fast_alpha")
    if cfg.method in ADVERSARIAL and 0 < cfg.epochs <= cfg.eps_warmup_epochs:
        raise IgamError(f"eps_warmup_epochs={cfg.eps_warmup_epochs:g} is not shorter than "
                        f"epochs={cfg.epochs:g}: the eps ramp would never reach eps={cfg.eps}, yet the run "
                        "would be recorded as trained at it. Give eps_warmup_epochs below epochs (e.g. "
                        f"{cfg.epochs * 0.2:g}), or 0 for no ramp.")
    if any(not 0 <= m <= 1 for m in cfg.lr_milestones):
        raise IgamError(f"lr_milestones={cfg.lr_milestones} must be fractions of training in [0, 1], "
                        "e.g. 0.5,0.75.")
    if cfg.method in ("igam", "igr") and cfg.lambda_diff == "auto" and cfg.gradient_target == "true-prob":
        raise IgamError(
            "lambda_diff=auto does not work with gradient_target=true-prob (set by preset=official): "
            "true-class-probability gradients vanish on confidently classified images, so a weight fixed "
            "on the first batch blows up later (measured: the student collapsed to chance, docs/RESULTS.md). "
            "Give lambda_diff a number, e.g. Appendix A's lambda_diff=100 for MNIST -> CIFAR-10, "
            "or use gradient_target=ce.")
    if cfg.preset not in ("", "paper", "official"):
        raise IgamError(f"preset={cfg.preset!r} is not allowed.{suggest(cfg.preset, ['paper', 'official'])} "
                        "Choose paper or official (or leave it empty).")


# which built-in methods read which keys beyond the common ones (run, data, model, optim, eval, log);
# eps is left out: the evaluation during training attacks at eps whatever the method
ADVERSARIAL = ("pgd-at", "trades", "fast-at", "n-fgsm", "free-at")


def used_by() -> dict[str, tuple[str, ...]]:
    """{key: the built-in methods that read it} for the keys only some methods read."""
    return {
        **{k: ("pgd-at", "trades") for k in ("step_size", "steps", "random_start")},
        "eps_warmup_epochs": ADVERSARIAL,
        "attack_bn": ("pgd-at", "trades", "fast-at", "n-fgsm"),
        "trades_beta": ("trades",),
        "fast_alpha": ("fast-at",),
        "nfgsm_noise": ("n-fgsm",),
        "free_replays": ("free-at",),
        **{k: ("finetune", "igam", "igr", "kd-noise") for k in group_keys("teacher")},
        **{k: ("igam", "igr") for k in group_keys("igam")},
        **{k: ("kd-noise",) for k in group_keys("distill")},
        **{k: ("finetune",) for k in group_keys("finetune")},
    }


def config_notes(cfg: Config) -> list[str]:
    """What a run of a built-in method would silently ignore or half-do: keys set away from their default
    that the method does not read (kept in config.yaml, no effect), and a free-at run too short to see
    every training image once. Text lines for `igam train` to print before it starts."""
    if cfg.method not in METHODS:
        return []
    default = Config()
    unused = [f"{k}={getattr(cfg, k)}" for k, users in used_by().items()
              if cfg.method not in users and getattr(cfg, k) != getattr(default, k)]
    notes = []
    if unused:
        one = len(unused) == 1
        notes.append(f"method={cfg.method} does not use {', '.join(unused)}: config.yaml records "
                     f"{'it' if one else 'them'}, but {'it has' if one else 'they have'} no effect on this "
                     "run.")
    if cfg.method == "free-at" and cfg.epochs < cfg.free_replays:
        notes.append(f"free-at counts epochs in gradient steps and replays each batch free_replays="
                     f"{cfg.free_replays} times, so epochs={cfg.epochs:g} passes over only "
                     f"{100 * cfg.epochs / cfg.free_replays:.0f}% of the training images; give epochs >= "
                     f"{cfg.free_replays} to see each image at least once (Shafahi et al. train m times "
                     "fewer passes for the same steps).")
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


# IGAM presets (docs/IGAM.md): what each sets unless the key is given explicitly.
PRESETS: dict[str, dict[str, Any]] = {
    # the paper's equations 8-14: CE input gradients on [0,1] pixels, per-example mean L_diff, raw gradients
    # to the discriminator, minimax L_adv, eval-mode teacher, IGAM from the first step
    "paper": {"gradient_target": "ce", "pixel_scale": 1.0, "diff_reduction": "mean",
              "disc_input_norm": "none", "adv_loss": "saturating", "teacher_bn": "eval", "igam_start": "0"},
    # the released TF1 code: true-class-probability gradients on 0-255 pixels, batch-summed L_diff,
    # zero-mean unit-L2 maps to the discriminator, minimax L_adv at weight lambda_adv/2, train-mode
    # BatchNorm in the teacher, IGAM only for the last 12.5% of training, +-2 px crops
    "official": {"gradient_target": "true-prob", "pixel_scale": 255.0, "diff_reduction": "sum",
                 "disc_input_norm": "zero-mean-l2", "adv_loss": "saturating", "teacher_bn": "train",
                 "igam_start": "0.875", "crop_padding": 2},
}


def make_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or base), then a YAML file, then overrides; a preset fills the keys not given explicitly."""
    cfg = base or Config()
    given: dict[str, Any] = {}
    if config_file:
        given.update(load_yaml(config_file))
    given.update({str(k).replace("-", "_"): v for k, v in (overrides or {}).items()})
    cfg = apply_overrides(cfg, given)
    if cfg.preset:
        preset = {k: v for k, v in PRESETS[cfg.preset].items() if k not in given}
        cfg = apply_overrides(cfg, preset)
    validate(cfg)
    return cfg


def group_keys(*groups: str) -> tuple[str, ...]:
    """The configuration keys of the given groups (GROUPS), in declaration order."""
    unknown_groups = set(groups) - set(GROUPS)
    if unknown_groups:
        raise ValueError(f"unknown config groups {sorted(unknown_groups)}; groups are {GROUPS}")
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["group"] in groups)


def methods_help() -> str:
    """The method list of `igam train --help`: every built-in method with a line on what it trains."""
    return "\n".join(["methods (method=...; docs/METHODS.md has papers, equations and passes per image):"]
                     + [f"  {m:<10} {METHOD_HELP[m]}" for m in METHODS])


def config_help(groups: tuple[str, ...] = GROUPS) -> str:
    """The key reference of `igam VERB --help`: the keys of `groups` (all by default), group by group."""
    lines = ["configuration keys (key=value or --key value; defaults in brackets):"]
    fields = dataclasses.fields(Config)
    for group in (g for g in GROUPS if g in groups):
        lines.append(f" [{group}]")
        for f in (f for f in fields if f.metadata["group"] == group):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name:<18} {f.metadata['help']} [{default}]")
    return "\n".join(lines)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
