"""Robust teachers from disk: loading one (an igam run or a foreign checkpoint), building the network that
fine-tuning trains (paper 4.1, eq. 6: every weight frozen, a new logit layer for the target classes, an
input adapter in front), and loading a fine-tuned teacher for IGAM, checked against the target task.

Whether a teacher is robust on its own task is checked by igam.teacher_checks.check_teacher_robustness, called
by the fine-tuning method's set-up, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from igam.data import default_data_dir
from igam.errors import IgamError
from igam.files import check_tensor_dict, load_torch_file, load_weights, weights_metadata
from igam.method.adapted import AdaptedTeacher
from igam.method.adapters import auto_reason, build_adapter
from igam.models import ImageClassifier, apply_normalization_metadata, create_model, robustbench_zoo, shipped
from igam.runs import Run

NAMED_NORMALIZATION = {  # per-channel mean / std of common training sets, for teacher_normalize=NAME
    "mnist": ([0.1307], [0.3081]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
# prefixes that training wrappers put before parameter names: (Distributed)DataParallel, torch.compile,
# MadryLab robustness (module.model.), Lightning and other wrappers (model., net., backbone.)
WRAPPER_PREFIXES = ("", "module.", "_orig_mod.", "module._orig_mod.", "model.", "module.model.", "net.",
                    "module.net.", "backbone.", "module.backbone.")


def parse_shape(text: str) -> tuple[int, int, int]:
    """'1x28x28' -> (1, 28, 28).

    Raises:
        IgamError: for anything that is not CxHxW with positive integers.
    """
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise IgamError(f"teacher_in_shape={text!r}: write CxHxW, e.g. 1x28x28.") from None
    if min(c, h, w) < 1:
        raise IgamError(f"teacher_in_shape={text!r}: every size must be at least 1.")
    return c, h, w


def parse_normalization(text: str, channels: int) -> tuple[list[float], list[float]] | None:
    """teacher_normalize: '' (none: the teacher takes [0, 1] pixels), a dataset name (NAMED_NORMALIZATION)
    or 'M1,M2,M3/S1,S2,S3' (per-channel mean / std of [0, 1] pixels). Returns (mean, std) or None.

    Raises:
        IgamError: an unknown name, malformed numbers, a channel count that does not fit, or std <= 0.
    """
    text = (text or "").strip().lower()
    if not text or text == "none":
        return None
    if text in NAMED_NORMALIZATION:
        mean, std = NAMED_NORMALIZATION[text]
    else:
        try:
            m, sd = text.split("/")
            mean, std = [float(v) for v in m.split(",")], [float(v) for v in sd.split(",")]
        except ValueError:
            raise IgamError(f"teacher_normalize={text!r}: give a dataset ({', '.join(NAMED_NORMALIZATION)}) "
                            "or MEAN/STD per channel, e.g. 0.485,0.456,0.406/0.229,0.224,0.225.") from None
    if len(mean) != channels or len(std) != channels:
        raise IgamError(f"teacher_normalize={text!r} has {len(mean)} channels; the teacher takes {channels}.")
    if min(std) <= 0:
        raise IgamError(f"teacher_normalize={text!r}: every std must be positive.")
    return list(mean), list(std)


State = dict[str, torch.Tensor]


def foreign_state(state: State, expected: set[str]) -> tuple[State, str, State]:
    """A foreign checkpoint's parameters renamed to the architecture's: the wrapper prefix (WRAPPER_PREFIXES)
    that makes the most names match `expected` is removed, entries outside it (a MadryLab attacker's copy,
    an optimiser's) dropped. Returns (state, the prefix removed, extra buffers such as MadryLab's
    normalizer.new_mean / new_std)."""
    best, best_hits = "", -1
    for prefix in WRAPPER_PREFIXES:
        hits = sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in expected)
        if hits > best_hits:
            best, best_hits = prefix, hits
    out = {k[len(best):]: v for k, v in state.items() if k.startswith(best)}
    extras = {k.rpartition("normalizer.")[2]: v for k, v in state.items()
              if "normalizer." in k and not k.startswith(best + "attacker")}
    return out, best, extras


def _mismatch(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Missing, unexpected and mis-shaped parameter names (a few of each, with counts)."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def few(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    parts = [f"{len(v)} {what}: {few(v)}" for what, v in (("missing", missing), ("unexpected", unexpected),
                                                         ("mis-shaped", shaped)) if v]
    return "; ".join(parts)


def load_teacher(path: str | Path, model: str = "", classes: int = 0, in_shape: str = "", *,
                 normalize: str = "", teacher_dir: str | Path = "", width: int = 0) -> ImageClassifier:
    """A teacher network from
    - an igam run directory;
    - `igam:NAME`: a teacher shipped inside the package with its certificate (igam.models.shipped);
    - `robustbench:DATASET/THREAT/NAME`: RobustBench's architecture, weights from teacher_dir in its layout
      (igam.models.robustbench_zoo), its own normalisation inside;
    - a foreign weights file (.safetensors, or .pt/.pth read with weights_only=True: a plain state dict, a
      dict with 'state_dict' or 'model', MadryLab robustness checkpoints) with its architecture named
      (model, classes, in_shape; `width` for a zoo model trained at a width other than its default, as
      create_model's width). Wrapper prefixes are recognised (WRAPPER_PREFIXES); inputs are
      normalised as `normalize` says (teacher_normalize), or by the checkpoint's own normaliser buffers
      (with the mode an igam-written file records in its safetensors header, e.g. none).

    Raises:
        IgamError: a path that does not exist, a file without its architecture, weights that do not fit
            (listing missing / unexpected / mis-shaped names), a malformed normalisation.
    """
    spec = str(path)
    if spec.startswith(shipped.PREFIX):
        return shipped.load_shipped(spec)
    if spec.startswith("robustbench:"):
        return _robustbench_teacher(spec, teacher_dir)
    p = Path(path)
    if not p.exists():
        raise IgamError(f"Teacher '{path}' does not exist; give a run directory, a weights "
                        "file, igam:NAME (a shipped teacher, see `igam models`) or "
                        "robustbench:DATASET/THREAT/NAME.")
    if p.is_dir():
        run = Run.open(p)
        run.config  # noqa: B018  (read to check it: a hostile or damaged config.yaml refuses the run)
        status = run.status
        if status not in (None, "finished"):
            raise IgamError(f"Teacher run '{p}' has status '{status}'; finish it (resume=true) first.")
        net = run.load_model()
        if isinstance(net, AdaptedTeacher):  # a fine-tuned teacher used again: keep its body
            return net.body
        return net
    if not model or not classes or not in_shape:
        raise IgamError(
            f"'{path}' is a weights file: name its architecture with teacher_model=NAME, "
            "teacher_classes=K and teacher_in_shape=CxHxW (e.g. madry-mnist, 10, 1x28x28)."
        )
    c, h, w = parse_shape(in_shape)
    state = load_weights(p)
    native = "normalize.mean" in state or any(k.endswith(".normalize.mean") for k in state)
    norm = parse_normalization(normalize, c)
    net = create_model(model, num_classes=classes, in_chans=c, input_size=(h, w), width=width,
                       normalize="dataset" if native or norm else "none",
                       mean=norm[0] if norm else None, std=norm[1] if norm else None)
    expected = set(net.state_dict())
    wrapped = any(k.endswith("fc.weight") for k in state) and any(".features." in f".{k}" for k in state)
    if hasattr(net, "native_keys") and not wrapped:  # timm / torchvision: the library's own names
        state, prefix, extras = foreign_state(state, net.native_keys())
        state = net.native_names(state)
    else:
        state, prefix, extras = foreign_state(state, expected)
    # the network's own normalisation: teacher_normalize when given; else an igam-written file restores its
    # own; MadryLab's normaliser is taken over; otherwise none ([0, 1] pixels as is)
    if norm or not any(k.startswith("normalize.") for k in state):  # teacher_normalize wins over the file's
        own = {k: v for k, v in net.state_dict().items() if k.startswith("normalize.")}
        if "new_mean" in extras and "new_std" in extras and not norm:
            own = {"normalize.mean": extras["new_mean"].reshape(1, -1, 1, 1).float(),
                   "normalize.std": extras["new_std"].reshape(1, -1, 1, 1).float()}
            net.normalize.mode = "dataset"
        state.update(own)
    if set(state) != expected or any(tuple(state[k].shape) != tuple(v.shape)
                                     for k, v in net.state_dict().items() if k in state):
        fit = _mismatch(net, state)
        if set(state) - expected and not (expected - set(state)) and "mis-shaped" not in fit:
            state = {k: v for k, v in state.items() if k in expected}  # extra entries: buffers we lack
        else:
            hint = (" If it was trained at another width, give it (teacher_width=W, e.g. 16)."
                    if "mis-shaped" in fit and not model.startswith(("timm:", "torchvision:")) else "")
            raise IgamError(f"'{path}' does not fit a {model}{f' of width {width}' if width else ''} with "
                            f"{classes} classes and input {in_shape}"
                            f"{f' (after removing the prefix {prefix!r})' if prefix else ''}: {fit}.{hint}")
    net.load_state_dict(state)
    if not norm:  # an igam-written file records its normalisation modes (e.g. none) in its header
        apply_normalization_metadata(net, weights_metadata(p), prefix)
    return net


def _robustbench_teacher(name: str, teacher_dir: str | Path) -> ImageClassifier:
    """RobustBench's network `name` with its weights from teacher_dir (see load_teacher)."""
    dataset = robustbench_zoo.parse_name(name)[0]
    root = Path(teacher_dir) if teacher_dir else default_data_dir() / "robustbench"
    weights = robustbench_zoo.weights_path(name, root)
    if not weights.is_file():
        raise IgamError(f"No weights for {name} at {weights}. Put RobustBench's file there (on a machine "
                        "with internet: robustbench.utils.load_model(NAME, model_dir=DIR, dataset=..., "
                        "threat_model=...) downloads it into that layout), or set teacher_dir=DIR.")
    c, h, w = robustbench_zoo.SHAPES[dataset]
    net = create_model(name, num_classes=robustbench_zoo.CLASSES[dataset], in_chans=c, input_size=(h, w),
                       normalize="none")
    raw = load_torch_file(weights)
    if isinstance(raw, dict) and isinstance(raw.get("last"), dict):  # RobustBench's few two-model files
        raw = raw["last"]
    state, prefix, _ = foreign_state(check_tensor_dict(raw, weights), net.native_keys())
    state = {**net.native_names(state),
             **{k: v for k, v in net.state_dict().items() if k.startswith("normalize.")}}
    fit = _mismatch(net, state)
    if fit:
        raise IgamError(f"{weights} does not fit RobustBench's {name} architecture"
                        f"{f' (after removing the prefix {prefix!r})' if prefix else ''}: {fit}.")
    net.load_state_dict(state)
    return net


def teacher_architecture(teacher: str | Path, teacher_model: str = "",
                         planned: Mapping[str, str] | None = None) -> str:
    """The architecture name of a teacher's body as meta.json records it, told from the config and the
    files without loading weights: a run directory's recorded model (a fine-tuned teacher's body), a
    shipped teacher's certified architecture, `robustbench:...` itself, a weights file's `teacher_model`,
    or `planned[str(teacher)]` for a run directory not made yet (an experiment's earlier
    stage). '' when it cannot be told."""
    spec = str(teacher)
    if not spec:
        return ""
    if spec.startswith("robustbench:"):
        return spec
    if spec.startswith(shipped.PREFIX):  # a shipped teacher: its certificate names the architecture
        try:
            return str(shipped.certificate(spec)["model"]["name"])
        except (IgamError, KeyError, TypeError):
            return ""
    p = Path(spec)
    if p.is_dir() and (p / Run.META).is_file():
        try:
            args = Run(p).meta["model"]
        except IgamError:
            return ""
        args = args.get("teacher") if args.get("adapter") is not None else args
        return str(args.get("name") or "") if isinstance(args, dict) else ""
    if p.is_file():
        return teacher_model
    name = (planned or {}).get(spec, "")
    return name.removeprefix("adapted:")


def finetune_model(body: ImageClassifier, target_shape: tuple[int, int, int], target_classes: int,
                   adapter: str = "auto", body_bn: str = "eval",
                   log: Callable[[str], Any] | None = print) -> AdaptedTeacher:
    """Freeze `body`, give it a new logit layer for `target_classes` (eq. 6), put the adapter `adapter`
    from `target_shape` (C, H, W) to the body's input in front. Trainable: the new head and a learned
    adapter only. The new head is initialised from the global torch generator. adapter=auto says through
    `log` what it chose and why (`auto_reason`).

    Raises:
        IgamError: for an adapter spec that does not map target_shape to the body's input.
    """
    for p in body.parameters():
        p.requires_grad_(False)
    body.reset_classifier(target_classes)
    t_shape = (body.igam_args["in_chans"], *body.igam_args["input_size"])
    if (adapter or "auto").strip().lower() == "auto" and log is not None:
        log(f"igam: {auto_reason(tuple(target_shape), t_shape)}")
    return AdaptedTeacher(build_adapter(adapter, target_shape, t_shape), body, body_bn)


WEAK_TEACHER = 2.0  # a fine-tuned teacher below this multiple of chance accuracy is reported as weak
_SAID: set[tuple[str, Any]] = set()


def once(key: str, log: Any = None) -> bool:
    """True the first time `key` is asked about in this process for the output `log`: a warning about one
    teacher is given once, not again for every stage of an experiment that uses it."""
    if (key, log) in _SAID:
        return False
    _SAID.add((key, log))
    return True


def frozen_teacher(path: str | Path, target_shape, target_classes: int, bn: str = "eval",
                   log: Callable[[str], Any] = print, *, class_names: list[str] | None = None,
                   dataset: str = "") -> AdaptedTeacher:
    """A fine-tuned teacher run ready for IGAM: every parameter frozen, checked against the target task
    (`dataset`, whose classes are `class_names` in label order, when known). A teacher whose recorded clean
    accuracy on the target task is below WEAK_TEACHER x chance is reported through `log` (its input
    gradients carry little about the task).

    Raises:
        IgamError: not a fine-tuned teacher run, or fine-tuned for another input shape, class count, or
            other classes or class order (e.g. cifar10:vehicles for a cifar10:truck,ship,... student).
    """
    p = Path(path)
    if not p.exists() and not str(path).startswith((shipped.PREFIX, "robustbench:")):
        raise IgamError(f"Teacher '{path}' does not exist. A student's teacher (igam, igr, kd-noise) is a "
                        "fine-tuned teacher run: the folder `igam finetune teacher=ROBUST_RUN "
                        f"dataset={dataset or 'TARGET'}` wrote (e.g. runs/finetune-...).")
    if p.is_dir():
        run = Run.open(p)
        run.config  # noqa: B018  (read to check it: a hostile or damaged config.yaml refuses the run)
        net = run.load_model()
    else:
        net = None
    if not isinstance(net, AdaptedTeacher):
        robust = str(path) if str(path).startswith((shipped.PREFIX, "robustbench:")) else "ROBUST_RUN"
        raise IgamError(
            f"teacher={path} is not a fine-tuned teacher. A student's teacher (igam, igr, kd-noise) "
            f"needs its logit layer trained on the target task first: run `igam finetune teacher={robust} "
            f"dataset={dataset or 'TARGET'}` (paper 4.1) and pass that run as teacher=."
        )
    if tuple(net.adapter.in_shape) != tuple(target_shape):
        raise IgamError(
            f"The teacher was fine-tuned for inputs {'x'.join(map(str, net.adapter.in_shape))}, "
            f"but the target data is {'x'.join(map(str, target_shape))}. Fine-tune it on this "
            "dataset first."
        )
    if net.body.num_classes != target_classes:
        raise IgamError(
            f"The teacher's head has {net.body.num_classes} classes, the target task has "
            f"{target_classes}. Fine-tune the teacher on the target dataset first."
        )
    meta = Run(p).meta
    data = meta.get("data") or {}
    source = meta["teacher"] if isinstance(meta.get("teacher"), str) else "..."
    own = [str(c) for c in data.get("class_names") or []]
    if class_names and len(own) == len(class_names) and own != [str(c) for c in class_names]:
        raise IgamError(
            f"The teacher {p} was fine-tuned on {data.get('dataset', 'another dataset')}, whose labels "
            f"0 .. {len(own) - 1} are {', '.join(own)}; the target task{f' {dataset}' if dataset else ''} "
            f"labels {', '.join(map(str, class_names))}. Its head would answer for other classes. Fine-tune "
            f"its robust teacher on this dataset (`igam finetune teacher={source} dataset="
            f"{dataset or 'TARGET'}`) and pass that run as teacher=."
        )
    clean = (Run(p).read_metrics(log).get("final") or {}).get("clean_acc")
    weak = isinstance(clean, int | float) and clean < WEAK_TEACHER / target_classes
    if weak and once(f"weak:{p.resolve()}", log):
        log(f"igam: WARNING: the fine-tuned teacher {p} reaches only {100 * clean:.1f}% clean accuracy on "
            f"the target task (chance: {100 / target_classes:.1f}%). The student matches its input "
            "gradients, features or outputs, which then say little about the task: fine-tune longer or at "
            "another finetune_lr (e.g. 0.01), or try another adapter.")
    net.body_bn = bn
    for p_ in net.parameters():
        p_.requires_grad_(False)
    return net.train()
